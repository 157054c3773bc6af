"""Helpers for the benchmarks: run a command and measure wall time and the peak memory of its whole process tree."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
SHARED = ROOT.parent / "shared" / "data"
FRUITLENS = [sys.executable, "-m", "fruitlens"]


def _tree_rss_kb(pid: int) -> int:
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            # PSS shares pages between forked workers fairly; a plain RSS sum would count torch once per worker
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    stack += [int(c) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run(cmd: list[str], log: Path | None = None, timeout: float = 3600) -> dict:
    """Runs ``cmd``; returns wall seconds, peak PSS of the process tree (MiB, sampled every 0.1 s) and output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    out, _ = proc.communicate(timeout=timeout)
    done.set()
    wall = time.perf_counter() - t0
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out)
    return {"cmd": " ".join(c if " " not in c else repr(c) for c in cmd).replace(sys.executable, "python"),
            "rc": proc.returncode, "seconds": round(wall, 1), "peak_mib": round(peak[0] / 1024), "output": out}


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def save(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def write_section(name: str, markdown: str) -> None:
    """Puts ``markdown`` into RESULTS.md between ``<!-- name -->`` markers (replacing what a previous run put there,
    appending the first time), so that each benchmark rewrites its own section and leaves the others as measured."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# fruitlens benchmark results\n"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
