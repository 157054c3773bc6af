"""Evaluate, export (parity, speed), the predict path on decoded images, and the web service under load."""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from _measure import FRUITLENS, OUT, ROOT, SMOKE, data_path, machine, prerequisite, run, save, scratch

RUN = scratch("fruitlens-bench-runs") / "f360_default"


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _tree_rss_mib(pid: int) -> float:
    """RSS of a process and its children (the workers of ``serve --workers N``)."""
    pids, total = [pid], 0.0
    while pids:
        p = pids.pop()
        total += _rss_mib(p)
        for task in Path(f"/proc/{p}/task").iterdir():
            pids += [int(x) for x in (task / "children").read_text().split()]
    return total


def predict_path(run_dir: Path, rounds: int = 5) -> dict:
    """Images/s at batch 32 on already decoded PIL images through ``Predictor.predict`` (resize, crop, normalise,
    model, softmax): PyTorch eager (NCHW, as a plain port runs it), fruitlens's PyTorch engine (channels_last) and
    ONNX Runtime fp32/int8. The engines take turns for ``rounds`` rounds and each figure is the median, because
    this shared 2-core machine drifts by 20-30% over a minute."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from PIL import Image

    from fruitlens.inference.predictor import Predictor
    from fruitlens.models.checkpoint import load_model

    files = sorted((data_path("fruits360") / "Test").rglob("*.jpg"))[:512]
    images = [Image.open(f).convert("RGB") for f in files]
    ckpt = load_model(run_dir / "checkpoints" / "best.ckpt")
    model = ckpt.model

    @torch.inference_mode()
    def eager(x):
        return {"logits": model(torch.from_numpy(x)).numpy()}

    engines = {
        "pytorch eager (NCHW)": Predictor(eager, ckpt.classes, model.preprocessing, "pytorch"),
        "pytorch channels_last (fruitlens torch engine)": Predictor.from_run(run_dir, engine="torch"),
        "onnxruntime fp32": Predictor.from_onnx(run_dir / "export" / "model.onnx"),
        "onnxruntime int8": Predictor.from_onnx(run_dir / "export" / "model.int8.onnx"),
    }
    speeds: dict[str, list[float]] = {k: [] for k in engines}
    labels = {}
    for pred in engines.values():
        pred.predict(images[:64])
    for _ in range(rounds):
        for name, pred in engines.items():
            t = time.perf_counter()
            labels[name] = [p.label for p in pred.predict(images, batch_size=32)]
            speeds[name].append(len(images) / (time.perf_counter() - t))
    ref = labels["pytorch eager (NCHW)"]
    out = {
        name: {
            "img_per_s": round(statistics.median(v), 1),
            "all_rounds": [round(x) for x in v],
            "top1_agreement_with_pytorch": sum(a == b for a, b in zip(ref, labels[name])) / len(ref),
        }
        for name, v in speeds.items()
    }
    fp32 = out["onnxruntime fp32"]["img_per_s"]
    out["speedup_fp32_vs_pytorch_eager"] = round(fp32 / out["pytorch eager (NCHW)"]["img_per_s"], 2)
    out["speedup_fp32_vs_pytorch_channels_last"] = round(
        fp32 / out["pytorch channels_last (fruitlens torch engine)"]["img_per_s"], 2
    )
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multipart(data: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (
        (
            f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="f.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{b}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={b}"


def start_server(run_dir: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """``fruitlens serve RUN`` on a free loopback port, once /health answers."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    log = subprocess.DEVNULL
    if SMOKE:  # what the server says, where a smoke run fails on it
        OUT.mkdir(parents=True, exist_ok=True)
        log = (OUT / f"serve_{port}.log").open("w")
    server = subprocess.Popen(
        FRUITLENS + ["serve", str(run_dir), "--port", str(port), *args], env=env, stdout=log, stderr=log
    )
    for _ in range(300):
        if server.poll() is not None:
            sys.exit(
                f"fruitlens serve {run_dir} {' '.join(args)} exited with status {server.returncode}"
                + (f":\n{(OUT / f'serve_{port}.log').read_text()[-3000:]}" if SMOKE else "")
            )
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                break
        except OSError:
            time.sleep(0.2)
    return server, port


