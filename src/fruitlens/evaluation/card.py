"""``MODEL_CARD.md``: the run's report as a model card (the sections of Mitchell et al., "Model Cards for Model
Reporting", 2019), for handing the model on. Every figure is read from the Report, so the card and report.json agree."""
from __future__ import annotations

from pathlib import Path

from fruitlens.evaluation.metrics import ci_range, ci_text, gap_text
from fruitlens.evaluation.domain import features_text, studio_text
from fruitlens.evaluation.selective import never_sure_text
from fruitlens.training.adapt import Adaptation
from fruitlens.evaluation.report import Report

WEAK_RECALL = 0.80


def _pct(v: float | None) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}%"


def _table(head: list[str], rows: list[list[object]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def weak_classes(report: Report, below: float = WEAK_RECALL) -> list[tuple[str, float, int]]:
    """(class, recall, test images) of the classes under ``below`` recall, worst first (classes with test images)."""
    rows = [(c, v["recall"], int(v["support"])) for c, v in report.metrics.per_class.items()
            if v.get("support") and v["recall"] < below]
    return sorted(rows, key=lambda r: r[1])


def model_card(report: Report, licence: str | None = None) -> str:
    m, cfg = report.metrics, report.config
    model_cfg, pre = cfg.get("model", {}), report.model.preprocessing
    d = report.dataset
    lines = [f"# Model card: {Path(report.run).name}", "",
             "Written by fruitlens from this run's report (report.json); the figures are the same.", "",
             "## Model details",
             f"- Architecture: {report.model.name}, {report.model.parameters:,} parameters "
             f"({report.model.checkpoint_mb} MB checkpoint), weights started from "
             f"{model_cfg.get('weights', '?')}; classifier head: global average pooling, dropout, linear layer, on "
             f"{features_text(model_cfg)}.",
             f"- Input: RGB; the shorter side resized to {pre.get('resize_size', '?')} px, then the centre "
             f"{pre.get('image_size', '?')} px square, normalised with mean {pre.get('mean')} and std {pre.get('std')}.",
             f"- Training: phases {', '.join(dict.fromkeys(r.get('phase', '') for r in report.history)) or '-'}, "
             f"{len(report.history)} epochs, seed {report.seed}, {report.timing.train_seconds or '-'} s "
             f"on {report.environment.gpu or report.environment.machine or 'CPU'}.",
             f"- Software: fruitlens {report.environment.libraries.get('fruitlens', '?')}, torch "
             f"{report.environment.torch}, Python {report.environment.python}.",
             "- Licence of the model: that of the training data and of the pretrained weights (see below).", "",
             "## Intended use",
             f"- Telling these {len(report.classes)} classes apart in photos of one fruit: "
             f"{', '.join(report.classes)}.",
             "- Not for anything else: every input gets one of these classes unless the caller uses the "
             "'not sure' and 'unfamiliar' answers (`fruitlens predict --unknown-threshold auto`, the server's "
             "`unknown` field). Not for decisions about people, health or food safety.", ""]
    lines += ["## Training data",
              f"- Source: {report.data or '-'}", f"- Licence: {licence or 'not recorded in the data folder: find it out before handing the model on'}",
              f"- Images: {', '.join(f'{k} {v:,}' for k, v in d.totals.items()) or '-'}"
              + (f"; {len(d.excluded)} left out (unreadable or unusable, listed in report.json)" if d.excluded else "")]
    lines += [f"- {n}" for n in d.split_notes]
    if report.adaptation:
        lines.append(f"- Adaptation: {Adaptation(**report.adaptation).text()}.")
    p = report.photos
    if p is not None:
        new = f"; new classes from them: {', '.join(p.new_classes)}" if p.new_classes else ""
        lines.append(f"- Labelled photos of the user's setting (`--add`): {p.photos:,} ({', '.join(p.sources)}), "
                     f"{_pct(p.share)} of the head's training weight{new}.")
    if d.counts:
        splits = list(next(iter(d.counts.values())).keys())
        lines += ["", "<details><summary>images per class and split</summary>", ""]
        lines += _table(["class"] + splits, [[c] + [v.get(s, 0) for s in splits] for c, v in d.counts.items()])
        lines += ["", "</details>"]
    lines += ["", "## Evaluation data",
              f"- Evaluated on: {report.evaluated_on} ({m.n:,} images), none of which was trained or validated on."]
    if report.leak.applies and report.leak.test_images_with_train_duplicate:
        lines.append(f"- Warning: {report.leak.test_images_with_train_duplicate} test images "
                     f"({_pct(report.leak.share)}) have a near duplicate in the training images: the test figure "
                     "overstates the accuracy on new photos.")
    elif report.leak.applies and report.leak.leak_free:
        lines.append("- No test image has a near duplicate in the training images (checked by perceptual hash).")
    for f in report.domain.figures[1:]:
        ci = f" (95% CI {ci_range(f.accuracy_ci95)})" if f.accuracy_ci95 else ""
        lines.append(f"- Also evaluated on {f.name} ({f.images:,} images{', class map ' + f.class_map if f.class_map else ''}): "
                     f"accuracy {f.accuracy:.4f}{ci}, balanced accuracy {f.balanced_accuracy:.4f}, macro F1 "
                     f"{f.macro_f1:.4f} (its report: {f.folder}/report.html).")
    if p is not None and p.accuracy is not None:
        lines.append(f"- On the labelled photos of the user's setting, by cross-validation ({p.folds} folds of "
                     f"{p.grouping}): accuracy {p.accuracy:.4f} (95% CI {ci_range(p.accuracy_ci95)}), balanced "
                     f"accuracy {(p.balanced_accuracy or 0):.4f}, over {p.held_out:,} photos. {p.verdict}")
    lines += ["", "## Metrics",
              "Accuracy with its 95% interval (near-duplicate groups count as one try each), balanced accuracy, "
              "macro F1, expected calibration error (ECE) and log loss.", ""]
    lines += _table(["metric", "value"], [
        ["accuracy", f"{m.accuracy:.4f} ({ci_text(m) or 'no interval'})"],
        ["balanced accuracy", f"{m.balanced_accuracy:.4f}"], ["macro F1", f"{m.macro_f1:.4f}"],
        ["ECE", f"{m.ece:.4f}"], ["log loss", "-" if m.log_loss is None else f"{m.log_loss:.4f}"]]
        + [[f"top-{k} accuracy", f"{v:.4f}"] for k, v in m.top_k_accuracy.items()])
    t = report.trust
    if t is not None:
        lines += ["", f"- Calibration: temperature {t.temperature:.3f} fitted on {t.heldout_images:,} held-out "
                      f"images ({t.source}).",
                  f"- 'Not sure' below a top score of {t.unknown_threshold:.3f} (aimed at "
                  f"{_pct(t.target_precision)} accuracy on the answered images); on the test images: "
                  f"{_pct(t.answered)} answered at {_pct(t.answered_accuracy)} accuracy, {_pct(t.not_sure)} not sure, "
                  f"{_pct(t.unfamiliar)} unfamiliar."]
        if never := never_sure_text(t):
            lines.append(f"- **Warning:** {never}.")
    lines += ["", "## Quantitative analyses", ""]
    lines += _table(["class", "precision", "recall", "F1", "test images"],
                    [[c, f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", int(v["support"])]
                     for c, v in m.per_class.items()])
    lines += ["", "## Caveats and recommendations"]
    if report.domain.studio_only and p is None:
        lines.append(f"- Studio shots only: {studio_text(report.domain)}")
    if gap := gap_text(report.validation_gap, report.evaluated_on):
        lines.append(f"- {gap}")
    weak = weak_classes(report)
    if weak:
        lines.append(f"- Classes under {WEAK_RECALL:.0%} recall: " + ", ".join(
            f"{c} ({_pct(r)} of {n})" for c, r, n in weak) + ".")
    if m.most_confused:
        lines.append("- Most confused pairs (true -> predicted, test images): " + "; ".join(
            f"{p['true']} -> {p['predicted']} ({p['count']})" for p in m.most_confused[:5]) + ".")
    a = report.label_audit
    if a is not None and (a.train or a.val or a.test):
        lines.append(f"- Labels: {a.train} training, {a.val} validation and {len(a.test)} test images look "
                     f"mislabelled ({a.html}).")
    lines.append(f"- The test figures hold for photos like the test images ({report.evaluated_on} of "
                 f"{report.data or 'the data'}). Photos of another kind (other light, backgrounds, cameras) can "
                 "score far lower: measure on them with `fruitlens evaluate RUN THEIR_FOLDER` before relying on it.")
    if model_cfg.get("weights") == "imagenet":
        lines.append("- The backbone's ImageNet weights come from torchvision (BSD-3-Clause code; ImageNet's own "
                     "terms apply to the data they were trained on).")
    lines += ["", "## How to load", "```python", "import fruitlens",
              f'pred = fruitlens.Predictor.load("{report.run}")   # or its export/model.onnx',
              'pred.predict(["apple.jpg"], top_k=3)', "```",
              f"or `fruitlens predict {report.run} apple.jpg`, `fruitlens serve {report.run}`. The ONNX model "
              "(export/model.onnx) runs on ONNX Runtime without fruitlens; its metadata holds the classes and the "
              "preprocessing.", ""]
    return "\n".join(lines)


def write_model_card(report: Report, path: Path, licence: str | None = None) -> Path:
    path.write_text(model_card(report, licence))
    return path
