"""The self-contained report page: one HTML file, images embedded, no scripts, opens without a server."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fruitlens.evaluation.domain import features_text, studio_text
from fruitlens.training.adapt import Adaptation
from fruitlens.evaluation.metrics import ci_range, ci_text, gap_text
from fruitlens.evaluation.selective import never_sure_text

if TYPE_CHECKING:
    from fruitlens.evaluation.report import Report

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:2px solid #dde2e8;padding-bottom:4px}
.sub{color:#5b6573}.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{background:#fff;border-radius:8px;padding:12px 16px;box-shadow:0 1px 3px #0002;min-width:140px}
.card b{display:block;font-size:1.6em}.card span{color:#5b6573;font-size:.85em}
.warn{background:#fff4d6;border-left:5px solid #e0a100;padding:10px 14px;border-radius:4px;margin:12px 0}
.ok{background:#e4f6e8;border-left:5px solid #2e9d4b;padding:10px 14px;border-radius:4px;margin:12px 0}
table{border-collapse:collapse;background:#fff;font-size:.9em}td,th{padding:4px 10px;border-bottom:1px solid #e5e8ec;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#eef1f5;position:sticky;top:0}
img.plot{max-width:100%;background:#fff;border-radius:6px;box-shadow:0 1px 3px #0002;margin:8px 0}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.gallery figure{background:#fff;margin:0;padding:6px;border-radius:6px;
box-shadow:0 1px 3px #0002;width:120px;font-size:.75em}.gallery img{width:108px;height:108px;object-fit:contain}
pre{background:#fff;padding:12px;border-radius:6px;overflow:auto;font-size:.8em}
details{margin:8px 0}.bad{color:#b3261e}.scroll{max-height:520px;overflow:auto;display:inline-block}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="scroll {cls}"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _like_it(n: int) -> str:
    return f'<br><span class="sub">+{n} near-duplicate{"s" if n > 1 else ""} like it</span>' if n else ""


def _gallery(items: list[dict]) -> str:
    if not items:
        return "<p>none</p>"
    figs = "".join(f'<figure><img src="{i["thumbnail"]}" alt="{_e(i["path"])}" title="{_e(i["path"])}">'
                   f'<figcaption>true <b>{_e(i["true"])}</b><br>predicted <b class="{"bad" if i["true"] != i["predicted"] else ""}">'
                   f'{_e(i["predicted"])}</b><br>{_pct(i["confidence"])}{_like_it(i.get("like_it", 0))}'
                   '</figcaption></figure>' for i in items)
    return f'<div class="gallery">{figs}</div>'


def _leak_html(report: "Report") -> str:
    leak = report.leak
    out = ""
    if leak.applies and leak.test_images_with_train_duplicate:
        out = (f"<div class='warn'><b>Leak:</b> {leak.test_images_with_train_duplicate} test images "
               f"({_pct(leak.share)}) have a near duplicate in the training images (the data's own split). "
               "The test accuracy above overstates accuracy on new photos. "
               "Use <code>fruitlens split</code> (the default for data without a split) for a leak-free figure.</div>")
    elif leak.applies and leak.leak_free:
        out = ("<div class='ok'>The split is leak-free: no test image has a near copy (perceptual hash) in train or "
               "validation.</div>")
    if gap := gap_text(report.validation_gap, report.evaluated_on):
        out += f"<div class='warn' id='validation-gap'><b>Validation overstates:</b> {_e(gap)}</div>"
    return out


def _domain_html(report: "Report") -> str:
    """The studio-shots warning, and this evaluation's figures next to those on other data (or the test split)."""
    d = report.domain
    out = f"<div class='warn' id='studio-only'><b>Real photos:</b> {_e(studio_text(d))}</div>" if d.studio_only else ""
    if report.adaptation:
        out += (f"<div class='ok' id='adaptation'><b>Adaptation:</b> "
                f"{_e(Adaptation(**report.adaptation).text())}.</div>")
    if len(d.figures) > 1:
        rows = "".join(
            f"<tr><td>{'<b>' + _e(f.name) + '</b> (this report)' if i == 0 else _e(f.name)}</td><td>{f.images}</td>"
            f"<td>{_pct(f.accuracy)}</td><td>{ci_range(f.accuracy_ci95)}</td><td>{_pct(f.balanced_accuracy)}</td>"
            f"<td>{_pct(f.macro_f1)}</td><td>{_e(f.class_map or '-')}</td>"
            f"<td>{'' if i == 0 else '<a href=' + chr(34) + _e(f.folder + '/report.html') + chr(34) + '>report</a>'}</td></tr>"
            for i, f in enumerate(d.figures))
        head = "".join(f"<th>{h}</th>" for h in ("evaluated on", "images", "accuracy", "95% CI", "balanced accuracy",
                                                  "macro F1", "class map", ""))
        out += (f"<h2>Other data</h2><div id='other-data'><p class='sub'>the same model on each data set; a test split "
                f"carved from the training data flatters it when photos elsewhere look different</p>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>")
    return out


