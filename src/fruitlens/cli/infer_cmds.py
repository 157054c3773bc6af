"""``fruitlens predict``, ``fruitlens export`` and ``fruitlens serve``."""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from fruitlens.cli.options import int_in, threshold
from fruitlens.cli.output import table
from fruitlens.errors import ConfigError, DataError, ExitCode, ImageError

PREDICT_EXAMPLES = """examples:
  fruitlens predict runs/mnv2 apple.jpg pear.png --top-k 3
  fruitlens predict runs/mnv2 photos/ --json > predictions.jsonl       # folders are searched recursively
  fruitlens predict runs/mnv2 photos/ --csv predictions.csv            # one row per image, for a spreadsheet
  fruitlens predict runs/mnv2 apple.jpg --explain heatmaps/            # where the model looked, as PNG overlays
  fruitlens predict runs/mnv2/export/model.onnx 'shots/*.jpg' --unknown-threshold 0   # always answer
"""
EXPORT_EXAMPLES = """examples:
  fruitlens export runs/mnv2 --format onnx
  fruitlens export runs/mnv2 --format onnx --int8      # + int8 model calibrated on training images
"""
SERVE_EXAMPLES = """examples:
  fruitlens serve runs/mnv2                        # http://127.0.0.1:8000 (upload page), /docs (API)
  fruitlens serve runs/mnv2/export/model.onnx --port 9000
  curl -F file=@apple.jpg http://127.0.0.1:8000/predict
  fruitlens serve runs/mine --feedback feedback/   # + "wrong? pick the right fruit" -> feedback/labels.csv
  fruitlens serve runs/mine --label my-photos/     # label a folder on /label -> labels/to-label.csv
  fruitlens serve runs/mine --label to-label/to-label.csv --feedback feedback/   # suggest's picks, answers in feedback/
then: fruitlens train DATA --add feedback/labels.csv --out runs/mine2
"""


