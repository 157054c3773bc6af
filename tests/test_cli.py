import subprocess
import sys

import pytest

from fruitlens.cli.main import build_parser, main
from conftest import ROOT


def test_help_for_every_command_has_examples(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"check", "split", "train", "evaluate", "predict", "export", "serve", "compare", "weights", "demo",
            "models"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "usage: fruitlens " + name in out
        if name not in ("models",):
            assert "examples:" in out, name


def test_errors_are_error_hint_lines_and_traceback_on_request(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "\nhint: " in err and "Traceback" not in err
    assert main(["--traceback", "check", str(tmp_path / "nope")]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "fruitlens", "--version"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0 and out.stdout.startswith("fruitlens ")


def test_models_and_weights_list(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "mobilenet_v2" in out and "small_cnn" in out
    assert main(["weights", "list"]) == 0
    assert "mobilenet_v2-b0353104.pth" in capsys.readouterr().out
