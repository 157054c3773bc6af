"""The label audit: which images look mislabelled, as a list a person can act on.

``fruitlens check DATA --labels``: pretrained features of every usable image (cached under ``~/.cache/fruitlens``),
out-of-fold probabilities from k linear heads with folds of whole near-duplicate groups (a copy of an image cannot
vouch for its label), confident learning (``evaluation/audit.py``). ``fruitlens train`` runs the same on the held-out
predictions it already has. Either writes ``label_issues.html`` (thumbnails, given -> suggested) and
``label_issues.csv`` (with an empty ``new_label`` column for ``fruitlens relabel``). Nothing touches the images.
"""
from __future__ import annotations

import csv
import html
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fruitlens.data.check import CheckReport, duplicate_groups
from fruitlens.data.dataset import ImageDataset, make_loader
from fruitlens.errors import DataError
from fruitlens.evaluation.audit import find_label_issues, thresholds
from fruitlens.evaluation.report import thumbnail
from fruitlens.evaluation.trust import choose_folds
from fruitlens.inference.predictor import softmax
from fruitlens.jsonio import write_json
from fruitlens.models.registry import build_model
from fruitlens.training.auto import auto_image_size
from fruitlens.training.features import Engine, FeatureStore
from fruitlens.training.heldout import HeadRecipe, out_of_fold_logits

log = logging.getLogger(__name__)

AUDIT_RECIPE = HeadRecipe(epochs=60)  # a linear head on clean features: converged well before (GroceryStore, Fruits-360)
CSV_FIELDS = ("rank", "path", "label", "suggested", "p_label", "p_suggested", "score", "split", "kind", "new_label")


@dataclass
class AuditItem:
    """One image that looks mislabelled; ``kind`` "label" (confident learning) or "conflict" (a copy of an image
    that carries another label)."""

    path: str
    label: str
    suggested: str
    p_label: float | None
    p_suggested: float | None
    score: float
    rank: int = 0
    split: str = ""
    kind: str = "label"


@dataclass
class LabelAudit:
    issues: list[AuditItem] = field(default_factory=list)
    images: int = 0  # images with labels
    audited: int = 0  # images with an out-of-sample probability (their class was in the other folds)
    method: str = ""
    notes: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)  # per-class self-confidence, for new images
    seconds: float = 0.0
    html: str = ""
    csv: str = ""

    def count(self, split: str | None = None) -> int:
        return sum(1 for i in self.issues if split is None or i.split == split)


def audit_data(report: CheckReport, out: Path, *, model: str = "mobilenet_v2", img_size: int = 0, folds: int = 5,
               seed: int = 0) -> LabelAudit:
    """Audits the labels of every usable image of a check."""
    t0 = time.perf_counter()
    keep = [i for i, f in enumerate(report.files) if f.ok]
    records = [report.manifest.records[i] for i in keep]
    classes = sorted({r.label for r in records})
    if len(classes) < 2:
        raise DataError(f"the label audit needs at least two classes but found {len(classes)}",
                        "add a folder per class: DATA/<class>/<images>")
    sides = [min(report.files[i].width, report.files[i].height) for i in keep]
    size = img_size or auto_image_size(int(np.median(sides)))
    net = build_model(model, len(classes), weights="imagenet", img_size=size)  # WeightsError names the import
    paths = [str(report.manifest.resolve(r)) for r in records]
    x = _features(net, paths, classes, records, report.manifest.root)
    y = np.array([classes.index(r.label) for r in records])
    # folds of whole near-copy groups, so that a mislabelled image's copies under the same wrong label cannot vouch
    # for it; where a class is one long chain of copies (Fruits-360's turning fruit), finer groups
    name, groups, fold, held = choose_folds(y, [("near copies", duplicate_groups(report)[keep])], folds, seed,
                                            "label audit")
    logits = out_of_fold_logits(x, torch.from_numpy(y), fold, len(classes), AUDIT_RECIPE, seed=seed)
    notes = [f"{len(np.unique(groups))} groups of {name} in {len(np.unique(fold))} folds"]
    result = audit_heldout(paths, y, softmax(logits), held, classes, [r.split for r in records], notes)
    result.method = (f"confident learning on out-of-fold probabilities of {len(np.unique(fold))} linear heads on "
                     f"ImageNet {model} features at {size} px")
    result.issues = _merge(_conflicts(report), result.issues)
    _rank(result)
    result.seconds = round(time.perf_counter() - t0, 2)
    write_audit(result, out, classes)
    return result


