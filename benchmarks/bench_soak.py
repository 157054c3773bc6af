"""Soak (issue 17): 8 loopback clients post for 5 minutes against ``fruitlens serve``, 5% of the requests hostile
(truncated JPEG, a text file, a 1x20000 strip, a decompression bomb, an upload over the size limit, broken JSON);
every answer must be the expected status (200, or the 4xx that names the problem) and the server's memory must level
off. For a 96 px model (Fruits-360) and a 448 px one (GroceryStore); the trust benchmark's runs are reused."""

from __future__ import annotations

import http.client
import io
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

from PIL import Image

from _measure import SMOKE, data_path, machine, prerequisite, save, scratch, write_section
from bench_infer import _multipart, _tree_rss_mib, start_server

RUNS = scratch("fruitlens-bench-trust")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def hostile() -> list[tuple[str, bytes, str, tuple[int, ...]]]:
    """(name, body, content type, statuses that are right) of each hostile request."""
    jpeg = next((data_path("fruits360") / "Test").rglob("*.jpg")).read_bytes()
    bomb = Image.new("1", (30000, 30000))  # 900 megapixels, a few hundred KB as PNG
    cases = [
        ("truncated JPEG", _multipart(jpeg[: len(jpeg) // 3]), (422,)),
        ("text file", _multipart(b"not an image at all\n" * 50), (415, 422)),
        ("1x20000 strip", _multipart(_png(Image.new("RGB", (1, 20000), (255, 0, 0)))), (422,)),
        ("decompression bomb", _multipart(_png(bomb)), (413, 422)),
        ("11 MB upload", _multipart(os.urandom(11 * 2**20)), (413,)),
    ]
    out = [(name, body, ctype, ok) for name, (body, ctype), ok in cases]
    out.append(("broken JSON", b'{"image": "!!!not base64', "application/json", (422,)))
    return out


def soak(run_dir: Path, seconds: float = 300, clients: int = 8, hostile_share: float = 0.05) -> dict:
    server, port = start_server(run_dir)
    try:
        good = [_multipart(f.read_bytes()) for f in sorted((data_path("grocery") / "val").rglob("*.jpg"))[:48]]
        good += [_multipart(f.read_bytes()) for f in sorted((data_path("fruits360") / "Test").rglob("*.jpg"))[:48]]
        bad = hostile()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for body, ctype in good[:16]:  # warm up
            c.request("POST", "/predict", body, {"Content-Type": ctype})
            c.getresponse().read()
        memory = [(0.0, _tree_rss_mib(server.pid))]
        stats = {"ok": 0, "hostile_right": 0, "wrong": 0, "lat": [], "wrong_examples": []}
        lock = threading.Lock()
        t0 = time.perf_counter()
        stop = t0 + seconds

        def client(i: int) -> None:
            rng = random.Random(i)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            while time.perf_counter() < stop:
                if rng.random() < hostile_share:
                    name, body, ctype, expect = rng.choice(bad)
                else:
                    (body, ctype), name, expect = rng.choice(good), "photo", (200,)
                t = time.perf_counter()
                try:
                    conn.request("POST", "/predict", body, {"Content-Type": ctype})
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                except OSError as exc:
                    status = f"connection error ({exc.__class__.__name__})"
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                with lock:
                    if status in expect:
                        stats["ok" if name == "photo" else "hostile_right"] += 1
                        if name == "photo":
                            stats["lat"].append(time.perf_counter() - t)
                    else:
                        stats["wrong"] += 1
                        if len(stats["wrong_examples"]) < 10:
                            stats["wrong_examples"].append(f"{name}: {status}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(min(10, seconds / 4))
            memory.append((round(time.perf_counter() - t0), _tree_rss_mib(server.pid)))
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        q = statistics.quantiles(stats["lat"], n=100)
        half = [m for s, m in memory if s >= seconds / 2]
        return {
            "seconds": round(wall),
            "clients": clients,
            "requests": stats["ok"] + stats["hostile_right"] + stats["wrong"],
            "photos_answered": stats["ok"],
            "hostile_refused_right": stats["hostile_right"],
            "wrong_answers": stats["wrong"],
            "wrong_examples": stats["wrong_examples"],
            "req_per_s": round((stats["ok"] + stats["hostile_right"] + stats["wrong"]) / wall, 1),
            "p50_ms": round(1000 * q[49], 1),
            "p95_ms": round(1000 * q[94], 1),
            "p99_ms": round(1000 * q[98], 1),
            "memory_mib": [(s, round(m)) for s, m in memory],
            "memory_start_mib": round(memory[0][1]),
            "memory_peak_mib": round(max(m for _, m in memory)),
            "memory_second_half_growth_mib": round(half[-1] - half[0]) if len(half) > 1 else None,
            "server_alive": server.poll() is None,
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def markdown(res: dict) -> str:
    lines = [
        "## Soak: 5 minutes of 8 clients, 5% hostile requests (`python benchmarks/bench_soak.py`)",
        "",
        f"Measured {res['machine']['date']}. `fruitlens serve RUN` (one worker) on loopback; the photos are "
        "GroceryStore and Fruits-360 JPEGs; the hostile requests are a truncated JPEG, a text file, a 1x20000 "
        "strip, a 900-megapixel decompression bomb, an 11 MB upload and broken JSON, each of which must get its "
        "4xx. Memory is the server's PSS, sampled every 10 s.",
        "",
        "| model | requests | req/s | photos answered | hostile refused with the right 4xx | wrong answers | "
        "p50 / p95 / p99 ms | memory start -> peak MiB | growth over the second half MiB | server alive |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["runs"].items():
        lines.append(
            f"| {name} | {r['requests']} | {r['req_per_s']} | {r['photos_answered']} | "
            f"{r['hostile_refused_right']} | {r['wrong_answers']} | {r['p50_ms']} / {r['p95_ms']} / "
            f"{r['p99_ms']} | {r['memory_start_mib']} -> {r['memory_peak_mib']} | "
            f"{r['memory_second_half_growth_mib']} | {'yes' if r['server_alive'] else 'NO'} |"
        )
    wrong = [e for r in res["runs"].values() for e in r["wrong_examples"]]
    if wrong:
        lines += ["", "Wrong answers: " + "; ".join(wrong)]
    return "\n".join(lines)


def main(seconds: float = 300) -> None:
    runs = {"Fruits-360 model, 96 px": RUNS / "f360", "GroceryStore model, 448 px": RUNS / "g_visual_0"}
    if SMOKE and not all((r / "export" / "model.onnx").exists() for r in runs.values()):
        prerequisite("bench_trust.py")
    for run_dir in runs.values():
        if not (run_dir / "export" / "model.onnx").exists():
            sys.exit(f"{run_dir} is missing: run benchmarks/bench_trust.py first")
    res = {"machine": machine(), "runs": {}}
    for name, run_dir in runs.items():
        res["runs"][name] = soak(run_dir, seconds)
        print(name, json.dumps({k: v for k, v in res["runs"][name].items() if k != "memory_mib"}), flush=True)
        if SMOKE and (res["runs"][name]["wrong_answers"] or not res["runs"][name]["server_alive"]):
            sys.exit(
                f"{name}: wrong answers {res['runs'][name]['wrong_examples']}, "
                f"server alive: {res['runs'][name]['server_alive']}"
            )
    save("soak", res)
    write_section("soak", markdown(res))


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 3 if SMOKE else 300))
