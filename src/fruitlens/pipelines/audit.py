"""The label audit: which images look mislabelled, and which classes look alike, as lists a person can act on.

``fruitlens check DATA --labels``: pretrained features of every usable image (cached under ``~/.cache/fruitlens``),
out-of-fold probabilities from k linear heads with folds of whole near-duplicate groups (a copy of an image cannot
vouch for its label), calibrated by a temperature, then ``evaluation/audit.py``'s two findings. ``fruitlens train``
runs the same on the held-out predictions it already has. Either writes ``label_issues.html`` (the images, given ->
suggested, with the evidence; the look-alike classes with examples) and ``label_issues.csv`` (with an empty
``new_label`` column for ``fruitlens relabel``). Nothing touches the images.
"""
from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fruitlens.data.check import CheckReport, duplicate_groups
from fruitlens.data.dataset import ImageDataset, make_loader
from fruitlens.errors import DataError
from fruitlens.evaluation.audit import (ALPHA, SURE, audit_labels, expected_precision, neighbours_from_pairs,
                                        thresholds)
from fruitlens.evaluation.report import thumbnail
from fruitlens.evaluation.selective import fit_temperature
from fruitlens.evaluation.trust import choose_folds
from fruitlens.inference.predictor import softmax
from fruitlens.jsonio import write_json
from fruitlens.models.registry import build_model
from fruitlens.templating import render
from fruitlens.training.auto import auto_image_size
from fruitlens.training.features import Engine, FeatureStore
from fruitlens.training.heldout import HeadRecipe, out_of_fold_logits

log = logging.getLogger(__name__)

AUDIT_RECIPE = HeadRecipe(weight_decay=1e-4)  # a linear head on clean features, to convergence
CSV_FIELDS = ("rank", "path", "label", "suggested", "p_label", "p_suggested", "score", "split", "kind", "evidence",
              "new_label")


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
    evidence: str = ""


@dataclass
class LookAlikePair:
    """Two classes whose images the held-out heads confuse: a finding about the classes, not about labels."""

    a: str
    b: str
    a_as_b: int  # images of a read as b
    b_as_a: int
    n_a: int
    n_b: int
    share: float  # of the pair's images read as the other class
    examples: list[dict] = field(default_factory=list)  # path, label, read_as, p


@dataclass
class LabelAudit:
    issues: list[AuditItem] = field(default_factory=list)
    lookalike: list[LookAlikePair] = field(default_factory=list)
    expected_precision: float | None = None  # share of the listed images expected to be mislabelled
    images: int = 0  # images with labels
    audited: int = 0  # images with an out-of-sample probability (their class was in the other folds)
    method: str = ""
    rule: str = ""
    notes: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)  # per-class self-confidence, for new images
    seconds: float = 0.0
    html: str = ""
    csv: str = ""

    def count(self, split: str | None = None) -> int:
        return sum(1 for i in self.issues if split is None or i.split == split)

    def text(self) -> str:
        """``12 images look mislabelled (expected precision 94%); classes that look alike: A/B 8%, ...``."""
        share = f" ({100 * len(self.issues) / self.images:.1f}% of {self.images:,})" if self.images else ""
        prec = f", expected precision {100 * self.expected_precision:.0f}%" if self.expected_precision is not None else ""
        alike = "; classes that look alike: " + ", ".join(
            f"{p.a}/{p.b} {100 * p.share:.0f}%" for p in self.lookalike[:4]) if self.lookalike else ""
        return f"{len(self.issues)} images look mislabelled{share}{prec}{alike}"


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
    logits = out_of_fold_logits(x, torch.from_numpy(y), fold, len(classes), AUDIT_RECIPE)
    temperature = fit_temperature(logits[held], y[held])
    notes = [f"{len(np.unique(groups))} groups of {name} in {len(np.unique(fold))} folds; temperature "
             f"{temperature:.2f}"]
    position = {k: i for i, k in enumerate(keep)}
    pairs = [(position[a], position[b]) for a, b in report.near_pairs.tolist() if a in position and b in position]
    neighbours = neighbours_from_pairs(len(keep), np.array(pairs, dtype=np.int64))
    result = audit_heldout(paths, y, softmax(logits / temperature), held, classes, [r.split for r in records],
                           neighbours, notes)
    result.method = (f"out-of-fold probabilities of {len(np.unique(fold))} linear heads on ImageNet {model} features "
                     f"at {size} px, calibrated, and the labels of each image's near copies")
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


RULE = (f"listed: an image whose near copies mostly carry another label (with one or two such copies, the heads that "
        f"never saw its group must side with them), or an image without copies whose label the heads that never saw it "
        f"give at most {100 * ALPHA:.0f}% and another class more than {100 * SURE:.0f}%")


def audit_heldout(paths: list[str], y: np.ndarray, probs: np.ndarray, held: np.ndarray, classes: list[str],
                  splits: list[str], neighbours: list[np.ndarray], notes: list[str] | None = None) -> LabelAudit:
    """The two findings on calibrated out-of-sample ``probs`` (rows where ``held``) and each image's near copies."""
    notes = list(notes or [])
    skipped = len(y) - int(np.sum(held))
    if skipped:
        notes.append(f"{skipped} image(s) without an out-of-sample prediction: their class has too few near-duplicate "
                     "groups for another fold to learn it; their copies' labels still count")
    found, alike = audit_labels(probs, y, held, neighbours)
    t = thresholds(probs[held], y[held]) if held.any() else np.ones(len(classes))
    issues = [AuditItem(paths[i.index], classes[i.label], classes[i.suggested], i.p_label, i.p_suggested, i.score,
                        i.rank, splits[i.index], i.kind, i.evidence) for i in found]
    pairs = [LookAlikePair(classes[p.a], classes[p.b], p.a_as_b, p.b_as_a, p.n_a, p.n_b, round(p.share, 4),
                           [{"path": paths[e], "label": classes[y[e]], "read_as": classes[int(probs[e].argmax())],
                             "p": float(probs[e].max())} for e in p.examples]) for p in alike]
    return LabelAudit(issues, pairs, expected_precision(found), len(y), int(np.sum(held)),
                      "calibrated held-out probabilities and each image's near copies", RULE, notes,
                      {c: float(v) for c, v in zip(classes, t)})


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
                        "score": round(i.score, 4), "split": i.split, "kind": i.kind, "evidence": i.evidence,
                        "new_label": ""})
    Path(audit.html).write_text(_page(audit))
    write_json(out / "label_audit.json", audit)


def _thumb(path: str, size: int) -> str:
    try:
        return thumbnail(path, size=size)
    except Exception:  # the file went away since: the card still names it
        return ""


def _page(audit: LabelAudit, limit: int = 300) -> str:
    items = [{"item": i, "thumb": _thumb(i.path, 160), "name": Path(i.path).name} for i in audit.issues[:limit]]
    pairs = [{"pair": p, "examples": [{**e, "thumb": _thumb(e["path"], 96), "name": Path(e["path"]).name}
                                      for e in p.examples]} for p in audit.lookalike[:12]]
    return render("label_issues.html", audit=audit, items=items, more=max(0, len(audit.issues) - limit), pairs=pairs)