def serve_load(run_dir: Path, seconds: float = 30, clients: int = 8, workers: int = 1) -> dict:
    """``clients`` threads post one Fruits-360 JPEG each in a loop for ``seconds`` (loopback only)."""
    server, port = start_server(run_dir, "--workers", str(workers))
    try:
        files = sorted((data_path("fruits360") / "Test").rglob("*.jpg"))[:64]
        payloads = [_multipart(f.read_bytes()) for f in files]
        # warm up, then memory before
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for body, ctype in payloads[:16]:
            c.request("POST", "/predict", body, {"Content-Type": ctype})
            c.getresponse().read()
        rss_before = _tree_rss_mib(server.pid)
        lat: list[float] = []
        errors = [0]
        stop = time.perf_counter() + seconds
        lock = threading.Lock()

        def client(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            k = i
            while time.perf_counter() < stop:
                body, ctype = payloads[k % len(payloads)]
                k += clients
                t = time.perf_counter()
                try:
                    conn.request("POST", "/predict", body, {"Content-Type": ctype})
                    resp = conn.getresponse()
                    resp.read()
                    ok = resp.status == 200
                except OSError:
                    ok = False
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                with lock:
                    lat.append(time.perf_counter() - t)
                    errors[0] += not ok

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_after = _tree_rss_mib(server.pid)
        q = statistics.quantiles(lat, n=100)
        return {
            "workers": workers,
            "clients": clients,
            "seconds": round(wall, 1),
            "requests": len(lat),
            "errors": errors[0],
            "req_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(1000 * q[49], 1),
            "p95_ms": round(1000 * q[94], 1),
            "p99_ms": round(1000 * q[98], 1),
            "rss_before_mib": round(rss_before),
            "rss_after_mib": round(rss_after),
        }
    finally:
        server.terminate()
        server.wait(timeout=20)


def main() -> None:
    if SMOKE and not (RUN / "report.json").exists():
        prerequisite("bench_train.py", "fruits360_default")
    if not (RUN / "report.json").exists():
        sys.exit(f"{RUN} is missing: run benchmarks/bench_train.py fruits360 first")
    res: dict = {"machine": machine(), "run": "runs/f360_default (fruitlens default recipe on Fruits-360, 96 px)"}
    r = run(FRUITLENS + ["evaluate", str(RUN)], OUT / "evaluate.log")
    res["evaluate"] = {
        "cmd": r["cmd"].replace(str(RUN), "runs/f360_default"),
        "seconds": r["seconds"],
        "peak_mib": r["peak_mib"],
        "rc": r["rc"],
    }
    # --smoke: no speed figures, 10 s of the smoke run's few minutes (fruitlens demo in bench_speed.py measures them)
    r = run(
        FRUITLENS + ["export", str(RUN), "--format", "onnx", "--int8"] + (["--no-bench"] if SMOKE else []),
        OUT / "export.log",
    )
    res["export"] = {
        "cmd": r["cmd"].replace(str(RUN), "runs/f360_default"),
        "seconds": r["seconds"],
        "rc": r["rc"],
        **json.loads((RUN / "export" / "export.json").read_text()),
    }
    res["predict_path"] = predict_path(RUN, rounds=1 if SMOKE else 5)
    seconds = 2 if SMOKE else 30
    res["serve"] = serve_load(RUN, seconds)
    res["serve_workers2"] = serve_load(RUN, seconds, workers=2)
    if SMOKE and any(res[k]["errors"] for k in ("serve", "serve_workers2")):
        sys.exit(f"the server answered with errors: {res['serve']}, {res['serve_workers2']}")
    save("infer", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
