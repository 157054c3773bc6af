"""``fruitlens evaluate`` and ``fruitlens compare``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fruitlens.cli.options import int_in
from fruitlens.cli.output import print_json, table
from fruitlens.errors import ExitCode

EVAL_EXAMPLES = """examples:
  fruitlens evaluate runs/mnv2                        # the run's own test split
  fruitlens evaluate runs/mnv2 --split val
  fruitlens evaluate runs/mnv2 other_photos/          # a folder of the model's classes -> runs/mnv2/eval/other_photos/
  fruitlens evaluate runs/mnv2 supermarket/ --class-map map.json   # {"Apple": ["Apple Braeburn", "Apple Red 1"]}
"""
COMPARE_EXAMPLES = """examples:
  fruitlens compare runs/mnv2 runs/cnn runs/densenet
  fruitlens compare runs/* --markdown --chart compare.png
  fruitlens compare runs/mnv2 runs/mnv2/eval/supermarket     # the test split next to other data
  fruitlens compare --mlflow-experiment fruitlens --mlflow-uri sqlite:///runs/mlflow.db
"""


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="report on the test split or on another folder",
        epilog=EVAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run")
    p.add_argument("data", nargs="?", help="another folder (or manifest CSV) to evaluate on")
    p.add_argument("--split", default="test", help="split of the run (or of DATA's split folders); default test")
    p.add_argument("--class-map", help="JSON mapping DATA's class names onto the model's")
    p.add_argument("--batch-size", type=int_in(1), default=64)
    p.set_defaults(func=run_evaluate)

    p = sub.add_parser(
        "compare",
        help="one table across runs",
        epilog=COMPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="*", help="run folders, or report folders RUN/eval/<data>")
    p.add_argument("--mlflow-experiment", metavar="NAME", help="compare the runs of this MLflow experiment instead")
    p.add_argument("--mlflow-uri", help="its tracking URI (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--chart",
        metavar="PNG",
        default="",
        help="also draw the accuracies (with their intervals) as a bar chart into this PNG file (default: no chart)",
    )
    p.set_defaults(func=run_compare)


def run_evaluate(args) -> int:
    from fruitlens.evaluation.metrics import ci_text, gap_text
    from fruitlens.evaluation.domain import studio_text
    from fruitlens.pipelines.evaluate import evaluate

    rep = evaluate(args.run, args.data, split=args.split, class_map=args.class_map, batch_size=args.batch_size)
    m = rep.metrics
    print(f"evaluated on {rep.evaluated_on}: {m.n} images")
    print(
        f"accuracy {m.accuracy:.4f} ({ci_text(m)})  balanced {m.balanced_accuracy:.4f}  macro F1 {m.macro_f1:.4f}  "
        f"log loss {m.log_loss:.4f}  ECE {m.ece:.4f}"
    )
    if gap := gap_text(rep.validation_gap, rep.evaluated_on):
        print(f"warning: {gap}")
    for f in rep.domain.figures[1:]:
        print(f"next to {f.name}: accuracy {f.accuracy:.4f}  balanced {f.balanced_accuracy:.4f}  ({f.images} images)")
    if rep.domain.studio_only and rep.evaluated_on in ("test", "val"):
        print(f"warning: {studio_text(rep.domain)}")
    print()
    print(m.classification_report)
    if m.most_confused:
        print(
            "most confused: "
            + "; ".join(f"{c['true']} -> {c['predicted']} ({c['count']})" for c in m.most_confused[:5])
        )
    if rep.unmapped_images:
        print(f"counted apart (classes the model does not know): {rep.unmapped_images}")
    if rep.bad_images:
        print(f"skipped {len(rep.bad_images)} undecodable image(s), e.g. {rep.bad_images[0]['path']}")
    if rep.leak.applies and rep.leak.test_images_with_train_duplicate:
        print(f"warning: {rep.leak.test_images_with_train_duplicate} test images have a near duplicate in train")
    print(f"report: {Path(rep.folder) / 'report.html'}")
    return ExitCode.OK


def run_compare(args) -> int:
    from fruitlens.errors import ConfigError
    from fruitlens.evaluation.compare import compare_mlflow, compare_runs, markdown

    chart = Path(args.chart) if args.chart else None
    if args.mlflow_experiment:
        if args.runs:
            raise ConfigError("pass run folders or --mlflow-experiment, not both")
        rows = compare_mlflow(args.mlflow_experiment, args.mlflow_uri, chart)
    elif args.runs:
        rows = compare_runs(args.runs, chart)
    else:
        raise ConfigError("nothing to compare", "fruitlens compare RUN [RUN ...] or --mlflow-experiment NAME")
    if args.json:
        print_json([{**vars(r), "accuracy_ci95_text": r.ci} for r in rows])
    elif args.markdown:
        print(markdown(rows))
    else:
        table(
            [
                "run",
                "model",
                "evaluated on",
                "params",
                "MB",
                "px",
                "accuracy",
                "95% CI",
                "macro F1",
                "ECE",
                "train s",
                "CPU ms/img",
            ],
            [
                [
                    r.run,
                    r.model,
                    r.evaluated_on,
                    f"{r.parameters:,}",
                    r.size_mb,
                    r.image_size,
                    f"{r.accuracy:.4f}",
                    r.ci,
                    f"{r.macro_f1:.4f}",
                    f"{r.ece:.4f}",
                    r.train_seconds if r.train_seconds is not None else "-",
                    r.latency_ms,
                ]
                for r in rows
            ],
        )
    if args.chart:  # on stderr: stdout stays one table or one JSON document
        print(f"chart: {args.chart}", file=sys.stderr)
    return ExitCode.OK
