"""``fruitlens suggest``: which of your photos to label, and the page to label them on."""

from __future__ import annotations

import argparse

from fruitlens.cli.options import int_in
from fruitlens.errors import ExitCode

EXAMPLES = """examples:
  fruitlens suggest runs/f360 my-photos/ --budget 90 --out to-label/   # then open to-label/label.html
  fruitlens suggest runs/mine my-photos/ --budget 30 --out round2/     # a run trained with --add: + unsure photos
  fruitlens suggest runs/f360 my-photos/ --labelled to-label/to-label.csv --out round2/
the loop:
  fruitlens train ../shared/data/fruits360 --out runs/f360
  fruitlens suggest runs/f360 my-photos/ --budget 90 --out to-label/
  (label them in to-label/label.html and save to-label.csv, or fill in its label column)
  fruitlens train ../shared/data/fruits360 --add to-label.csv --out runs/mine
"""


def register(sub) -> None:
    p = sub.add_parser(
        "suggest",
        help="pick the photos worth labelling, and write a page to label them on",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="run folder or model.onnx")
    p.add_argument(
        "photos",
        help="folder of unlabeled photos (searched to any depth; folder names are not read "
        "as labels), or a text file listing one path per line",
    )
    p.add_argument("--budget", type=int_in(1), default=90, help="photos to pick (default 90)")
    p.add_argument("--out", default="to-label", help="folder for to-label.csv and label.html (default to-label/)")
    p.add_argument(
        "--labelled",
        action="append",
        metavar="CSV",
        help="a labels CSV of photos of this setting labelled already (repeatable): they are not picked "
        "again, their kinds count as covered, and part of the budget goes to unsure photos",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_suggest)


def run_suggest(args) -> int:
    from fruitlens.pipelines.suggest import suggest

    res = suggest(args.model, args.photos, budget=args.budget, out=args.out, labelled=args.labelled, seed=args.seed)
    print(
        f"picked {len(res.picks)} of {res.photos} photos ({res.distinct} after near copies are counted once) "
        f"in {res.seconds:.1f}s"
    )
    if res.skipped:
        print(
            f"left out {len(res.skipped)} file(s) that are not readable images, e.g. {res.skipped[0][0]} "
            f"({res.skipped[0][1]})"
        )
    if res.short:
        print(f"note: only {len(res.picks)} distinct photos, fewer than --budget {res.budget}: every one was picked")
    if res.labelled:
        print(f"{res.labelled} photos of this setting are labelled already: their kinds count as covered")
    print(f"label them: open {res.page} (keys 1-3, s to skip; save the CSV), or fill in the label column of {res.csv}")
    print(f"then: fruitlens train DATA --add {res.csv} --out runs/mine")
    return ExitCode.OK
