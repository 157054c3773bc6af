"""``fruitlens demo``."""

from __future__ import annotations

import argparse
import sys
import time

from fruitlens.errors import ExitCode

EXAMPLES = """examples:
  fruitlens demo                                   # downloads Fruits-360 (about 1 GB) on first use
  fruitlens demo --data ../shared/data/fruits360   # a local copy instead of the download
  fruitlens demo --classes all --out runs/all      # every class (slower)
  fruitlens demo --classes "Banana,Kiwi,Lemon"     # these classes
  FRUITLENS_DATA_URL=https://mirror.example/fruits-360.zip fruitlens demo --sha256 ...
"""


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole job on the default data set (Fruits-360)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--data", help="use this local folder instead of downloading")
    p.add_argument("--data-url", help="mirror URL or local archive/folder (also FRUITLENS_DATA_URL)")
    p.add_argument("--sha256", default="", help="expected SHA-256 of the archive (for mirrors)")
    p.add_argument(
        "--classes", default="20", help="N (a spread of classes), 'all', or comma-separated names (default 20)"
    )
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 export")
    p.set_defaults(func=run)


class _Bar:
    """A one-line download progress bar on stderr."""

    def __init__(self) -> None:
        self.last = 0.0
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last < 0.5 and done != total:
            return
        self.last = now
        speed = done / max(now - self.t0, 1e-6) / 2**20
        if total:
            frac = done / total
            bar = "#" * int(30 * frac)
            print(
                f"\r  [{bar:<30}] {frac:6.1%} {done / 2**20:7.1f}/{total / 2**20:.1f} MB {speed:5.1f} MB/s",
                end="",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"\r  {done / 2**20:7.1f} MB {speed:5.1f} MB/s", end="", file=sys.stderr, flush=True)
        if total and done >= total:
            print(file=sys.stderr)


def run(args) -> int:
    from fruitlens.cli.infer_cmds import print_speed
    from fruitlens.config import parse_overrides
    from fruitlens.evaluation.metrics import ci_text
    from fruitlens.pipelines.demo import demo

    res = demo(
        args.out,
        data=args.data,
        data_url=args.data_url,
        sha256=args.sha256,
        classes=args.classes,
        overrides=parse_overrides(args.overrides),
        progress=_Bar(),
        int8=args.int8,
    )
    m = res.report.metrics
    split = res.report.dataset.totals
    print()
    print(f"fruitlens demo finished in {res.seconds / 60:.1f} min")
    print(
        f"  data:     {res.data_root} ({len(res.classes)} classes; split train {split.get('train', 0)}, "
        f"val {split.get('val', 0)}, test {split.get('test', 0)}; "
        f"{'leak-free' if res.report.leak.leak_free else 'NOT leak-free'})"
    )
    print(
        f"  test:     accuracy {m.accuracy:.2%} ({ci_text(m)}), macro F1 {m.macro_f1:.2%}, ECE {m.ece:.3f} "
        f"on {m.n} images"
    )
    a = res.report.label_audit
    if a is not None:
        precision = (
            f" (expected precision {100 * a.expected_precision:.0f}%)" if a.expected_precision is not None else ""
        )
        alike = (
            "; classes that look alike: "
            + ", ".join(f"{p['a']}/{p['b']} {100 * p['share']:.0f}%" for p in a.lookalike[:3])
            if a.lookalike
            else ""
        )
        print(
            f"  labels:   {a.train + a.val} of {a.audited} training/validation images look mislabelled"
            f"{precision}{alike}"
        )
    print(f"  report:   {res.run.report_html}")
    print(f"  model:    {res.run.best_ckpt}")
    print(
        f"  onnx:     {res.export.onnx} (top-1 agreement with PyTorch {res.export.parity['fp32'].top1_agreement:.2%})"
    )
    if res.export.int8:
        print(f"  int8:     {res.export.int8} (agreement {res.export.parity['int8'].top1_agreement:.2%})")
    print_speed(res.export.speed, "  speed:   ")
    print(f"\nserve it:   fruitlens serve {res.run.path}     (then open http://127.0.0.1:8000)")
    print(f"predict:    fruitlens predict {res.run.path} some_fruit.jpg")
    return ExitCode.OK
