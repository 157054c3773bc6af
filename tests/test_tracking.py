"""Trackers (TensorBoard, MLflow on SQLite) read back through their own readers, compare over an MLflow experiment,
the Python API exactly as docs/training.md shows it, and the model card against report.json."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG, ROOT, make_tree, mobilenet_cached, need, train_small

import fruitlens
from fruitlens.errors import ConfigError


def _need_trackers() -> None:
    for module in ("tensorboard", "mlflow", "sqlalchemy", "alembic"):
        need(
            importlib.util.find_spec(module) is not None,
            f"{module} is not installed (pip install 'fruitlens[tracking]')",
        )


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Two small runs logged to csv, TensorBoard and an MLflow SQLite store of their own."""
    _need_trackers()
    tmp = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    runs = [
        train_small(tmp, name, logger="csv,tensorboard,mlflow", mlflow_uri=uri, experiment="fruit-test")
        for name in ("a", "b")
    ]
    return runs, uri


def test_tensorboard_event_file_holds_the_epochs_and_the_test_figures(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = tracked[0][0]
    report = json.loads(result.run.report_json.read_text())
    scalars: dict[str, list] = {}
    images: list[str] = []
    for f in sorted((result.run.path / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
        images += acc.Tags()["images"]
    epochs = len(report["history"])
    for name in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "phase"):
        assert [e.step for e in scalars[name]] == list(range(1, epochs + 1)), name
    assert [round(e.value, 5) for e in scalars["val_accuracy"]] == [round(r["val_acc"], 5) for r in report["history"]]
    assert scalars["test_accuracy"][-1].value == pytest.approx(report["metrics"]["accuracy"], abs=1e-6)
    assert scalars["test_accuracy_ci95_low"][-1].value == pytest.approx(report["metrics"]["accuracy_ci95"][0], abs=1e-6)
    assert "report/confusion_counts" in images


def test_mlflow_run_read_back_through_its_client(tracked):
    from mlflow import MlflowClient

    runs, uri = tracked
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fruit-test")
    found = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(found) == {"a", "b"}
    for result in runs:
        r = found[result.run.path.name]
        report = json.loads(result.run.report_json.read_text())
        assert r.info.status == "FINISHED"
        assert r.data.params["model/name"] == "small_cnn" and r.data.params["fit/epochs"] == "3"
        assert r.data.params["model/img_size"] == "32"
        assert r.data.metrics["test_accuracy"] == pytest.approx(report["metrics"]["accuracy"])
        assert [r.data.metrics["test_accuracy_ci95_low"], r.data.metrics["test_accuracy_ci95_high"]] == pytest.approx(
            report["metrics"]["accuracy_ci95"]
        )
        history = client.get_metric_history(r.info.run_id, "val_loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
            [h["val_loss"] for h in report["history"]]
        )
        files = {a.path for a in client.list_artifacts(r.info.run_id)}
        files |= {a.path for d in ("plots", "model") for a in client.list_artifacts(r.info.run_id, d)}
        assert {"report.html", "MODEL_CARD.md", "plots/confusion_matrix.png", "model/model.onnx"} <= files
        local = Path(client.download_artifacts(r.info.run_id, "model/model.onnx"))
        assert local.read_bytes() == result.run.onnx.read_bytes()


def test_compare_reads_an_mlflow_experiment(tracked, tmp_path):
    runs, uri = tracked
    chart = tmp_path / "chart.png"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fruitlens",
            "compare",
            "--mlflow-experiment",
            "fruit-test",
            "--mlflow-uri",
            uri,
            "--json",
            "--chart",
            str(chart),
        ],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert out.returncode == 0, out.stderr
    rows = {r["run"]: r for r in json.loads(out.stdout)}
    for result in runs:
        report = json.loads(result.run.report_json.read_text())
        row = rows[result.run.path.name]
        assert row["accuracy"] == pytest.approx(report["metrics"]["accuracy"])
        assert row["accuracy_ci95"] == pytest.approx(report["metrics"]["accuracy_ci95"])
        assert row["model"] == "small_cnn" and row["image_size"] == 32 and row["latency_ms"] > 0
    assert chart.stat().st_size > 1000
    out = subprocess.run(
        [sys.executable, "-m", "fruitlens", "compare", "--mlflow-experiment", "nope", "--mlflow-uri", uri],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert out.returncode == 2 and "fruit-test" in out.stderr  # names the experiments that are there


def test_a_missing_tracker_package_fails_before_training_naming_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        train_small(tmp_path, "x", logger="csv,mlflow")
    assert "fruitlens[tracking]" in (err.value.hint or "") + err.value.message
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="track.loggers"):
        train_small(tmp_path, "y", logger="wandb")


def test_python_api_exactly_as_the_docs_show_it(tmp_path, monkeypatch):
    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not cached (make weights)")
    guide = (ROOT / "docs" / "training.md").read_text()
    block = re.search(r"## Python\n\n```python\n(.*?)```", guide, re.S).group(1)
    assert "fruitlens.train(" in block and "Predictor.load(" in block
    make_tree(tmp_path / "photos", per_class=12, size=64)
    from conftest import fruit_image

    fruit_image("apple", 999).save(tmp_path / "apple.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "docs/training.md", "exec"), scope)
    run, pred = scope["run"], scope["pred"]
    assert run.run.path == Path("runs/x") and run.report.metrics.n > 0
    (p,) = pred.predict(["apple.jpg"], top_k=3)
    assert p.label in ("apple", "kiwi", "lemon") and len(p.top_k) == 3
    # the other entry points are the pipeline functions, with typed results
    checked = fruitlens.check("photos/")
    assert checked.ok and checked.report.summary.images == 36
    rep = fruitlens.evaluate("runs/x")
    assert rep.metrics.accuracy == pytest.approx(run.report.metrics.accuracy)
    assert Path(fruitlens.export("runs/x", bench=False).onnx).is_file()
    with pytest.raises(ConfigError, match="epoch"):  # a misspelt option: did you mean
        fruitlens.train("photos/", out="runs/y", epoch=3)


def test_model_card_figures_are_report_json_figures(trained_run):
    card = (trained_run / "MODEL_CARD.md").read_text()
    report = json.loads((trained_run / "report.json").read_text())
    m = report["metrics"]
    lo, hi = m["accuracy_ci95"]
    assert f"| accuracy | {m['accuracy']:.4f} (95% CI {100 * lo:.1f}-{100 * hi:.1f}%" in card
    assert f"| macro F1 | {m['macro_f1']:.4f} |" in card and f"| ECE | {m['ece']:.4f} |" in card
    for cls, v in m["per_class"].items():
        assert f"| {cls} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {int(v['support'])} |" in card
    for section in (
        "## Model details",
        "## Intended use",
        "## Training data",
        "## Evaluation data",
        "## Metrics",
        "## Quantitative analyses",
        "## Caveats and recommendations",
        "## How to load",
    ):
        assert section in card
    weak = [c for c, v in m["per_class"].items() if v["support"] and v["recall"] < 0.8]
    if weak:
        assert all(c in card.split("Classes under 80% recall:")[1].split("\n")[0] for c in weak)
    for line in [f"{c['true']} -> {c['predicted']} ({c['count']})" for c in m["most_confused"][:5]]:
        assert line in card


def test_licence_is_read_from_the_data_folder_where_it_says(tmp_path):
    from fruitlens.data.provenance import licence_note

    (tmp_path / "shots").mkdir()
    (tmp_path / "README.md").write_text("# data\n\n- Shots: photos by us,\n  CC BY 4.0 licence.\n- Other: none\n")
    assert "CC BY 4.0" in licence_note(tmp_path / "shots")
    (tmp_path / "other").mkdir()
    assert licence_note(tmp_path / "other") is None  # named, but no licence: nothing guessed
    (tmp_path / "shots" / "LICENSE").write_text("\nMIT License\n\nCopyright ...")
    assert licence_note(tmp_path / "shots").startswith("MIT License")
