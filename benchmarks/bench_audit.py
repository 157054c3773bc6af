"""Label audit: flip 5% of the labels at random (seeded, in a manifest CSV made here; the images stay where they
are) and measure how many flips ``fruitlens check --labels`` finds: precision and recall at the list's own cut and
at the top N (N = the number of flips), with the time. GroceryStore train and Fruits-360 Training."""
from __future__ import annotations

import csv
import json
import random
import sys
import tempfile
from pathlib import Path

from _measure import FRUITLENS, OUT, SHARED, machine, run, save


def flipped_manifest(data: Path, out: Path, share: float = 0.05, seed: int = 0) -> set[str]:
    """Writes a manifest of every image of ``data`` with ``share`` of the labels changed; returns the flipped paths."""
    rows = [(str(p.resolve()), p.parent.name) for p in sorted(data.rglob("*.jpg"))]
    classes = sorted({lab for _, lab in rows})
    rng = random.Random(seed)
    flipped = set(rng.sample(range(len(rows)), round(share * len(rows))))
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for i, (path, label) in enumerate(rows):
            w.writerow([path, rng.choice([c for c in classes if c != label]) if i in flipped else label])
    return {rows[i][0] for i in flipped}


def measure(name: str, data: Path, tmp: Path) -> dict:
    manifest = tmp / f"{name}.csv"
    flips = flipped_manifest(data, manifest)
    r = run(FRUITLENS + ["check", str(manifest), "--labels", "--json", "--audit-out", str(tmp / name)],
            OUT / f"audit_{name}.log")
    out = json.loads(r["output"][r["output"].index("{"):])
    found = [i["path"] for i in out["label_issues"] if i["kind"] == "label"]
    hits = sum(p in flips for p in found)
    top = set(found[:len(flips)])
    row = {"cmd": r["cmd"], "seconds": r["seconds"], "peak_mib": r["peak_mib"], "images": out["summary"]["usable"],
           "flips": len(flips), "listed": len(found), "precision": hits / max(1, len(found)),
           "recall": hits / len(flips), "top_n_precision": len(top & flips) / len(flips),
           "audit_seconds": out["label_audit"]["seconds"]}
    print(name, json.dumps(row), flush=True)
    return row


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fruitlens-audit-"))
    res = {"machine": machine()}
    res["grocery"] = measure("grocery_train", SHARED / "grocery" / "train", tmp)
    res["grocery_again"] = measure("grocery_train_again", SHARED / "grocery" / "train", tmp)  # the feature store
    res["fruits360"] = measure("fruits360_training", SHARED / "fruits360" / "Training", tmp)
    save("audit", res)


if __name__ == "__main__":
    sys.exit(main())
