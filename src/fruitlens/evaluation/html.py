"""The self-contained report page (``templates/report.html``): one HTML file, images embedded, no scripts, opens
without a server. This module only prepares the figures and sentences the template shows; the markup and its
escaping are the template's."""

from __future__ import annotations

from typing import Any

import yaml

from fruitlens.evaluation.domain import features_text, studio_text
from fruitlens.evaluation.metrics import ci_range, ci_text, gap_text
from fruitlens.evaluation.report import Report
from fruitlens.evaluation.selective import never_sure_text
from fruitlens.templating import render


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _trust_cards(report: Report) -> tuple[list, list]:
    t = report.trust
    if t is None:
        return [], []
    rc = t.risk_coverage
    cards = [
        ("temperature", _num(t.temperature, ".2f")),
        ("ECE before", _num(t.ece_before)),
        ("ECE after", _num(t.ece_after)),
        ("log loss before", _num(t.log_loss_before)),
        ("log loss after", _num(t.log_loss_after)),
    ]
    coverage = [("AURC (lower is better)", _num(rc.aurc))]
    coverage += [(f"coverage at {100 * float(k):.0f}% accuracy", _pct(v)) for k, v in rc.coverage_at.items()]
    coverage += [
        ("answered at the run's threshold", _pct(t.answered)),
        ("accuracy of those answers", _pct(t.answered_accuracy)),
        ("not sure", _pct(t.not_sure)),
        ("unfamiliar", _pct(t.unfamiliar)),
    ]
    return cards, coverage


def _photo_cards(report: Report) -> list:
    p = report.photos
    if p is None or p.accuracy is None:
        return []
    alone = next((c for c in p.curve if c.photos == 0), None)
    cards = [
        (f"accuracy on your photos (95% CI {ci_range(p.accuracy_ci95)})", _pct(p.accuracy)),
        ("balanced accuracy", _pct(p.balanced_accuracy)),
        ("labelled photos", p.photos),
    ]
    if alone is not None:
        cards.append(("the data alone, on your photos", _pct(alone.accuracy)))
    return cards


def render_html(report: Report, images: dict[str, str]) -> str:
    """The report page; every value is escaped by the template (class names come from folder names)."""
    m, ds = report.metrics, report.dataset
    ci = ci_text(m)
    headline = [
        (f"accuracy ({ci})" if ci else "accuracy", _pct(m.accuracy)),
        ("balanced accuracy", _pct(m.balanced_accuracy)),
        ("macro F1", _pct(m.macro_f1)),
        ("weighted F1", _pct(m.weighted_f1)),
    ]
    headline += [(f"top-{k} accuracy", _pct(v)) for k, v in m.top_k_accuracy.items()]
    headline += [
        ("log loss", f"{m.log_loss:.4f}" if m.log_loss is not None else "-"),
        ("ECE", f"{m.ece:.4f}"),
        ("images", m.n),
    ]
    trust_cards, coverage_cards = _trust_cards(report)
    context: dict[str, Any] = {
        "r": report,
        "m": m,
        "ds": ds,
        "images": images,
        "headline": headline,
        "gap": gap_text(report.validation_gap, report.evaluated_on),
        # a run trained on the user's labelled photos says how it does on them instead
        "studio": studio_text(report.domain) if report.photos is None else "",
        "adaptation": report.adaptation.text() if report.adaptation else "",
        "others": len(report.domain.figures) > 1,
        "photo_cards": _photo_cards(report),
        "confused": [[p["true"], p["predicted"], p["count"]] for p in m.most_confused],
        "per_class": [
            [c, f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", v["support"]]
            for c, v in m.per_class.items()
        ],
        "counts": [[c, v.get("train", 0), v.get("val", 0), v.get("test", 0)] for c, v in sorted(ds.counts.items())],
        "trust_cards": trust_cards,
        "coverage_cards": coverage_cards,
        "never": never_sure_text(report.trust),
        "features": features_text(report.config.model),
        "pre": report.model.preprocessing,
        "config_yaml": yaml.safe_dump(report.config.to_dict(), sort_keys=False),
        "ci": ci_range,
    }
    return render("report.html", **context)