def _notes_html(report: "Report") -> str:
    out = ""
    a = report.label_audit
    if a is not None and (a.train or a.val or a.test):
        tests = "".join(f"<li><code>{_e(Path(t['path']).name)}</code>: labelled {_e(t['label'])}, looks like "
                        f"{_e(t['suggested'])} ({_pct(t['p_suggested'])} vs {_pct(t['p_label'])})</li>" for t in a.test[:20])
        out += (f"<div class='warn' id='label-audit'><b>Labels:</b> {a.train} training and {a.val} validation images "
                f"look mislabelled (<a href='{_e(a.html)}'>gallery</a>), and {len(a.test)} of these test images do: "
                f"the accuracy counts them against their given label.{'<ul>' + tests + '</ul>' if tests else ''}</div>")
    if report.unmapped_images:
        out += f"<div class='warn'>Images of classes the model does not know, counted apart: {_e(report.unmapped_images)}</div>"
    if report.bad_images:
        out += f"<div class='warn'>{len(report.bad_images)} image(s) could not be decoded and were skipped.</div>"
    if report.metrics.classes_absent_from_data:
        out += (f"<p class='sub'>Classes without images in this evaluation (no recall for them): "
                f"{_e(', '.join(report.metrics.classes_absent_from_data))}</p>")
    return out


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _trust_html(report: "Report", img) -> str:
    """Calibration before/after, the risk-coverage curve and what the thresholds do, on these images."""
    t = report.trust
    if t is None:
        return f"<h2>Calibration</h2>{img('reliability', 'reliability diagram')}"
    rc = t.risk_coverage
    cards = [("temperature", _num(t.temperature, ".2f")), ("ECE before", _num(t.ece_before)),
             ("ECE after", _num(t.ece_after)), ("log loss before", _num(t.log_loss_before)),
             ("log loss after", _num(t.log_loss_after))]
    cov_cards = [("AURC (lower is better)", _num(rc.aurc))]
    cov_cards += [(f"coverage at {100 * float(k):.0f}% accuracy", _pct(v)) for k, v in rc.coverage_at.items()]
    cov_cards += [("answered at the run's threshold", _pct(t.answered)),
                  ("accuracy of those answers", _pct(t.answered_accuracy)),
                  ("not sure", _pct(t.not_sure)), ("unfamiliar", _pct(t.unfamiliar))]
    card = lambda items: "".join(f"<div class='card'><b>{_e(v)}</b><span>{_e(k)}</span></div>" for k, v in items)
    rule = (f"A prediction is <b>not sure</b> when its calibrated top-1 probability is below "
            f"{t.unknown_threshold:.3f}, the threshold at which held-out predictions were "
            f"{100 * t.target_precision:.0f}% accurate, and <b>unfamiliar</b> when {_e(t.ood_rule or 'its ood_score is high')}. "
            "Both answers still carry the top-k.")
    if never := never_sure_text(t):
        rule += f" <b>Warning: {_e(never)}.</b>"
    return f"""<h2>Calibration</h2><div id="calibration"><div class="cards">{card(cards)}</div>
<p class="sub">The temperature was fitted on {_e(t.source)} ({t.heldout_images} images) and is folded into the model's
head, so every score it gives (checkpoint, ONNX, predict, serve) is the calibrated one. The figures are on these
{report.metrics.n} images.</p>{img('reliability', 'reliability diagrams before and after calibration')}</div>
<h2>Not sure and unfamiliar</h2><div id="selective"><div class="cards">{card(cov_cards)}</div>
<p class="sub">{rule}</p>{img('risk_coverage', 'risk-coverage curve')}</div>"""


