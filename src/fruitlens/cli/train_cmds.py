"""``fruitlens train``: options map onto TrainConfig keys; anything else is a ``key=value`` override."""

from __future__ import annotations

import argparse
from pathlib import Path

from fruitlens.config import OPTIONS, TrainConfig, config_from, parse_overrides
from fruitlens.errors import ExitCode

EXAMPLES = """examples:
  fruitlens train photos/ --out runs/mnv2                       # MobileNetV2, ImageNet weights, fast CPU path
  fruitlens train photos/ --model small_cnn --epochs 30 --out runs/cnn
  fruitlens train photos/ --fine-tune-blocks 3 --img-size 160 --out runs/ft   # real photos: fine-tune the top
  fruitlens train ../shared/data/fruits360 --target-acc 0.98 --out runs/f360  # keeps the data's own Test split
  fruitlens train ../shared/data/fruits360 --eval-data photos/ --class-map map.json --out runs/f360  # and on photos
  fruitlens train ../shared/data/fruits360 --adapt-to my_photos/ --out runs/f360a   # adapt to unlabeled photos
  fruitlens train ../shared/data/fruits360 --add to-label/to-label.csv --out runs/mine   # + your labelled photos
  fruitlens train photos/ --out runs/x fit.label_smoothing=0.1 augment.rotation=0
  fruitlens train --resume runs/mnv2                            # continue an interrupted run
  fruitlens train photos/ --out runs/x --logger csv,tensorboard,mlflow --mlflow-uri sqlite:///runs/mlflow.db
  fruitlens train photos/ --devices 2 --strategy ddp --accelerator cpu --no-feature-cache --out runs/ddp
"""


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a classifier and write a run folder with its report",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", nargs="?", help="folder of class folders, folder of split folders, or manifest CSV")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. fit.epochs=5")
    p.add_argument("--out", help="run folder to create (default runs/<model>)")
    p.add_argument("--config", help="YAML config to start from (e.g. a run's config.yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="mobilenet_v2 (default), densenet121, resnet18, small_cnn ('fruitlens models')")
    g.add_argument("--weights", help="imagenet (default) | none | PATH to a state dict")
    g.add_argument(
        "--img-size",
        type=int,
        help="input size in px (default: picked from the data; 224 for small "
        "studio shots such as Fruits-360, so that the model holds up on photos)",
    )
    g.add_argument(
        "--fast",
        action="store_true",
        default=None,
        help="small studio shots keep their own size (96 px "
        "for Fruits-360) instead of 224: several times quicker, as good on their own test split, far worse "
        "on photos",
    )
    g.add_argument(
        "--feature-layer",
        choices=["auto", "last", "mid"],
        help="the features the head reads: the "
        "backbone's last layer, or an earlier block's (mid: MobileNetV2's block 17, 320 channels, "
        "standardised); auto (default): mid for studio shots upscaled for photos, else last",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--epochs",
        type=int,
        help="max epochs of the first phase (default 200 for a head on cached features, "
        "30 on images; early stopping ends sooner)",
    )
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    g.add_argument("--balance", choices=["none", "weights", "sampler"], help="for imbalanced classes")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument(
        "--target-acc",
        type=float,
        help="stop once accuracy reaches this (default 0.98, off for studio shots upscaled for photos; 0 = off)",
    )
    g.add_argument("--target-monitor", choices=["val", "train"], help="accuracy the target watches (default val)")
    g.add_argument(
        "--no-feature-cache",
        dest="feature_cache",
        action="store_false",
        default=None,
        help="train the head on images every epoch instead of on cached backbone features",
    )
    g.add_argument(
        "--feature-views",
        type=int,
        help="augmented views per image in the feature cache (default 1; 3 for studio shots at photo size)",
    )
    g.add_argument("--fine-tune-blocks", type=int, help="then fine-tune the top N backbone blocks (default 0)")
    g.add_argument("--fine-tune-epochs", type=int)
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None, help="switch augmentation off")
    g.add_argument("--deterministic", action="store_true", default=None)
    g = p.add_argument_group("data")
    g.add_argument("--val", type=float, help="validation fraction when the data has no val split (default 0.15)")
    g.add_argument("--test", type=float, help="test fraction when the data has no test split (default 0.15)")
    g.add_argument("--seed", type=int)
    g.add_argument("--group", choices=["near-duplicates", "none"])
    g.add_argument(
        "--keep-share",
        type=float,
        help="of each group of near copies among the training images (frames "
        "of one fruit turning), train on this share, picked to cover the group (default: 0.2 where the "
        "typical group has 10 or more images, else 1 = all)",
    )
    g.add_argument("--workers", type=int, help="data loading processes (default: up to 4)")
    g.add_argument("--cache-images", action="store_true", default=None, help="keep decoded images in memory")
    g.add_argument(
        "--eval-data",
        metavar="OTHER",
        help="also evaluate on this labelled folder (e.g. photos like the "
        "ones the model will see): its figures go next to the test split's, its report to RUN/eval/",
    )
    g.add_argument("--class-map", help="JSON mapping OTHER's class names onto the training classes")
    g.add_argument(
        "--add",
        action="append",
        metavar="LABELS.csv",
        help="labelled photos of your setting (path,label CSV, e.g. the to-label.csv of 'fruitlens "
        "suggest'; repeatable): new labels become classes, the photos carry fit.photo_share (30%%) of "
        "the head's training weight and set the 'not sure' and 'unfamiliar' thresholds",
    )
    g.add_argument(
        "--adapt-to",
        metavar="PHOTOS",
        help="unlabeled photos of where the model will be used (any folder "
        "of images): the head adapts to them by class-balanced pseudo-labels (fit.adapt_share, fit.adapt_rounds)",
    )
    g = p.add_argument_group("hardware (Lightning)")
    g.add_argument("--accelerator", help="auto (default), cpu, gpu")
    g.add_argument("--devices", help="number of devices, e.g. 2 (default 1)")
    g.add_argument("--num-nodes", type=int)
    g.add_argument("--strategy", help="auto (default), ddp, ddp_spawn, ...")
    g.add_argument("--precision", help="auto (16-mixed on GPU, 32 on CPU), 32-true, bf16-mixed, ...")
    g = p.add_argument_group("tracking (pip install 'fruitlens[tracking]' for tensorboard and mlflow)")
    g.add_argument("--logger", help="csv (default), tensorboard, mlflow, or several: csv,tensorboard,mlflow")
    g.add_argument(
        "--mlflow-uri",
        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///<folder of the run>/mlflow.db)",
    )
    g.add_argument("--experiment", help="MLflow experiment name (default fruitlens)")
    p.set_defaults(func=run_train)


