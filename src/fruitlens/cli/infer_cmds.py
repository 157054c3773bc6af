"""``fruitlens predict``, ``fruitlens export`` and ``fruitlens serve``."""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from fruitlens.cli.output import table
from fruitlens.errors import ConfigError, DataError, ExitCode, ImageError

PREDICT_EXAMPLES = """examples:
  fruitlens predict runs/mnv2 apple.jpg pear.png --top-k 3
  fruitlens predict runs/mnv2 photos/ --json > predictions.jsonl       # folders are searched recursively
  fruitlens predict runs/mnv2/export/model.onnx 'shots/*.jpg' --unknown-threshold 0.5
"""
EXPORT_EXAMPLES = """examples:
  fruitlens export runs/mnv2 --format onnx
  fruitlens export runs/mnv2 --format onnx --int8      # + int8 model calibrated on training images
"""
SERVE_EXAMPLES = """examples:
  fruitlens serve runs/mnv2                        # http://127.0.0.1:8000 (upload page), /docs (API)
  fruitlens serve runs/mnv2/export/model.onnx --port 9000
  curl -F file=@apple.jpg http://127.0.0.1:8000/predict
"""


def register(sub) -> None:
    p = sub.add_parser("predict", help="classify images with a trained run or an ONNX model",
                       epilog=PREDICT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run folder or model.onnx")
    p.add_argument("images", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--unknown-threshold", type=float, default=0.0,
                   help="answer 'unknown' when the top probability is below this")
    p.add_argument("--engine", choices=["auto", "torch", "onnx"], default="auto",
                   help="for a run folder: its ONNX export when fresh (auto), the PyTorch checkpoint, or the export")
    p.set_defaults(func=run_predict)

    p = sub.add_parser("export", help="export to ONNX with a parity check and a speed figure",
                       epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--int8", action="store_true", help="also write an int8 model (static quantisation)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the speed figures")
    p.set_defaults(func=run_export)

    p = sub.add_parser("serve", help="REST API and upload page (FastAPI + uvicorn)",
                       epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run folder or model.onnx")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="server processes behind the one port (default 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="inference threads per worker (default 0: all cores; idle threads sleep, so workers share)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body (default 10 MB)")
    p.add_argument("--max-images", type=int, default=64, help="most images in one request (default 64)")
    p.set_defaults(func=run_serve)


def expand_images(items: list[str]) -> list[str]:
    """Files, folders (recursive) and glob patterns -> image paths; a name that matches nothing is kept (and fails)."""
    from fruitlens.data.scan import is_image_file

    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_file(f)
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif not p.exists() and any(ch in item for ch in "*?["):
            out += sorted(glob.glob(item, recursive=True))
        else:
            out.append(item)
    return out


def run_predict(args) -> int:
    from fruitlens.inference.predictor import Predictor

    predictor = Predictor.load(args.model, args.engine)
    images = expand_images(args.images)
    if not images:
        raise DataError(f"no images found in {' '.join(args.images)}")
    failed = 0
    rows = []
    for path, pred in predictor.predict_many(images, args.top_k, args.batch_size):
        if isinstance(pred, ImageError):
            failed += 1
            if args.json:
                print(json.dumps({"path": path, "error": pred.message}))
            else:
                rows.append([path, "ERROR", "", pred.message])
            continue
        label = pred.label if pred.score >= args.unknown_threshold else "unknown"
        if args.json:
            print(json.dumps({"path": path, **pred.to_dict(), "label": label}))
        else:
            rows.append([path, label, f"{pred.score:.3f}", "  ".join(f"{lab} {s:.3f}" for lab, s in pred.top_k)])
    if not args.json:
        table(["image", "label", "prob", f"top-{args.top_k}"], rows)
        print(f"{len(images) - failed} predicted, {failed} failed ({predictor.engine})")
    return ExitCode.FINDINGS if failed else ExitCode.OK


def run_export(args) -> int:
    from fruitlens.pipelines.export import export

    res = export(args.run, int8=args.int8, opset=args.opset, bench=args.bench)
    print(f"wrote {res.onnx} (opset {res.opset}, {res.classes} classes, {res.image_size} px) and labels.txt")
    for name, p in res.parity.items():
        print(f"parity {name}: top-1 agreement {p['top1_agreement']:.2%} on {p['images']} validation images, "
              f"max |logit diff| {p['max_abs_logit_diff']:.2e}")
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

    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}", "use --workers 1 (the default) or more")
    settings = ServeSettings(str(Path(args.model).resolve()), top_k=args.top_k, threads=args.threads,
                             max_upload_mb=args.max_upload_mb, max_images=args.max_images).validated()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: the service is reachable from other machines", file=sys.stderr)
    predictor = Predictor.load(settings.model, threads=settings.threads)  # a bad model path fails here, clearly
    print(f"serving {args.model} ({predictor.engine}, {len(predictor.classes)} classes) on "
          f"http://{args.host}:{args.port} with {args.workers} worker(s)  (upload page /, API docs /docs)")
    if args.workers > 1:
        del predictor  # each worker process loads its own copy
        os.environ.update(settings.to_env())
        uvicorn.run("fruitlens.serve.app:app_from_env", factory=True, host=args.host, port=args.port,
                    workers=args.workers)
        return ExitCode.OK
    uvicorn.run(create_app(settings, predictor), host=args.host, port=args.port)
    return ExitCode.OK
