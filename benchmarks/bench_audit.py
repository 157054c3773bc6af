"""Label audit (issue 37): on clean data (as it comes), and with 2% and 5% of the labels flipped at random (seeded,
in a manifest CSV made here; the images stay where they are), what ``fruitlens check --labels`` lists: the number and
share listed, precision and recall at the list's own cut and at the top N (N = the number of flips), the expected
precision the audit states, the class pairs it calls look-alike, and the time. GroceryStore train and Fruits-360
Training. ``python benchmarks/bench_audit.py`` (about 20 min on 2 cores)."""

from __future__ import annotations

import csv
import json
import os
import random
import sys
import tempfile
from pathlib import Path

from _measure import FRUITLENS, OUT, SMOKE, SMOKE_DIR, SMOKE_SIZE, data_path, machine, run, save, write_section

SHARES = (0.05,) if SMOKE else (0.0, 0.02, 0.05)  # of the labels flipped


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


def measure(name: str, data: Path, tmp: Path, share: float = 0.05) -> dict:
    manifest = tmp / f"{name}.csv"
    flips = flipped_manifest(data, manifest, share)
    r = run(
        FRUITLENS + ["check", str(manifest), "--labels", "--json", "--audit-out", str(tmp / name)] + SMOKE_SIZE,
        OUT / f"audit_{name}.log",
    )
    out = json.loads(r["output"][r["output"].index("{") :])
    listed = [i["path"] for i in out["label_issues"]]  # ranked: copies under another label first, then the rest
    row = {
        "cmd": r["cmd"].replace(str(tmp), "TMP"),
        "seconds": r["seconds"],
        "peak_mib": r["peak_mib"],
        "images": out["summary"]["usable"],
        "flips": len(flips),
        "listed": len(listed),
        "audit_seconds": out["label_audit"]["seconds"],
        "method": out["label_audit"]["method"],
        "expected_precision": out["label_audit"].get("expected_precision"),
        "lookalike": [f"{p['a']}/{p['b']} {100 * p['share']:.0f}%" for p in out["label_audit"].get("lookalike", [])][
            :4
        ],
    }
    for kind in ("label", "conflict"):
        found = [i["path"] for i in out["label_issues"] if i["kind"] == kind]
        row[kind] = {"listed": len(found), "flips": sum(p in flips for p in found)}
    hits = sum(p in flips for p in listed)
    row.update(
        precision=hits / max(1, len(listed)),
        recall=hits / max(1, len(flips)),
        top_n_precision=sum(p in flips for p in listed[: len(flips)]) / max(1, len(flips)),
    )
    print(name, json.dumps(row), flush=True)
    return row


def markdown(res: dict) -> str:
    lines = [
        "## Label audit: clean data, 2% and 5% of the labels flipped (`python benchmarks/bench_audit.py`)",
        "",
        f"Measured {res['machine']['date']}. A manifest of every image, as it comes or with 2% / 5% of the labels "
        "changed to another class at random (seeded; the images stay where they are), then `fruitlens check "
        "MANIFEST --labels`. Listed: images the audit calls mislabelled (copies under another label / the "
        "held-out heads alone). Precision: the share of the listed images that were flipped (on clean data every "
        "listed image is a false alarm); recall: the share of the flips listed; top-N: precision of the first N "
        "listed, N = the number of flips. Expected precision: what the audit states from its calibrated "
        "probabilities.",
        "",
        "| data | flipped | images | listed (copies / heads) | share listed | precision | recall | top-N "
        "precision | expected precision | look-alike classes (top) | wall s | audit s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in res["rows"].items():
        ep = "-" if r.get("expected_precision") is None else f"{100 * r['expected_precision']:.0f}%"
        precision = "-" if not r["flips"] else f"{100 * r['precision']:.1f}%"
        recall = "-" if not r["flips"] else f"{100 * r['recall']:.1f}%"
        top = "-" if not r["flips"] else f"{100 * r['top_n_precision']:.1f}%"
        lines.append(
            f"| {r['data']} | {r['share']:.0%} | {r['images']:,} | {r['listed']} ({r['conflict']['listed']} / "
            f"{r['label']['listed']}) | {100 * r['listed'] / r['images']:.2f}% | {precision} | {recall} | "
            f"{top} | {ep} | {', '.join(r['lookalike']) or '-'} | {r['seconds']} | {r['audit_seconds']} |"
        )
    lines += ["", f"Method: {res['method']}." if res.get("method") else ""]
    return "\n".join(lines)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fruitlens-audit-", dir=SMOKE_DIR))
    os.environ["FRUITLENS_CACHE"] = str(tmp / "cache")  # a fresh feature store: the first run computes them all
    res = {"machine": machine(), "rows": {}}
    for data, folder in (
        ("GroceryStore train", data_path("grocery") / "train"),
        ("Fruits-360 Training", data_path("fruits360") / "Training"),
    ):
        for share in SHARES:
            key = f"{folder.parent.name}_{folder.name}_{int(100 * share)}"
            row = measure(key, folder, tmp, share)
            res["rows"][key] = {**row, "data": data, "share": share}
            res["method"] = row["method"]
    save("audit", res)
    write_section("audit", markdown(res))


if __name__ == "__main__":
    sys.exit(main())
