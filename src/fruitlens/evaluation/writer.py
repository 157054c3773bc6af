"""Writing a ``Report``: report.json, report.html, plots/*.png and classification_report.txt into one folder (the
run's, or ``RUN/eval/<data>/``)."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from fruitlens.evaluation import plots
from fruitlens.evaluation.html import render_html
from fruitlens.evaluation.report import Report
from fruitlens.jsonio import json_safe, write_json


def write_report(report: Report, out: Path) -> Path:
    """Writes the plots, report.json, report.html and classification_report.txt into ``out``; returns the page."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    m = report.metrics
    cm = np.array(m.confusion_matrix)
    files = {
        "confusion_counts": plots.confusion_heatmap(
            cm, report.classes, out / "plots" / "confusion_matrix.png", False, "confusion matrix (counts)"
        ),
        "confusion_normalised": plots.confusion_heatmap(
            cm,
            report.classes,
            out / "plots" / "confusion_matrix_normalised.png",
            True,
            "confusion matrix (row-normalised = recall)",
        ),
        "reliability": plots.reliability_diagram(
            m.calibration, out / "plots" / "reliability.png", report.trust.calibration_before if report.trust else None
        ),
        "risk_coverage": plots.risk_coverage(
            report.trust.risk_coverage, out / "plots" / "risk_coverage.png", report.trust.target_precision
        )
        if report.trust
        else None,
        "curves": plots.training_curves(report.history, out / "plots" / "training_curves.png"),
    }
    report.plots = {k: str(v.relative_to(out)) for k, v in files.items() if v}
    (out / "classification_report.txt").write_text(m.classification_report)
    data = json_safe(report)
    slim = {
        **data,
        "gallery": {
            k: [{kk: vv for kk, vv in g.items() if kk != "thumbnail"} for g in v] for k, v in data["gallery"].items()
        },
    }
    write_json(out / "report.json", slim)
    images = {
        k: "data:image/png;base64," + base64.b64encode((out / v).read_bytes()).decode() for k, v in report.plots.items()
    }
    page = out / "report.html"
    page.write_text(render_html(report, images))
    return page
