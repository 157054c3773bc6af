"""Runs the core benchmarks in order and writes their sections of benchmarks/RESULTS.md (about 80 minutes on two CPU
cores). The others run one at a time, each writing its own section: bench_domain.py (studio shots and photos, about
60 minutes), bench_augment.py, bench_layers.py, bench_concepts.py, bench_priors.py and bench_lpft.py (photo-like
augmentation, adaptation, features, ImageNet's judgement and fine-tuning for photos, on a subset of Fruits-360),
``bench_train.py layers`` (the last layer against block 17 on GroceryStore's photos, 3 seeds each), bench_trust.py,
bench_speed.py, bench_audit.py, bench_scale.py and bench_soak.py."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script, args in (("bench_train.py", ["fruits360"]), ("bench_infer.py", []), ("bench_data.py", []),
                     ("bench_train.py", ["grocery"]), ("bench_train.py", ["seeds"]),
                     ("write_results.py", [])):
    print(f"== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True, cwd=HERE)