def build_config(args) -> TrainConfig:
    """defaults <- --config YAML <- options <- key=value overrides; validated once."""
    options = {opt: getattr(args, opt) for opt in OPTIONS if getattr(args, opt, None) is not None}
    return config_from(args.data, args.config, options, parse_overrides(args.overrides))


def run_train(args) -> int:
    from fruitlens.pipelines.train import resume, train

    if args.data and "=" in args.data and not args.resume:
        args.overrides.insert(0, args.data)
        args.data = None
    if args.resume:
        result = resume(args.resume)
    else:
        cfg = build_config(args)
        result = train(cfg, args.out or f"runs/{cfg.model.name}")
    if result.report is not None:  # the other processes of a DDP run print nothing
        print_summary(result.run.report_html, result.report, result.export_error)
        if result.other_error:
            print(f"warning: --eval-data was not evaluated: {result.other_error}")
    return ExitCode.OK


def print_summary(page, report, export_error: str | None = None) -> None:
    """The headline of a trained run: accuracy with its interval, warnings, where the report is, what to do next."""
    from fruitlens.evaluation.domain import studio_text
    from fruitlens.evaluation.metrics import ci_range, ci_text, gap_text
    from fruitlens.evaluation.selective import never_sure_text

    m = report.metrics
    run = report.run
    print(f"\nrun folder: {run}")
    print(
        f"test accuracy {m.accuracy:.4f} ({ci_text(m)})  macro F1 {m.macro_f1:.4f}  ECE {m.ece:.4f}  "
        f"({m.n} images, {report.evaluated_on})"
    )
    if report.leak.test_images_with_train_duplicate:
        print(
            f"warning: {report.leak.test_images_with_train_duplicate} test images have a near duplicate in "
            "train (the data's own split): this accuracy overstates accuracy on new photos"
        )
    if gap := gap_text(report.validation_gap, report.evaluated_on):
        print(f"warning: {gap}")
    a = report.label_audit
    if a is not None and (a.train or a.val or a.test):
        precision = (
            f" (expected precision {100 * a.expected_precision:.0f}%)" if a.expected_precision is not None else ""
        )
        print(
            f"labels: {a.train} training and {a.val} validation images look mislabelled{precision}, and {len(a.test)} "
            f"test images: see {Path(run) / a.html} (decide in label_issues.csv, then 'fruitlens relabel')"
        )
    if a is not None and a.lookalike:
        print(
            "classes that look alike (not label errors): "
            + ", ".join(f"{p['a']}/{p['b']} {100 * p['share']:.0f}%" for p in a.lookalike[:4])
        )
    for f in report.domain.figures[1:]:
        print(
            f"on {f.name}: accuracy {f.accuracy:.4f} (95% CI {ci_range(f.accuracy_ci95)})  "
            f"balanced {f.balanced_accuracy:.4f}"
            f"  ({f.images} images; report {Path(run) / f.folder / 'report.html'})"
        )
    if report.adaptation:
        print(f"adaptation: {report.adaptation.text()}")
    if report.photos is not None:
        print(report.photos.text())
        if report.photos.skipped:
            print(
                f"warning: {report.photos.skipped} row(s) of the labels CSV were left out, e.g. "
                f"{': '.join(report.photos.skipped_examples[0])} (all in {Path(run) / 'report.html'})"
            )
    if report.domain.studio_only and report.photos is None:
        print(f"warning: {studio_text(report.domain)}")
    if never := never_sure_text(report.trust):
        print(f"warning: {never}")
    if export_error:
        print(f"warning: no ONNX export ({export_error}); predict and serve use the PyTorch checkpoint")
    print(f"report: {page}")
    print(f"next: fruitlens predict {run} IMAGE | fruitlens export {run} --format onnx | fruitlens serve {run}")