def register(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="classify images with a trained run or an ONNX model",
        epilog=PREDICT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="run folder or model.onnx")
    p.add_argument("images", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--top-k", type=int_in(1), default=3)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=int_in(1), default=32)
    p.add_argument(
        "--unknown-threshold",
        type=threshold,
        default="auto",
        help="'not sure' below this calibrated top-1 probability: auto (default: the run's, chosen for "
        "its target accuracy on held-out images), 0 (off) or a number",
    )
    p.add_argument("--csv", metavar="FILE", help="also write one row per image to this CSV file")
    p.add_argument("--explain", metavar="OUT_DIR", help="write one overlay PNG per image: photo, heat map, answer")
    p.add_argument(
        "--engine",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="for a run folder: its ONNX export when fresh (auto), the PyTorch checkpoint, or the export",
    )
    p.set_defaults(func=run_predict)

    p = sub.add_parser(
        "export",
        help="export to ONNX with a parity check and a speed figure",
        epilog=EXPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--int8", action="store_true", help="also write an int8 model (static quantisation)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the speed figures")
    p.set_defaults(func=run_export)

    p = sub.add_parser(
        "serve",
        help="REST API and upload page (FastAPI + uvicorn)",
        epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="run folder or model.onnx")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_in(1, 65535), default=8000)
    p.add_argument("--workers", type=int_in(1), default=1, help="server processes behind the one port (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="inference threads per worker (default 0: all cores; idle threads sleep, so workers share)",
    )
    p.add_argument("--top-k", type=int_in(1), default=3)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body (default 10 MB)")
    p.add_argument("--max-images", type=int, default=64, help="most images in one request (default 64)")
    p.add_argument(
        "--unknown-threshold",
        type=threshold,
        default="auto",
        help="'not sure' below this calibrated top-1 probability: auto (the run's), 0 (off) or a number",
    )
    g = p.add_argument_group("collecting labels (for 'fruitlens train --add')")
    g.add_argument(
        "--feedback",
        metavar="DIR",
        help="add a 'wrong? pick the right fruit' control to the upload page: "
        "the photo (named by its content hash) and its label go to DIR (DIR/labels.csv); off by default",
    )
    g.add_argument("--feedback-max-photos", type=int_in(1), default=10_000, help="most photos DIR keeps (10,000)")
    g.add_argument("--feedback-max-mb", type=float, default=2048.0, help="most megabytes DIR keeps (2048)")
    g.add_argument(
        "--label",
        metavar="PHOTOS",
        help="serve the labelling page for a folder of photos (or a "
        "to-label.csv of 'fruitlens suggest') on /label; the answers are saved as you give them",
    )
    g.add_argument(
        "--label-out",
        metavar="CSV",
        help="where /label's answers go (default: DIR/to-label.csv with --feedback DIR, else labels/to-label.csv)",
    )
    p.set_defaults(func=run_serve)


def expand_images(items: list[str]) -> list[str]:
    """Files, folders (recursive) and glob patterns -> image paths; a name that matches nothing is kept (and fails)."""
    from fruitlens.data.scan import is_image_file

    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(
                str(f)
                for f in p.rglob("*")
                if f.is_file() and is_image_file(f) and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        elif not p.exists() and any(ch in item for ch in "*?["):
            out += sorted(glob.glob(item, recursive=True))
        else:
            out.append(item)
    return out


CSV_FIELDS = ["path", "label", "score", "unknown", "reason", "ood_score"]


def run_predict(args) -> int:
    from fruitlens.inference.explain import explain
    from fruitlens.inference.predictor import Predictor

    predictor = Predictor.load(args.model, args.engine)
    if args.unknown_threshold != "auto":
        predictor.unknown_threshold = args.unknown_threshold
    images = expand_images(args.images)
    if not images:
        raise DataError(f"no images found in {' '.join(args.images)}")
    out_dir = Path(args.explain) if args.explain else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    csv_rows, rows, failed, names = [], [], 0, set()
    for path, pred in predictor.predict_many(images, args.top_k, args.batch_size):
        if isinstance(pred, ImageError):
            failed += 1
            rows.append([path, "ERROR", "", pred.message])
            csv_rows.append({"path": path, "reason": f"error: {pred.message}"})
            if args.json:
                print(json.dumps({"path": path, "error": pred.message}))
            continue
        record = {"path": path, **pred.to_dict()}
        if out_dir and pred.class_map is not None:
            record["explain"] = str(_explain_path(out_dir, path, names))
            explain(path, pred, predictor.preprocessing).save(record["explain"])
        if args.json:
            print(json.dumps(record))
        rows.append([path, pred.label if not pred.unknown else pred.reason, f"{pred.score:.3f}", pred.text()])
        csv_rows.append(_csv_row(record))
    if args.csv:
        _write_csv(Path(args.csv), csv_rows, args.top_k)
    if not args.json:
        table(["image", "label", "prob", "answer"], rows)
        extra = f"; overlays in {out_dir}" if out_dir else ""
        print(f"{len(images) - failed} predicted, {failed} failed ({predictor.engine}){extra}")
    return ExitCode.FINDINGS if failed else ExitCode.OK


def _explain_path(out_dir: Path, image: str, taken: set) -> Path:
    """``OUT_DIR/<image stem>.png``, numbered where two images share a name."""
    stem = Path(image).stem or "image"
    name, i = f"{stem}.png", 1
    while name in taken:
        i += 1
        name = f"{stem}-{i}.png"
    taken.add(name)
    return out_dir / name


def _csv_row(record: dict) -> dict:
    row = {k: record.get(k) for k in CSV_FIELDS}
    for i, t in enumerate(record["top_k"], start=1):
        row[f"top{i}_label"], row[f"top{i}_score"] = t["label"], t["score"]
    return row


def _write_csv(path: Path, rows: list[dict], top_k: int) -> None:
    import csv

    fields = CSV_FIELDS + [f"top{i}_{what}" for i in range(1, top_k + 1) for what in ("label", "score")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def run_export(args) -> int:
    from fruitlens.pipelines.export import export

    res = export(args.run, int8=args.int8, opset=args.opset, bench=args.bench)
    print(f"wrote {res.onnx} (opset {res.opset}, {res.classes} classes, {res.image_size} px) and labels.txt")
    for name, p in res.parity.items():
        print(
            f"parity {name}: top-1 agreement {p.top1_agreement:.2%} on {p.images} validation images, "
            f"max |logit diff| {p.max_abs_logit_diff:.2e}"
            + (f", max |ood_score diff| {p.max_abs_ood_diff:.2e}" if p.max_abs_ood_diff is not None else "")
        )
    if res.int8:
        print(f"wrote {res.int8}")
    print_speed(res.speed, "speed")
    return ExitCode.OK


def print_speed(speed: dict, prefix: str) -> None:
    for engine, s in speed.items():
        print(f"{prefix} {engine}: {s['batch32_img_per_s']:.0f} img/s at batch 32, {s['batch1_ms']:.2f} ms at batch 1")


def run_serve(args) -> int:
    import os

    import uvicorn

    from fruitlens.inference.predictor import Predictor
    from fruitlens.serve.app import create_app
    from fruitlens.serve.settings import ServeSettings

    label_out = args.label_out or str(Path(args.feedback or "labels") / "to-label.csv") if args.label else ""
    if args.label and args.workers > 1:
        raise ConfigError(
            "--label keeps the answers in one process: it runs with --workers 1",
            "drop --workers, or serve the labelling page apart from the busy service",
        )
    if args.label and not Path(args.label).exists():
        raise DataError(f"--label {args.label}: no such file or folder", "pass a folder of photos or a to-label.csv")
    settings = ServeSettings(
        str(Path(args.model).resolve()),
        top_k=args.top_k,
        threads=args.threads,
        max_upload_mb=args.max_upload_mb,
        max_images=args.max_images,
        unknown_threshold=args.unknown_threshold,
        feedback=str(Path(args.feedback).resolve()) if args.feedback else "",
        feedback_max_photos=args.feedback_max_photos,
        feedback_max_mb=args.feedback_max_mb,
        label=str(Path(args.label).resolve()) if args.label else "",
        label_out=str(Path(label_out).resolve()) if label_out else "",
    ).validated()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: the service is reachable from other machines", file=sys.stderr)
    _check_port_free(args.host, args.port)
    predictor = Predictor.load(settings.model, threads=settings.threads)  # a bad model path fails here, clearly
    print(
        f"serving {args.model} ({predictor.engine}, {len(predictor.classes)} classes) on "
        f"http://{args.host}:{args.port} with {args.workers} worker(s)  (upload page /, API docs /docs)"
    )
    if settings.feedback:
        print(
            f"feedback on: corrected answers go to {settings.feedback}/labels.csv "
            f"(then: fruitlens train DATA --add {settings.feedback}/labels.csv)"
        )
    if settings.label:
        print(f"labelling page: http://{args.host}:{args.port}/label; answers go to {settings.label_out}")
    if args.workers > 1:
        del predictor  # each worker process loads its own copy
        os.environ.update(settings.to_env())
        uvicorn.run(
            "fruitlens.serve.app:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers
        )
        return ExitCode.OK
    uvicorn.run(create_app(settings, predictor), host=args.host, port=args.port)
    return ExitCode.OK


def _check_port_free(host: str, port: int) -> None:
    """A port another program listens on fails now with a clear error, not after the model has loaded."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(
            f"--host {host}: cannot resolve it ({exc.strerror})",
            "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)",
        ) from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no obstacle
        try:
            s.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror})",
                "pick another --port, or stop the program that uses this one",
            ) from None
