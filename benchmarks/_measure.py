"""Helpers for the benchmarks: run a command and measure wall time and the peak memory of its whole process tree.

``--smoke`` (any benchmark, or ``run_all.py --smoke`` for all of them): the same code on tiny data, so that a renamed
function, a changed signature or a changed report fails in seconds instead of rotting unseen. Parsed here, once, and
taken out of ``sys.argv`` so that each script reads its own arguments as before. Under it, ``OUT`` and ``RESULTS``
point into a scratch folder (the full runs' benchmarks/out/ and RESULTS.md are never written), ``data_path()`` gives
tiny stand-ins for the data sets, ``scratch()`` the scratch folder's run folders, ``pick()`` the few seeds and
recipes that run, and a command that fails stops the script.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
SHARED = ROOT.parent / "shared" / "data"
FRUITLENS = [sys.executable, "-m", "fruitlens"]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

SMOKE = "--smoke" in sys.argv[1:]
SMOKE_ENV = "FRUITLENS_BENCH_SMOKE_DIR"  # run_all.py --smoke: one scratch folder for all the scripts it runs
SMOKE_DIR: Path | None = None
if SMOKE:
    sys.argv.remove("--smoke")
    if os.environ.get(SMOKE_ENV):  # run_all.py, or a smoke run that started this one: their feature store too
        SMOKE_DIR = Path(os.environ[SMOKE_ENV])
        os.environ.setdefault("FRUITLENS_CACHE", str(SMOKE_DIR / "fruitlens-cache"))
    else:  # a script run alone: its own scratch folder and feature store (never the user's), removed when it ends
        SMOKE_DIR = Path(tempfile.mkdtemp(prefix="fruitlens-smoke-"))
        os.environ[SMOKE_ENV] = str(SMOKE_DIR)  # the scripts it starts (prerequisite()) share them
        os.environ["FRUITLENS_CACHE"] = str(SMOKE_DIR / "fruitlens-cache")
        atexit.register(shutil.rmtree, SMOKE_DIR, ignore_errors=True)
    OUT, RESULTS = SMOKE_DIR / "out", SMOKE_DIR / "RESULTS.md"
    os.environ.setdefault("FRUITLENS_TRACEBACK", "1")  # a failing command shows its stack
    # one thread: on a busy shared machine OpenMP's two threads wait on each other in every tiny op (the solver's
    # L-BFGS on a few hundred rows takes seconds instead of milliseconds); the figures are not the point here
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


SMOKE_SIZE = ["--img-size", "64"] if SMOKE else []  # appended to train and check --labels under --smoke (the last wins)


def pick(items, smoke: int | list[int] = 1, check=None) -> list:
    """All of ``items``; under --smoke the first ``smoke`` of them (or those at the indices ``smoke`` lists: seeds,
    sizes, recipes), and ``check(item)`` for each of the others (e.g. ``check_command`` of its command line, so that
    a recipe the smoke run skips still fails on a renamed option)."""
    items = list(items)
    if not SMOKE:
        return items
    keep = list(range(smoke)) if isinstance(smoke, int) else list(smoke)
    for i, item in enumerate(items):
        if i not in keep and check is not None:
            check(item)
    return [items[i] for i in keep]


def scratch(name: str) -> Path:
    """A benchmark's folder of runs in the temporary folder (``/tmp/NAME``); under --smoke, in the scratch folder, so
    that a smoke run never replaces what a full run left there."""
    return (SMOKE_DIR if SMOKE else Path(tempfile.gettempdir())) / name


SMOKE_CLASSES = ("Kiwi", "Lemon", "Orange", "Pear", "Strawberry")  # ../shared/data/smoke
SMOKE_GROCERY = ("Anjou", "Conference", "Kiwi", "Lemon", "Orange", "Banana")  # of those kinds, and one other


def data_path(name: str) -> Path:
    """``SHARED / name``; under --smoke a tiny stand-in with the same layout: ``fruits360`` -> ../shared/data/smoke
    (5 classes, Training/Test, 80/20 images), ``grocery`` -> 6 GroceryStore classes, 8 train and 2 val photos each
    (links to the real files), ``grocery-from-fruits360.json`` -> its entries for the smoke classes."""
    if not SMOKE:
        return SHARED / name
    if name == "fruits360":
        return SHARED / "smoke"
    # made once in the scratch folder, under a name of this process's first and then renamed: run_all.py runs
    # two scripts at a time, which may both ask for them first
    if name == "grocery":
        root = SMOKE_DIR / "data" / "grocery"
        if not root.exists():
            tmp = root.with_name(f"grocery.{os.getpid()}")
            for split, n in (("train", 8), ("val", 2)):
                for c in SMOKE_GROCERY:
                    (tmp / split / c).mkdir(parents=True, exist_ok=True)
                    for f in sorted((SHARED / "grocery" / split / c).glob("*.jpg"))[:n]:
                        (tmp / split / c / f.name).symlink_to(f.resolve())
            try:
                tmp.rename(root)
            except OSError:  # another script made it first
                shutil.rmtree(tmp, ignore_errors=True)
        return root
    if name == "grocery-from-fruits360.json":
        path = SMOKE_DIR / "data" / name
        if not path.exists():
            full = json.loads((SHARED / name).read_text())
            kept = {}
            for g, cs in full.items():
                cs = [c for c in ([cs] if isinstance(cs, str) else cs) if c in SMOKE_CLASSES]
                if cs:
                    kept[g] = cs[0] if isinstance(full[g], str) else cs
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{name}.{os.getpid()}")
            tmp.write_text(json.dumps(kept, indent=1))
            tmp.replace(path)
        return path
    raise KeyError(f"no smoke stand-in for {name}")


def check_command(cmd: list[str]) -> None:
    """--smoke, for the recipes a smoke run skips: ``cmd`` (a ``FRUITLENS`` command line) parsed as the CLI parses it,
    and a train command's config built and validated, without running anything; a renamed or removed option, config
    key or model fails here as it would in the full run."""
    sys.path.insert(0, str(ROOT / "src"))
    from fruitlens.cli.main import build_parser
    from fruitlens.cli.train_cmds import build_config
    from fruitlens.models.registry import check_options

    argv = cmd[len(FRUITLENS) :]
    args, extra = build_parser().parse_known_args(argv)  # argparse exits (status 2) naming a bad option
    if extra and not (hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra)):
        raise SystemExit(f"{' '.join(argv)}: unrecognized arguments {extra}")
    if args.command == "train":
        args.overrides = list(args.overrides or []) + extra
        cfg = build_config(args)
        check_options(cfg.model.name, cfg.model.weights)
    print("checked (not run under --smoke):", " ".join(argv), flush=True)


def prerequisite(script: str, *args: str) -> None:
    """--smoke: runs another benchmark's smoke mode into the same scratch folder (what a full run expects to have
    been run before: bench_train.py before bench_infer.py, bench_trust.py before bench_soak.py)."""
    print(f"(--smoke: running {' '.join([script, *args])} --smoke first)", flush=True)
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--smoke"], check=True, cwd=ROOT / "benchmarks"
    )


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
    """Runs ``cmd``; returns wall seconds, peak PSS of the process tree (MiB, sampled every 0.1 s or, for a large
    tree, at 5% of a core) and output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0]
    done = threading.Event()

    def sample():
        # reading a large process's smaps_rollup walks its page tables (at 100,000 images it took a fifth of a core at
        # 10 samples a second, time the measured command lost on 2 cores): sample at most every 0.1 s, and less often
        # where a sample costs more than 5% of the interval
        while not done.is_set():
            t = time.perf_counter()
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            done.wait(max(0.1, 20 * (time.perf_counter() - t)))

    threading.Thread(target=sample, daemon=True).start()
    out, _ = proc.communicate(timeout=timeout)
    done.set()
    wall = time.perf_counter() - t0
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out)
    if SMOKE and proc.returncode:  # a full run records the exit status in its figures; a smoke run fails on it
        raise SystemExit(f"{' '.join(cmd)}\nfailed with exit status {proc.returncode}:\n{out[-4000:]}")
    return {
        "cmd": " ".join(c if " " not in c else repr(c) for c in cmd).replace(sys.executable, "python"),
        "rc": proc.returncode,
        "seconds": round(wall, 1),
        "peak_mib": round(peak[0] / 1024),
        "output": out,
    }


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def save(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def write_section(name: str, markdown: str) -> None:
    """Puts ``markdown`` into RESULTS.md between ``<!-- name -->`` markers (replacing what a previous run put there,
    appending the first time), so that each benchmark rewrites its own section and leaves the others as measured."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# fruitlens benchmark results\n"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
