"""Test accuracy of a run's fine-tune checkpoints (best and last), also where the run kept its head-only weights
because fine-tuning did not lower the validation loss. Usage: python benchmarks/eval_finetune.py RUN_DIR"""
import json, shutil, sys
from pathlib import Path

import torch

from fruitlens.evaluation.report import evaluate_run
from fruitlens.rundir import load_model

src = Path(sys.argv[1])
out = {}
for which in ("best.ckpt", "last.ckpt"):
    f = src / "checkpoints/fine-tune" / which
    if not f.exists():
        continue
    dst = Path(f"/tmp/evalft_{src.name}_{which}")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache", "fine-tune", "head", "export"))
    model, classes, ck = load_model(dst / "checkpoints/best.ckpt")
    lt = torch.load(f, map_location="cpu", weights_only=False)
    model.load_state_dict({k[4:]: v for k, v in lt["state_dict"].items() if k.startswith("net.")})
    ck["state_dict"] = model.state_dict()
    torch.save(ck, dst / "checkpoints/best.ckpt")
    rep = evaluate_run(dst)
    out[which] = {"epoch": lt.get("epoch"), "test_acc": rep["metrics"]["accuracy"]}
print("FT", src.name, json.dumps(out))
