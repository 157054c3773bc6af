"""Test accuracy of a run's fine-tune checkpoints (best and last), also where the run kept its head-only weights
because fine-tuning did not lower the validation loss: ``fruitlens evaluate RUN`` scores the weights the run kept,
this scores the fine-tuned ones it may have set aside (gpu_check.sh runs it after each fine-tuning run). Each
checkpoint's weights go into a copy of the run, which ``fruitlens evaluate`` then scores on the run's test split.
Accuracy only: the copy keeps the run's temperature and thresholds, fitted for the kept weights.

Usage: python benchmarks/eval_finetune.py RUN_DIR
``--smoke`` (RUN_DIR optional): the fine-tuned run of ``bench_train.py --smoke`` where it is in the scratch folder,
else a tiny run with one fine-tuning epoch trained on ../shared/data/smoke first."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from _measure import FRUITLENS, SMOKE, SMOKE_SIZE, data_path, run, scratch


def with_weights(src: Path, ckpt: Path) -> tuple[Path, int | None]:
    """A copy of run ``src`` whose checkpoints/best.ckpt carries the weights of the Lightning checkpoint ``ckpt``,
    and the epoch it was written at."""
    dst = scratch(f"evalft_{src.name}_{ckpt.name}")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache", "fine-tune", "head", "export", "eval"))
    kept = torch.load(dst / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)  # the run's model
    tuned = torch.load(ckpt, map_location="cpu", weights_only=True)  # Lightning's: the module's net under "net."
    weights = {k.removeprefix("net."): v for k, v in tuned["state_dict"].items() if k.startswith("net.")}
    unknown = sorted(set(weights) - set(kept["state_dict"]))
    if not weights or unknown:
        raise SystemExit(
            f"{ckpt}: its weights do not fit the run's model ({len(weights)} under 'net.', "
            f"unknown to the model: {unknown[:5]})"
        )
    kept["state_dict"] = {**kept["state_dict"], **weights}  # the OOD bank and anything else the run added stay
    torch.save(kept, dst / "checkpoints" / "best.ckpt")
    return dst, tuned.get("epoch")


def main() -> None:
    if SMOKE and len(sys.argv) < 2:
        src = scratch("fruitlens-bench-runs") / "g_mnv2_ft"  # bench_train.py --smoke's
        if not (src / "checkpoints" / "fine-tune" / "best.ckpt").exists():
            src = scratch("fruitlens-bench-finetune") / "smoke_ft"
            shutil.rmtree(src, ignore_errors=True)
            run(
                FRUITLENS
                + [
                    "train",
                    str(data_path("fruits360")),
                    "--out",
                    str(src),
                    "--target-acc",
                    "0",
                    "--fine-tune-blocks",
                    "1",
                    "--fine-tune-epochs",
                    "1",
                ]
                + SMOKE_SIZE
            )
    else:
        src = Path(sys.argv[1])
    out = {}
    for which in ("best.ckpt", "last.ckpt"):
        f = src / "checkpoints" / "fine-tune" / which
        if not f.exists():
            continue
        dst, epoch = with_weights(src, f)
        r = run(FRUITLENS + ["evaluate", str(dst)])
        if r["rc"]:
            raise SystemExit(f"fruitlens evaluate {dst} failed:\n{r['output'][-3000:]}")
        rep = json.loads((dst / "report.json").read_text())
        out[which] = {"epoch": epoch, "test_acc": rep["metrics"]["accuracy"]}
    if SMOKE and len(out) < 2:
        raise SystemExit(f"{src / 'checkpoints' / 'fine-tune'}: no best.ckpt and last.ckpt to evaluate")
    print("FT", src.name, json.dumps(out))


if __name__ == "__main__":
    main()