def _features(net, paths: list[str], classes: list[str], records, root: str) -> torch.Tensor:
    """Clean-view features from the data set's feature store, computing (and storing) the missing ones."""
    store = FeatureStore(net.name, "imagenet", net.preprocessing)
    x, missing = store.lookup(paths)
    if x is not None:
        log.info("label audit: features of %d images from %s", len(paths), store.path)
        return x
    from fruitlens.data.manifest import Manifest

    part = Manifest(tuple(records[i] for i in missing), root)
    pre = net.preprocessing
    engine = Engine(net.backbone, pre.image_size)
    dl = make_loader(ImageDataset(part, classes, pre), batch_size=max(8, min(32, int(32 * (96 / pre.image_size) ** 2))),
                     shuffle=False, workers=1)
    t0 = time.perf_counter()
    feats = torch.cat([engine(pre.normalise(xb)) for xb, _ in dl])
    log.info("label audit: features of %d images in %.1fs (%s)", len(missing), time.perf_counter() - t0, engine.name)
    store.add([paths[i] for i in missing], feats)
    x, _ = store.lookup(paths)
    return x


def audit_heldout(paths: list[str], y: np.ndarray, probs: np.ndarray, held: np.ndarray, classes: list[str],
                  splits: list[str], notes: list[str] | None = None) -> LabelAudit:
    """Confident learning on the rows of ``probs`` that are out-of-sample (``held``)."""
    rows = np.flatnonzero(held)
    notes = list(notes or [])
    skipped = len(y) - len(rows)
    if skipped:
        notes.append(f"{skipped} image(s) not audited: their class has too few near-duplicate groups for another fold "
                     "to learn it (a class needs images in at least two groups)")
    found = find_label_issues(probs[rows], y[rows]) if len(rows) else []
    t = thresholds(probs[rows], y[rows]) if len(rows) else np.ones(len(classes))
    issues = [AuditItem(paths[rows[i.index]], classes[i.label], classes[i.suggested], i.p_label, i.p_suggested, i.score,
                        i.rank, splits[rows[i.index]]) for i in found]
    return LabelAudit(issues, len(y), len(rows), "confident learning on held-out probabilities", notes,
                      {c: float(v) for c, v in zip(classes, t)})


def _conflicts(report: CheckReport) -> list[AuditItem]:
    """Identical or near-identical images under different labels, from the check's duplicate pairs. An image whose
    copies mostly carry its own label keeps it (the frames of a fruit turning around one mislabelled frame: only that
    frame is listed, with its copies' label); where the labels tie (two copies, two labels), both are listed."""
    records = report.manifest.records
    neighbours: dict[int, list[int]] = {}
    for a, b in report.near_pairs.tolist():
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    out = []
    for i, near in neighbours.items():
        own = records[i].label
        votes = Counter(records[j].label for j in near)
        if not any(label != own for label in votes):
            continue
        other, n_other = max(((lab, n) for lab, n in votes.items() if lab != own), key=lambda t: (t[1], t[0]))
        if votes.get(own, 0) + 1 > n_other:  # its copies (and itself) mostly say its label
            continue
        out.append(AuditItem(str(report.manifest.resolve(records[i])), own, other, None, None, 1.0, kind="conflict",
                             split=records[i].split))
    return out


