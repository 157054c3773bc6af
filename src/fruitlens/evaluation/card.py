"""``MODEL_CARD.md``: the run's report as a model card (the sections of Mitchell et al., "Model Cards for Model
Reporting", 2019), for handing the model on. Every figure is read from the Report, so the card and report.json agree."""

from __future__ import annotations

from pathlib import Path

from fruitlens.evaluation.metrics import ci_range, ci_text, gap_text
from fruitlens.evaluation.domain import features_text, studio_text
from fruitlens.evaluation.selective import never_sure_text
from fruitlens.evaluation.report import Report
from fruitlens.templating import render

WEAK_RECALL = 0.80


def weak_classes(report: Report, below: float = WEAK_RECALL) -> list[tuple[str, float, int]]:
    """(class, recall, test images) of the classes under ``below`` recall, worst first (classes with test images)."""
    rows = [
        (c, v["recall"], int(v["support"]))
        for c, v in report.metrics.per_class.items()
        if v.get("support") and v["recall"] < below
    ]
    return sorted(rows, key=lambda r: r[1])


def model_card(report: Report, licence: str | None = None) -> str:
    """The card's Markdown (``templates/model_card.md``); every value from the report, escaped."""
    d = report.dataset
    return render(
        "model_card.md",
        r=report,
        m=report.metrics,
        d=d,
        p=report.photos,
        t=report.trust,
        name=Path(report.run).name,
        features=features_text(report.config.model),
        pre=report.model.preprocessing,
        licence=licence,
        phases=", ".join(dict.fromkeys(r.phase for r in report.history)),
        images=(", ".join(f"{k} {v:,}" for k, v in d.totals.items()) or "-")
        + (f"; {len(d.excluded)} left out (unreadable or unusable, listed in report.json)" if d.excluded else ""),
        splits=list(next(iter(d.counts.values())).keys()) if d.counts else [],
        ci=ci_range,
        ci_text=ci_text(report.metrics),
        never=never_sure_text(report.trust),
        studio=studio_text(report.domain) if report.domain.studio_only and report.photos is None else "",
        gap=gap_text(report.validation_gap, report.evaluated_on),
        weak=weak_classes(report),
        weak_recall=WEAK_RECALL,
    )


def write_model_card(report: Report, path: Path, licence: str | None = None) -> Path:
    path.write_text(model_card(report, licence))
    return path
