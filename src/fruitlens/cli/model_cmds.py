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
  fruitlens train photos/ --model efficientnet_b0 --out runs/eb0   # a connected machine downloads its weights
"""


def add_models(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list the registered models",
        epilog=MODELS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=run_models)


def add_weights(sub) -> None:
    p = sub.add_parser(
        "weights",
        help="pretrained weights for offline machines: list | import FILE",
        epilog=WEIGHTS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    wsub = p.add_subparsers(dest="action", required=True, metavar="list|import")
    lp = wsub.add_parser(
        "list",
        help="which weights files are in torchvision's cache",
        epilog=WEIGHTS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lp.add_argument("--cached-only", metavar="MODEL", help="exit 0 if MODEL's default weights are cached, else 1")
    ip = wsub.add_parser(
        "import",
        help="verify a weights file and copy it into the cache",
        epilog=WEIGHTS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ip.add_argument("file")
    p.set_defaults(func=run_weights)


MODELS_NOTE = (
    "params, ImageNet top-1, download MB: torchvision's published figures for the weights that\n"
    "'--weights imagenet' loads (small_cnn: its own layers); fruitlens has not measured them. Weights\n"
    "'not cached' download into torchvision's cache on first use (offline: 'fruitlens weights import\n"
    "FILE'). Fruit accuracy with ImageNet weights is measured in benchmarks/ for mobilenet_v2 only."
)


def run_models(args) -> int:
    from fruitlens.models.registry import list_models, model_facts, usable_weights
    from fruitlens.models.weights import is_cached

    rows = []
    for spec in list_models():
        facts = model_facts(spec)
        if spec.weights_enum is None:
            state = "none (from scratch)"
        else:
            cached = [w.name for w in usable_weights(spec) if is_cached(w)]
            state = f"imagenet ({', '.join(cached)} cached)" if cached else "imagenet (not cached)"
        size = f"{spec.fixed_size} only" if spec.fixed_size else spec.min_size
        top1 = "-" if facts.imagenet_top1 is None else f"{facts.imagenet_top1:.1f}%"
        mb = "-" if facts.file_mb is None else f"{facts.file_mb:.0f}"
        rows.append([spec.name, state, size, f"{facts.params / 1e6:.1f}M", top1, mb, spec.description])
    table(["model", "weights", "min px", "params", "ImageNet top-1", "download MB", "description"], rows)
    print(f"\n{MODELS_NOTE}")
    return ExitCode.OK


def run_weights(args) -> int:
    from fruitlens.models.registry import get_spec, list_models, pretrained_enums, usable_weights
    from fruitlens.models.weights import cache_dir, import_weights, is_cached, list_weights

    if args.action == "import":
        dest = import_weights(args.file, pretrained_enums())
        print(f"verified and imported {args.file} -> {dest}")
        return ExitCode.OK
    if args.cached_only:
        spec = get_spec(args.cached_only)
        if spec.weights_enum is None:
            raise WeightsError(f"{spec.name} has no pretrained weights")
        return ExitCode.OK if any(is_cached(w) for w in usable_weights(spec)) else ExitCode.FINDINGS
    print(f"cache: {cache_dir()}")
    table(
        ["model", "weights", "file", "cached"],
        [
            [r.model, r.weights, r.file, "yes" if r.cached else "no"]
            for r in list_weights({s.name: s.weights_enum for s in list_models()})
        ],
    )
    return ExitCode.OK
