from fruitlens.cli.main import main

raise SystemExit(main())
