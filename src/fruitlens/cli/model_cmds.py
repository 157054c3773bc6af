"""``fruitlens models`` and ``fruitlens weights list|import``."""
from __future__ import annotations

import argparse

from fruitlens.cli.output import table
from fruitlens.errors import ExitCode, WeightsError

WEIGHTS_EXAMPLES = """examples:
  fruitlens weights list
  fruitlens weights import ~/Downloads/mobilenet_v2-b0353104.pth   # offline machine: verify + copy into the cache
"""


MODELS_EXAMPLES = """examples:
  fruitlens models                                        # names for --model, and whether their weights are here
  fruitlens train photos/ --model densenet121 --out runs/dn
"""


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list the registered models", epilog=MODELS_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run_models)


def add_weights(sub) -> None:
    p = sub.add_parser("weights", help="pretrained weights for offline machines: list | import FILE",
                       epilog=WEIGHTS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    wsub = p.add_subparsers(dest="action", required=True, metavar="list|import")
    lp = wsub.add_parser("list", help="which weights files are in torchvision's cache", epilog=WEIGHTS_EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    lp.add_argument("--cached-only", metavar="MODEL", help="exit 0 if MODEL's default weights are cached, else 1")
    ip = wsub.add_parser("import", help="verify a weights file and copy it into the cache", epilog=WEIGHTS_EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    ip.add_argument("file")
    p.set_defaults(func=run_weights)


def run_models(args) -> int:
    from fruitlens.models.registry import list_models
    from fruitlens.models.weights import is_cached

    rows = []
    for spec in list_models():
        if spec.weights_enum is None:
            state = "none (from scratch)"
        else:
            cached = [w.name for w in spec.weights_enum if is_cached(w)]
            state = f"imagenet ({', '.join(cached)} cached)" if cached else "imagenet (not cached)"
        rows.append([spec.name, state, spec.min_size, spec.description])
    table(["model", "weights", "min px", "description"], rows)
    return ExitCode.OK


def run_weights(args) -> int:
    from fruitlens.models.registry import get_spec, list_models, pretrained_enums
    from fruitlens.models.weights import cache_dir, import_weights, is_cached, list_weights

    if args.action == "import":
        dest = import_weights(args.file, pretrained_enums())
        print(f"verified and imported {args.file} -> {dest}")
        return ExitCode.OK
    if args.cached_only:
        spec = get_spec(args.cached_only)
        if spec.weights_enum is None:
            raise WeightsError(f"{spec.name} has no pretrained weights")
        return ExitCode.OK if any(is_cached(w) for w in spec.weights_enum) else ExitCode.FINDINGS
    print(f"cache: {cache_dir()}")
    table(["model", "weights", "file", "cached"],
          [[r.model, r.weights, r.file, "yes" if r.cached else "no"]
           for r in list_weights({s.name: s.weights_enum for s in list_models()})])
    return ExitCode.OK
