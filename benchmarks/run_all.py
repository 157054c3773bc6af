"""Runs every benchmark in order and writes benchmarks/RESULTS.md (about 80 minutes on two CPU cores)."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script, args in (("bench_train.py", ["fruits360"]), ("bench_infer.py", []), ("bench_data.py", []),
                     ("bench_train.py", ["grocery"]), ("bench_train.py", ["seeds"]),
                     ("write_results.py", [])):
    print(f"== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True, cwd=HERE)
