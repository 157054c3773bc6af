"""The label audit's findings as a person acts on them: ``LabelAudit`` (label_audit.json), from calibrated held-out
probabilities and each image's near copies (``audit.py``'s rule), written as ``label_issues.csv`` (with an empty
``new_label`` column for ``fruitlens relabel``) and ``label_issues.html`` (``templates/label_issues.html``)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fruitlens.evaluation.audit import ALPHA, SURE, audit_labels, expected_precision, thresholds
from fruitlens.evaluation.report import thumbnail
from fruitlens.jsonio import write_json
from fruitlens.templating import render

CSV_FIELDS = (
    "rank",
    "path",
    "label",
    "suggested",
    "p_label",
    "p_suggested",
    "score",
    "split",
    "kind",
    "evidence",
    "new_label",
)


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
        prec = (
            f", expected precision {100 * self.expected_precision:.0f}%" if self.expected_precision is not None else ""
        )
        alike = (
            "; classes that look alike: " + ", ".join(f"{p.a}/{p.b} {100 * p.share:.0f}%" for p in self.lookalike[:4])
            if self.lookalike
            else ""
        )
        return f"{len(self.issues)} images look mislabelled{share}{prec}{alike}"


RULE = (
    f"an image is listed where its near copies mostly carry another label (with one or two such copies, the heads that "
    f"never saw its group must side with them), or an image without copies whose label the heads that never saw it "
    f"give at most {100 * ALPHA:.0f}% and another class more than {100 * SURE:.0f}%"
)


def audit_heldout(
    paths: list[str],
    y: np.ndarray,
    probs: np.ndarray,
    held: np.ndarray,
    classes: list[str],
    splits: list[str],
    neighbours: list[np.ndarray],
    notes: list[str] | None = None,
) -> LabelAudit:
    """The two findings on calibrated out-of-sample ``probs`` (rows where ``held``) and each image's near copies."""
    notes = list(notes or [])
    skipped = len(y) - int(np.sum(held))
    if skipped:
        notes.append(
            f"{skipped} image(s) without an out-of-sample prediction: their class has too few near-duplicate "
            "groups for another fold to learn it; their copies' labels still count"
        )
    found, alike = audit_labels(probs, y, held, neighbours)
    t = thresholds(probs[held], y[held]) if held.any() else np.ones(len(classes))
    issues = [
        AuditItem(
            paths[i.index],
            classes[i.label],
            classes[i.suggested],
            i.p_label,
            i.p_suggested,
            i.score,
            i.rank,
            splits[i.index],
            i.kind,
            i.evidence,
        )
        for i in found
    ]
    pairs = [
        LookAlikePair(
            classes[p.a],
            classes[p.b],
            p.a_as_b,
            p.b_as_a,
            p.n_a,
            p.n_b,
            round(p.share, 4),
            [
                {
                    "path": paths[e],
                    "label": classes[y[e]],
                    "read_as": classes[int(probs[e].argmax())],
                    "p": float(probs[e].max()),
                }
                for e in p.examples
            ],
        )
        for p in alike
    ]
    return LabelAudit(
        issues,
        pairs,
        expected_precision(found),
        len(y),
        int(np.sum(held)),
        "calibrated held-out probabilities and each image's near copies",
        RULE,
        notes,
        {c: float(v) for c, v in zip(classes, t)},
    )


def write_audit(audit: LabelAudit, out: Path, classes: list[str]) -> None:
    """``label_issues.csv`` (with an empty new_label column), ``label_issues.html`` and ``label_audit.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    audit.csv, audit.html = str(out / "label_issues.csv"), str(out / "label_issues.html")
    with open(audit.csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for i in audit.issues:
            w.writerow(
                {
                    "rank": i.rank,
                    "path": i.path,
                    "label": i.label,
                    "suggested": i.suggested,
                    "p_label": "" if i.p_label is None else round(i.p_label, 4),
                    "p_suggested": "" if i.p_suggested is None else round(i.p_suggested, 4),
                    "score": round(i.score, 4),
                    "split": i.split,
                    "kind": i.kind,
                    "evidence": i.evidence,
                    "new_label": "",
                }
            )
    Path(audit.html).write_text(_page(audit))
    write_json(out / "label_audit.json", audit)


def _thumb(path: str, size: int) -> str:
    try:
        return thumbnail(path, size=size)
    except Exception:  # the file went away since: the card still names it
        return ""


def _page(audit: LabelAudit, limit: int = 300) -> str:
    items = [{"item": i, "thumb": _thumb(i.path, 160), "name": Path(i.path).name} for i in audit.issues[:limit]]
    pairs = [
        {
            "pair": p,
            "examples": [{**e, "thumb": _thumb(e["path"], 96), "name": Path(e["path"]).name} for e in p.examples],
        }
        for p in audit.lookalike[:12]
    ]
    return render("label_issues.html", audit=audit, items=items, more=max(0, len(audit.issues) - limit), pairs=pairs)