def render_html(report: "Report", images: dict[str, str]) -> str:
    """The report page; every value is escaped (class names come from folder names)."""
    m, model, ds, t, env = report.metrics, report.model, report.dataset, report.timing, report.environment
    ci = ci_text(m)
    cards = [(f"accuracy ({ci})" if ci else "accuracy", _pct(m.accuracy)),
             ("balanced accuracy", _pct(m.balanced_accuracy)), ("macro F1", _pct(m.macro_f1)),
             ("weighted F1", _pct(m.weighted_f1))]
    cards += [(f"top-{k} accuracy", _pct(v)) for k, v in m.top_k_accuracy.items()]
    cards += [("log loss", f"{m.log_loss:.4f}" if m.log_loss is not None else "-"), ("ECE", f"{m.ece:.4f}"),
              ("images", m.n)]
    card_html = "".join(f"<div class='card'><b>{_e(v)}</b><span>{_e(k)}</span></div>" for k, v in cards)
    per_class = [[c, f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", v["support"]]
                 for c, v in m.per_class.items()]
    confused = [[p["true"], p["predicted"], p["count"]] for p in m.most_confused]
    count_rows = [[c, v.get("train", 0), v.get("val", 0), v.get("test", 0)] for c, v in sorted(ds.counts.items())]
    notes = "".join(f"<li>{_e(n)}</li>" for n in ds.split_notes + ds.split_warnings)
    findings = "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in ds.check_findings.items())
    img = lambda key, alt: f'<img class="plot" src="{images[key]}" alt="{alt}">' if key in images else "<p>not available</p>"
    pre = model.preprocessing
    galleries = report.gallery
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>fruitlens report: {_e(report.run)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head><body><main>
<h1>fruitlens report</h1>
<p class="sub">run <code>{_e(report.run)}</code> · model <b>{_e(model.name)}</b> · evaluated on <b>{_e(report.evaluated_on)}</b>
({m.n} images) · data <code>{_e(report.data)}</code></p>
{_leak_html(report)}{_notes_html(report)}
<div class="cards" id="headline">{card_html}</div>
{_domain_html(report)}
<h2>Confusion matrix</h2>
<div id="confusion">{img('confusion_normalised', 'row-normalised confusion matrix')}
<details><summary>counts</summary>{img('confusion_counts', 'confusion matrix counts')}</details></div>
<h3>Most confused pairs</h3>{_table(['true', 'predicted as', 'images'], confused) if confused else '<p>none: no mistakes</p>'}
<h2>Classification report</h2>
<div id="classification-report">{_table(['class', 'precision', 'recall', 'F1', 'support'], per_class)}</div>
<p class="sub">macro precision {_pct(m.macro_precision)}, recall {_pct(m.macro_recall)}, F1 {_pct(m.macro_f1)};
weighted precision {_pct(m.weighted_precision)}, recall {_pct(m.weighted_recall)}, F1 {_pct(m.weighted_f1)}</p>
<h2>Training curves</h2>{img('curves', 'training curves')}
{_trust_html(report, img)}
<h2>Worst mistakes</h2><p class="sub">wrong answers given with the highest confidence, one image per near-duplicate group; the heat map shows where the model looked for its answer</p>{_gallery(galleries.get('worst_mistakes', []))}
<h2>Least confident correct answers</h2><p class="sub">one image per near-duplicate group</p>{_gallery(galleries.get('least_confident_correct', []))}
<h2>Data</h2>{_table(['class', 'train', 'val', 'test'], count_rows) if count_rows else ''}
<ul>{notes}</ul><p>check findings:</p><ul>{findings or '<li>none</li>'}</ul>
<h2>Model and run</h2>
<ul><li>model {_e(model.name)}, {model.parameters:,} parameters, checkpoint {model.checkpoint_mb} MB, engine {_e(model.engine)}; the head reads {_e(features_text(report.config.get('model', {})))}</li>
<li>preprocessing: resize {_e(pre.get('resize_size'))} px, centre crop {_e(pre.get('image_size'))} px, mean {_e(pre.get('mean'))}, std {_e(pre.get('std'))}</li>
<li>training time {_e(t.train_seconds)} s (fitting {_e(t.fit_seconds)} s); evaluation {_e(t.eval_seconds)} s</li>
<li>seed {_e(report.seed)}; Python {_e(env.python)};
{_e(', '.join(f'{k} {v}' for k, v in env.libraries.items()))}</li>
<li>hardware: {_e(env.machine)}; GPU {_e(env.gpu or 'none')}</li></ul>
<details><summary>config.yaml</summary><pre>{_e(json.dumps(report.config, indent=2))}</pre></details>
<details><summary>classification report (text)</summary><pre>{_e(m.classification_report)}</pre></details>
</main></body></html>"""
