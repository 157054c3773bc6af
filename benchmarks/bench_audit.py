"""Label audit: flip 5% of the labels at random (seeded, in a manifest CSV made here; the images stay where they
are) and measure how many flips ``fruitlens check --labels`` finds: precision and recall at the list's own cut and
at the top N (N = the number of flips), with the time. GroceryStore train and Fruits-360 Training."""
from __future__ import annotations

import csv
import json
import os
import random
import sys
import tempfile
from pathlib import Path

from _measure import FRUITLENS, OUT, SHARED, machine, run, save, write_section


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
    listed = [i["path"] for i in out["label_issues"]]  # ranked: copies under another label first, then the rest
    row = {"cmd": r["cmd"].replace(str(tmp), "TMP"), "seconds": r["seconds"], "peak_mib": r["peak_mib"],
           "images": out["summary"]["usable"], "flips": len(flips), "listed": len(listed),
           "audit_seconds": out["label_audit"]["seconds"], "method": out["label_audit"]["method"]}
    for kind in ("label", "conflict"):
        found = [i["path"] for i in out["label_issues"] if i["kind"] == kind]
        row[kind] = {"listed": len(found), "flips": sum(p in flips for p in found)}
    hits = sum(p in flips for p in listed)
    row.update(precision=hits / max(1, len(listed)), recall=hits / max(1, len(flips)),
               top_n_precision=sum(p in flips for p in listed[:len(flips)]) / max(1, len(flips)))
    print(name, json.dumps(row), flush=True)
    return row


def markdown(res: dict) -> str:
    lines = ["## Label audit: 5% of the labels flipped at random (`python benchmarks/bench_audit.py`)", "",
             f"Measured {res['machine']['date']}. A manifest of every image with 5% of the labels changed to another "
             "class at random (seeded; the images stay where they are), then `fruitlens check MANIFEST --labels`. "
             "Precision: the share of the listed images that were flipped; recall: the share of the flips listed; "
             "top-N: precision of the first N listed, N = the number of flips. The second GroceryStore row is the "
             "same command again, with the features from the feature store.", "",
             "| data | images | flips | listed (copies under another label / confident learning) | precision | "
             "recall | top-N precision | wall s | audit s | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, name in (("grocery", "GroceryStore train"), ("grocery_again", "GroceryStore train, again"),
                      ("fruits360", "Fruits-360 Training")):
        r = res.get(key)
        if r:
            lines.append(f"| {name} | {r['images']:,} | {r['flips']} | {r['listed']} ({r['conflict']['listed']} / "
                         f"{r['label']['listed']}) | {100 * r['precision']:.1f}% | {100 * r['recall']:.1f}% | "
                         f"{100 * r['top_n_precision']:.1f}% | {r['seconds']} | {r['audit_seconds']} | {r['peak_mib']} |")
    lines += ["", f"Method: {res['fruits360']['method']}." if res.get("fruits360") else ""]
    return "\n".join(lines)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fruitlens-audit-"))
    os.environ["FRUITLENS_CACHE"] = str(tmp / "cache")  # a fresh feature store: the first run computes them all
    res = {"machine": machine()}
    res["grocery"] = measure("grocery_train", SHARED / "grocery" / "train", tmp)
    res["grocery_again"] = measure("grocery_train_again", SHARED / "grocery" / "train", tmp)  # the feature store
    res["fruits360"] = measure("fruits360_training", SHARED / "fruits360" / "Training", tmp)
    save("audit", res)
    write_section("audit", markdown(res))


if __name__ == "__main__":
    sys.exit(main())