def _merge(conflicts: list[AuditItem], issues: list[AuditItem]) -> list[AuditItem]:
    """One entry per image: a copy under another label that confident learning flags too keeps its probabilities."""
    by_path = {i.path: i for i in issues}
    for c in conflicts:
        found = by_path.pop(c.path, None)
        if found is not None:
            c.p_label, c.p_suggested, c.score, c.suggested = found.p_label, found.p_suggested, 1.0, found.suggested
    seen, out = set(), []
    for c in conflicts + list(by_path.values()):
        if c.path not in seen:
            seen.add(c.path)
            out.append(c)
    return out


def _rank(audit: LabelAudit) -> None:
    audit.issues.sort(key=lambda i: (i.kind != "conflict", -i.score))
    for r, item in enumerate(audit.issues, start=1):
        item.rank = r


def write_audit(audit: LabelAudit, out: Path, classes: list[str]) -> None:
    """``label_issues.csv`` (with an empty new_label column), ``label_issues.html`` and ``label_audit.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    audit.csv, audit.html = str(out / "label_issues.csv"), str(out / "label_issues.html")
    with open(audit.csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for i in audit.issues:
            w.writerow({"rank": i.rank, "path": i.path, "label": i.label, "suggested": i.suggested,
                        "p_label": "" if i.p_label is None else round(i.p_label, 4),
                        "p_suggested": "" if i.p_suggested is None else round(i.p_suggested, 4),
                        "score": round(i.score, 4), "split": i.split, "kind": i.kind, "new_label": ""})
    Path(audit.html).write_text(_page(audit, classes))
    write_json(out / "label_audit.json", audit)


def _page(audit: LabelAudit, classes: list[str], limit: int = 300) -> str:
    e = html.escape
    cards = []
    for i in audit.issues[:limit]:
        try:
            thumb = thumbnail(i.path, size=160)
        except Exception:  # the file went away since: the card still names it
            thumb = ""
        probs = "" if i.p_label is None else f"<br>p({e(i.label)}) {i.p_label:.0%} · p({e(i.suggested)}) {i.p_suggested:.0%}"
        what = "copy under another label" if i.kind == "conflict" else f"score {i.score:.2f}"
        cards.append(f'<figure data-rank="{i.rank}"><img src="{thumb}" alt="{e(i.path)}" title="{e(i.path)}">'
                     f'<figcaption><b>#{i.rank}</b> {e(i.label)} &rarr; <b>{e(i.suggested)}</b>{probs}<br>{what}'
                     f'{" · " + e(i.split) if i.split else ""}<br><span class="path">{e(Path(i.path).name)}</span>'
                     '</figcaption></figure>')
    more = f"<p>... and {len(audit.issues) - limit} more in label_issues.csv</p>" if len(audit.issues) > limit else ""
    notes = "".join(f"<li>{e(n)}</li>" for n in audit.notes)
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>fruitlens label audit</title>
<style>body{{font-family:system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}}main{{max-width:1200px;margin:0 auto;padding:24px}}
.grid{{display:flex;flex-wrap:wrap;gap:12px}}figure{{background:#fff;margin:0;padding:8px;border-radius:8px;box-shadow:0 1px 3px #0002;width:180px;font-size:.8em}}
figure img{{width:164px;height:164px;object-fit:contain;background:#eee}}.path{{color:#5b6573;word-break:break-all}}.sub{{color:#5b6573}}</style></head>
<body><main><h1>Label audit</h1>
<p class="sub">{len(audit.issues)} of {audit.images} images look mislabelled ({audit.audited} audited; {e(audit.method)}).
Most suspect first: given label &rarr; suggested label. Fill in the <code>new_label</code> column of
<code>label_issues.csv</code> (a class name, or <code>drop</code>) and run <code>fruitlens relabel DATA label_issues.csv
--out FIXED/</code>: your images are never moved, renamed or deleted.</p><ul class="sub">{notes}</ul>
<div class="grid" id="issues">{''.join(cards) or '<p>No label looks wrong.</p>'}</div>{more}</main></body></html>"""
