"""Runs the core benchmarks in order and writes their sections of benchmarks/RESULTS.md (about 80 minutes on two CPU
cores). The others run one at a time, each writing its own section: bench_domain.py (studio shots and photos, about
60 minutes), bench_augment.py, bench_layers.py, bench_concepts.py, bench_priors.py and bench_lpft.py (photo-like
augmentation, adaptation, features, ImageNet's judgement and fine-tuning for photos, on a subset of Fruits-360),
bench_photos.py (GroceryStore's photos: test-time flips, views, input size, layers) and bench_photos_ft.py (the top
fine-tuned on cached maps, LP-FT, WiSE-FT), bench_labels.py (a few labels),
``bench_train.py layers`` (the last layer against block 17 on GroceryStore's photos, 3 seeds each), bench_trust.py,
bench_speed.py, bench_audit.py, bench_scale.py and bench_soak.py.

``--smoke`` (``make bench-smoke``, run by CI): every benchmark above, and eval_finetune.py, in its smoke mode (the
same code on tiny data: ../shared/data/smoke and slices of the other data sets, one seed, tiny budgets; see
_measure.py), so that a benchmark the library's changes broke fails here instead of rotting unseen. Two scripts run
at a time (``--jobs N``; each is mostly one busy process), each one's output going to a log in one scratch folder;
it writes nothing into benchmarks/out/ or RESULTS.md, prints each script's wall time and exits non-zero naming the
scripts that failed, with their logs (the scratch folder is then kept)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORE = (
    ("bench_train.py", ["fruits360"]),
    ("bench_infer.py", []),
    ("bench_data.py", []),
    ("bench_train.py", ["grocery"]),
    ("bench_train.py", ["seeds"]),
    ("write_results.py", []),
)
SMOKE = (  # (script, arguments, the smoke runs it reads the runs or figures of); the longest first
    ("bench_train.py", ["all"], ()),
    ("bench_trust.py", [], ()),
    ("bench_scale.py", [], ()),
    ("bench_speed.py", [], ()),
    ("bench_infer.py", [], ("bench_train.py all",)),
    ("bench_domain.py", [], ()),
    ("bench_train.py", ["layers"], ()),
    ("bench_labels.py", ["cli"], ()),
    ("bench_data.py", [], ()),
    ("eval_finetune.py", [], ("bench_train.py all",)),
    ("bench_audit.py", [], ()),
    ("bench_augment.py", [], ()),
    ("bench_soak.py", [], ("bench_trust.py",)),
    ("bench_labels.py", [], ()),
    ("bench_photos.py", [], ()),
    ("bench_photos_ft.py", [], ()),
    ("bench_layers.py", [], ()),
    ("bench_concepts.py", [], ()),
    ("bench_priors.py", [], ()),
    ("bench_lpft.py", [], ()),
    ("write_results.py", [], ("bench_train.py all", "bench_infer.py", "bench_data.py")),
)
SMOKE_TIMEOUT = 600  # seconds for one script's smoke run: a hang fails it instead of holding CI


def _smoke_script(script: str, args: list[str], env: dict, log: Path) -> str | None:
    """Runs one script's smoke mode with its output in ``log``; None when it passed, else why not."""
    with log.open("w") as fh:
        # a session of its own: on a timeout the script goes with what it started (servers, DDP processes)
        proc = subprocess.Popen(
            [sys.executable, str(HERE / script), *args, "--smoke"],
            cwd=HERE,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=SMOKE_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"timed out after {SMOKE_TIMEOUT} s"
    return f"exit status {rc}" if rc else None


def smoke(jobs: int) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="fruitlens-smoke-"))
    (scratch / "logs").mkdir()
    pending = [(" ".join([script, *args]), script, args, after) for script, args, after in SMOKE]
    done: dict[str, tuple[float, str | None]] = {}
    ready = threading.Condition()
    print(f"benchmark smoke runs, {jobs} at a time (wall seconds; logs in {scratch / 'logs'}):", flush=True)

    def worker(i: int) -> None:
        # one scratch folder for all; a feature store for each worker (two processes never write one file)
        env = {
            **os.environ,
            "FRUITLENS_BENCH_SMOKE_DIR": str(scratch),
            "FRUITLENS_CACHE": str(scratch / f"fruitlens-cache-{i}"),
        }
        while True:
            with ready:
                while True:
                    job = next((j for j in pending if all(a in done for a in j[3])), None)
                    if job is not None or not pending:
                        break
                    ready.wait()
                if job is None:
                    return
                pending.remove(job)
            name, script, args, _ = job
            t = time.perf_counter()
            error = _smoke_script(script, args, env, scratch / "logs" / f"{name.replace(' ', '_')}.log")
            with ready:
                done[name] = (time.perf_counter() - t, error)
                print(f"{done[name][0]:6.1f} s  {name}" + (f"  FAILED ({error})" if error else ""), flush=True)
                ready.notify_all()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{time.perf_counter() - t0:6.1f} s  in all ({sum(s for s, _ in done.values()):.1f} s of scripts)")
    failed = [(name, error) for name, (_, error) in done.items() if error]
    for name, error in failed:
        log = scratch / "logs" / f"{name.replace(' ', '_')}.log"
        print(f"\n===== {name} --smoke FAILED ({error}); its output ({log}):\n{log.read_text()}", file=sys.stderr)
    if failed:
        print(f"\nFAILED: {', '.join(name for name, _ in failed)} (scratch folder kept: {scratch})", file=sys.stderr)
        return 1
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


def main() -> int:
    if "--smoke" in sys.argv[1:]:
        jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 2
        return smoke(jobs)
    for script, args in CORE:
        print(f"== {script} {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *args], check=True, cwd=HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
