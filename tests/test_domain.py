"""Studio shots and photos: the white-background share, --eval-data next to the test split, the studio warning,
the time by stage, the demo's class choice, label conflicts by majority, and an export that is not made twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import fruit_image, make_tree, train_small

import fruitlens
from fruitlens.data.check import check
from fruitlens.data.scan import scan
from fruitlens.errors import DataError


def _photos(
    root: Path,
    classes=("apple", "kiwi", "lemon"),
    per_class: int = 6,
    size: int = 48,
    names: dict[str, str] | None = None,
) -> Path:
    """The synthetic fruit on a busy, dark, noisy background: photo-like, not a studio shot. ``names``: the folder
    name of a class, where it differs."""
    rng = np.random.default_rng(0)
    for c in classes:
        folder = root / (names or {}).get(c, c)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fruit = np.asarray(fruit_image(c, 500 + i, size)).astype(np.int16)
            background = rng.integers(20, 140, fruit.shape)
            img = np.where(fruit.min(axis=2, keepdims=True) > 200, background, fruit)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{c}_{i}.jpg")
    return root


def test_white_background_share_tells_studio_shots_from_photos(tmp_path):
    studio = check(scan(make_tree(tmp_path / "studio", per_class=6)))
    photos = check(scan(_photos(tmp_path / "photos")))
    assert studio.summary.white_background == 1.0
    assert photos.summary.white_background == 0.0


def test_eval_data_stands_next_to_the_test_split_and_studio_runs_say_so(tmp_path, capsys):
    photos = _photos(tmp_path / "shop", names={"lemon": "citrus"})
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"apple": "apple", "kiwi": "kiwi", "citrus": ["lemon"]}))
    result = train_small(tmp_path, epochs=2, name="run", eval_data=str(photos), class_map=str(cmap))
    run = result.run.path
    report = json.loads((run / "report.json").read_text())
    other = json.loads((run / "eval" / "shop" / "report.json").read_text())
    figures = report["domain"]["figures"]
    assert [f["name"] for f in figures] == ["test", "shop"]
    assert figures[1]["accuracy"] == pytest.approx(other["metrics"]["accuracy"])
    assert figures[1]["balanced_accuracy"] == pytest.approx(other["metrics"]["balanced_accuracy"])
    assert figures[1]["images"] == other["metrics"]["n"] == 18
    # the other data's own report puts the test split's figure next to its own
    assert [f["name"] for f in other["domain"]["figures"]] == ["shop", "test"]
    assert other["domain"]["figures"][1]["accuracy"] == pytest.approx(report["metrics"]["accuracy"])
    # synthetic fruit on white: studio shots only, and every place says so
    assert report["domain"]["white_background"] == 1.0
    page = (run / "report.html").read_text()
    assert 'id="studio-only"' in page and 'id="other-data"' in page and "eval/shop/report.html" in page
    card = (run / "MODEL_CARD.md").read_text()
    assert "Studio shots only" in card and "Also evaluated on shop (18 images" in card
    assert result.other and result.other_error is None


def test_bad_eval_data_or_class_map_fails_before_training(tmp_path):
    with pytest.raises(DataError, match="--eval-data"):
        train_small(tmp_path, epochs=2, name="a", eval_data=str(tmp_path / "nowhere"))
    photos = _photos(tmp_path / "shop")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"apple": "cherry"}))
    with pytest.raises(DataError, match="cherry"):
        train_small(tmp_path, epochs=2, name="b", eval_data=str(photos), class_map=str(bad))
    for name in ("a", "b"):  # nothing trained
        assert not (tmp_path / name / "checkpoints").exists()


def test_train_info_has_the_time_of_each_stage(trained_run):
    info = json.loads((trained_run / "train_info.json").read_text())
    stages = info["stages"]
    for stage in ("check and split", "full", "calibration", "export", "evaluation"):
        assert stage in stages and stages[stage] >= 0, stage
    assert info["command_seconds"] >= sum(v for k, v in stages.items() if ": " not in k) * 0.99
    peaks = info["stage_peak_mib"]  # the process's peak memory as each stage ended
    assert list(peaks) == list(stages) and all(v > 0 for v in peaks.values())


def test_stage_text_puts_parts_inside_their_stage():
    from fruitlens.runtime import Stages

    s = Stages()
    s.add("features", 3.0)
    s.add("features: backbone", 2.0)
    s.add("head", 1.0)
    assert s.text() == "features 3.0s (backbone 2.0s), head 1.0s"


def test_export_is_not_made_twice_for_one_checkpoint(run_copy):
    onnx = run_copy / "export" / "model.onnx"
    before = onnx.stat().st_mtime_ns
    again = fruitlens.export(run_copy, bench=False)
    assert onnx.stat().st_mtime_ns == before and again.parity["fp32"].top1_agreement >= 0.995
    from fruitlens.models.checkpoint import load_model, save_model

    c = load_model(run_copy / "checkpoints" / "best.ckpt")  # a changed checkpoint: a new export
    save_model(run_copy / "checkpoints" / "best.ckpt", c.model, c.classes, {**c.extra, "note": "changed"})
    fruitlens.export(run_copy, bench=False)
    assert onnx.stat().st_mtime_ns != before


def test_demo_leaves_out_classes_a_leak_free_split_cannot_test(tmp_path):
    from fruitlens.pipelines.demo import splittable_classes

    data = make_tree(tmp_path / "d", per_class=20, classes=("apple", "kiwi", "lemon", "plum"), size=48)
    one = (data / "plum" / "plum_000.jpg").read_bytes()
    for f in (data / "plum").iterdir():  # every plum image a copy of one: one near-duplicate group
        f.write_bytes(one)
    ok, test = splittable_classes(scan(data).manifest)
    assert "plum" not in ok and {"apple", "kiwi", "lemon"} <= set(ok)
    assert all(test[c] >= 1 for c in ok)


def test_a_copy_under_another_label_is_flagged_by_the_majority_of_its_copies():
    from fruitlens.evaluation.audit import audit_labels, neighbours_from_pairs

    # a chain of five frames labelled B and one of them, a copy of the others, labelled A; and a tie of two (C, D);
    # without held-out predictions the copies alone decide
    labels = np.array([1] * 5 + [0, 2, 3])
    pairs = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [2, 5], [1, 5], [6, 7]])
    issues, _ = audit_labels(np.full((8, 4), 0.25), labels, np.zeros(8, bool), neighbours_from_pairs(8, pairs))
    assert {i.index: i.suggested for i in issues} == {5: 1, 6: 3, 7: 2}


def test_evaluate_run_lists_its_earlier_evaluations_on_other_data(run_copy, tmp_path):
    photos = _photos(tmp_path / "market", classes=("apple", "kiwi", "lemon"))
    other = fruitlens.evaluate(run_copy, photos)
    assert [f.name for f in other.domain.figures] == ["market", "test"]
    own = fruitlens.evaluate(run_copy)
    assert [f.name for f in own.domain.figures] == ["test", "market"]
    assert own.domain.figures[1].accuracy == pytest.approx(other.metrics.accuracy)
    again = fruitlens.evaluate(run_copy)  # each folder once
    assert [f.name for f in again.domain.figures] == ["test", "market"]


def test_studio_shots_train_at_photo_size_unless_fast():
    from fruitlens.config import TrainConfig, apply_overrides
    from fruitlens.training.auto import auto_image_size, resolve

    assert auto_image_size(100, studio=True) == 224  # Fruits-360: the size at which photos are read
    assert auto_image_size(100, studio=True, fast=True) == 96  # --fast: the shots' own size
    assert auto_image_size(100, studio=False) == 96  # small images that are not studio shots keep their size
    assert auto_image_size(348, studio=True) == auto_image_size(348) == 448  # photos: unchanged
    cfg = apply_overrides(TrainConfig(), {"data.path": "x"})
    resolved, notes = resolve(cfg, 100, studio=True)
    assert resolved.model.img_size == 224 and any("--fast" in n for n in notes)
    assert resolved.fit.feature_views == 3  # studio shots at photo size: more augmented views
    from fruitlens.config import config_from

    fast, _ = resolve(config_from("x", options={"fast": True}), 100, studio=True)
    assert fast.model.img_size == 96 and fast.fit.feature_views == 1
    assert resolve(cfg, 348, studio=False)[0].fit.feature_views == 1  # photos: one view
    pinned, _ = resolve(apply_overrides(cfg, {"model.img_size": 128}), 100, studio=True)
    assert pinned.model.img_size == 128  # an explicit size always wins


def test_a_head_on_studio_shots_at_photo_size_gets_the_loose_recipe_unless_told_otherwise():
    from fruitlens.config import TrainConfig, apply_overrides, config_from
    from fruitlens.training.auto import resolve

    cfg = apply_overrides(TrainConfig(), {"data.path": "x"})
    studio, notes = resolve(cfg, 100, studio=True)
    assert (studio.fit.weight_decay, studio.fit.target_acc) == (1e-3, 0.0)  # no 98% stop, more weight decay
    assert any("weight decay 0.001" in n for n in notes)
    original = (1e-4, 0.98)  # the original's recipe everywhere else
    assert (lambda f: (f.weight_decay, f.target_acc))(resolve(cfg, 348, studio=False)[0].fit) == original
    assert (lambda f: (f.weight_decay, f.target_acc))(resolve(cfg, 100, studio=False)[0].fit) == original
    fast = resolve(config_from("x", options={"fast": True}), 100, studio=True)[0].fit
    assert (fast.weight_decay, fast.target_acc) == original  # --fast: the studio shots' own size
    tuned = resolve(apply_overrides(cfg, {"fit.fine_tune_blocks": 2}), 100, studio=True)[0].fit
    assert (tuned.weight_decay, tuned.target_acc) == original  # phases that train the backbone keep it
    told = resolve(config_from("x", options={"target_acc": 0.98}), 100, studio=True)[0].fit
    assert (told.weight_decay, told.target_acc) == (1e-3, 0.98)  # an explicit value always wins
    with pytest.raises(Exception, match="fit.weight_decay"):
        apply_overrides(cfg, {"fit.weight_decay": -0.5}).validated()


def test_unlabeled_photos_are_found_at_any_depth_and_bad_ones_listed(tmp_path):
    from fruitlens.data.photos import find_photos as unlabeled_images, readable

    root = tmp_path / "photos"
    (root / "shop" / "monday").mkdir(parents=True)
    (root / ".thumbs").mkdir()
    fruit_image("apple", 1).save(root / "a.jpg")
    fruit_image("kiwi", 2).save(root / "shop" / "monday" / "b.png")
    fruit_image("kiwi", 3).save(root / ".thumbs" / "hidden.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / "shop" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    paths = unlabeled_images(root)
    assert sorted(Path(p).name for p in paths) == ["a.jpg", "b.png", "broken.jpg"]
    ok, bad = readable(paths, workers=1)
    assert [Path(p).name for p in bad] == ["broken.jpg"] and len(ok) == 2
    listing = tmp_path / "list.txt"
    listing.write_text("photos/a.jpg\n\nphotos/shop/monday/b.png\n")
    assert [Path(p).name for p in unlabeled_images(listing)] == ["a.jpg", "b.png"]
    with pytest.raises(DataError, match="no such file or folder"):
        unlabeled_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files found"):
        unlabeled_images(tmp_path / "empty")


def test_pseudo_labels_are_each_class_s_surest_photos():
    import torch

    from fruitlens.training.adapt import confident, shares

    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[10.0, 0], [0, 10.0], [0, 0]]))
    # class 0 is given to four photos, class 1 to two: half of each class, surest first
    feats = torch.tensor([[1.0, 0], [0.2, 0], [0.5, 0], [0.1, 0], [0, 1.0], [0, 0.3]])
    idx, labels = confident(head, feats, 0.5)
    assert idx.tolist() == [0, 2, 4] and labels.tolist() == [0, 0, 1]
    assert confident(head, feats, 0.01)[0].tolist() == [0, 4]  # at least one photo of every class the head gives
    assert head.training  # its mode is restored
    assert shares(0.4, 2) == [0.2, 0.4]


def test_adapt_to_unlabeled_photos_pseudo_labels_them_and_the_report_says_so(tmp_path, capsys):
    from conftest import mobilenet_cached, need
    from fruitlens.cli.main import main

    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not cached (run 'make weights')")
    data = make_tree(tmp_path / "data", per_class=14, size=64)
    photos = _photos(tmp_path / "photos", per_class=8, size=64)  # the same fruit on busy backgrounds, unlabeled
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    before = {p: p.stat().st_mtime_ns for p in photos.rglob("*")}
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(data),
                "--out",
                str(run),
                "--img-size",
                "64",
                "--workers",
                "0",
                "--target-acc",
                "0",
                "--group",
                "none",
                "--adapt-to",
                str(photos),
                "fit.epochs=30",
            ]
        )
        == 0
    )
    assert {p: p.stat().st_mtime_ns for p in photos.rglob("*")} == before  # the photos are read, never touched
    info = json.loads((run / "train_info.json").read_text())
    a = info["adaptation"]
    assert a["method"] == "class-balanced pseudo-labels" and a["images"] == 24
    assert a["skipped"] == [str(photos / "broken.jpg")]
    assert a["share"] == 0.4 and len(a["rounds"]) == 2 and 0 < a["rounds"][0] <= a["rounds"][1] <= 24
    assert sum(a["per_class"].values()) == a["rounds"][-1] and set(a["per_class"]) <= {"apple", "kiwi", "lemon"}
    assert info["phases"][:2] == ["head", "adapt-1"] and "adaptation" in info["stages"]
    assert (run / "cache" / "adapt_features.pt").exists()
    report = json.loads((run / "report.json").read_text())
    assert report["adaptation"] == a
    assert 'id="adaptation"' in (run / "report.html").read_text()
    assert "Adaptation: adapted to 24 unlabeled photos" in (run / "MODEL_CARD.md").read_text()
    assert "adaptation: adapted to 24 unlabeled photos" in capsys.readouterr().out


def test_adapt_to_fails_before_training_where_it_cannot_run(tmp_path):
    from fruitlens.errors import ConfigError

    data = make_tree(tmp_path / "data", per_class=6, size=48)
    with pytest.raises(DataError, match="--adapt-to .*no such file or folder"):
        fruitlens.train(data, tmp_path / "r1", adapt_to=str(tmp_path / "missing"), workers=0, group="none")
    (tmp_path / "photos").mkdir()
    fruit_image("apple", 1).save(tmp_path / "photos" / "a.jpg")
    with pytest.raises(ConfigError, match="--adapt-to adapts the head"):
        fruitlens.train(
            data, tmp_path / "r2", adapt_to=str(tmp_path / "photos"), model="small_cnn", workers=0, group="none"
        )
    assert not (tmp_path / "r1" / "checkpoints").exists() and not (tmp_path / "r2" / "checkpoints").exists()


def test_pseudo_labelled_photos_join_the_unfamiliar_scorer_s_bank():
    import numpy as np
    import torch

    from fruitlens.models.ood import OODScorer

    scorer = OODScorer.fit(torch.eye(4)[:2], np.array([0.1, 0.2, 0.3]), np.array([0.2, 0.4, 0.6]))
    photo = torch.tensor([[0.0, 0.0, 3.0, 0.0]])
    assert float(scorer.distance(photo)) == pytest.approx(1.0)  # unlike every training image
    more = scorer.extended(photo)
    assert more.bank.shape == (3, 4) and float(more.distance(photo)) == pytest.approx(0.0, abs=1e-3)
    assert torch.equal(more.scale, scorer.scale)  # the held-out scale stays


def test_a_class_map_counts_the_answer_predict_gives_not_the_summed_probabilities():
    from fruitlens.evaluation.classmap import ClassMapping
    from fruitlens.evaluation.metrics import compute_metrics

    model = ["Lemon", "Apple A", "Apple B"] + [f"Other {i}" for i in range(5)]
    mapping = ClassMapping({"lemon": ["Lemon"], "apple": ["Apple A", "Apple B"]}, model, "map.json")
    assert mapping.columns == ["apple", "lemon", "(other)"]
    probs = np.array(
        [
            [0.30] + [0.0, 0.0] + [0.14] * 5,  # a lemon: predict says Lemon, the others sum to 0.70
            [0.0, 0.30, 0.0] + [0.14] * 5,
        ]
    )  # an apple: predict says Apple A
    y = np.array([1, 0])
    assert mapping.collapse(probs, y).argmax(1).tolist() == [2, 2]  # summed, both would be "(other)"
    assert mapping.predicted(probs, y).tolist() == [1, 0]  # what predict answers: both right
    m = compute_metrics(y, mapping.collapse(probs, y), mapping.columns, y_pred=mapping.predicted(probs, y))
    assert m.accuracy == 1.0 and m.confusion_matrix[1][1] == 1


def test_the_head_s_training_data_holds_the_pseudo_labelled_photos():
    import torch

    from fruitlens.config import TrainConfig
    from fruitlens.training.features import FeaturePass
    from fruitlens.training.fit import FeatureData

    feats = {
        "train": (torch.zeros(10, 4), torch.zeros(10, dtype=torch.long)),
        "train_aug": (torch.zeros(20, 4), torch.zeros(20, dtype=torch.long), torch.zeros(20, dtype=torch.long)),
        "val": (torch.zeros(5, 4), torch.zeros(5, dtype=torch.long)),
    }
    data = FeatureData(feats, FeaturePass(), TrainConfig(), 3)
    assert len(data.train_dataloader().dataset) == 30
    data.extra = (torch.ones(7, 4), torch.full((7,), 2))
    rows = data.train_dataloader().dataset
    assert len(rows) == 37 and sum(int(y == 2) for _, y in rows) == 7  # the photos, with their pseudo-labels


def test_a_head_on_studio_shots_at_photo_size_reads_mid_level_features_unless_told_otherwise():
    from fruitlens.config import TrainConfig, apply_overrides, config_from
    from fruitlens.training.auto import resolve

    cfg = apply_overrides(TrainConfig(), {"data.path": "x"})
    studio, notes = resolve(cfg, 100, studio=True)
    assert studio.model.feature_layer == "mid" and any("--feature-layer last" in n for n in notes)
    assert resolve(cfg, 348, studio=False)[0].model.feature_layer == "last"  # photos: the last layer
    assert resolve(config_from("x", options={"fast": True}), 100, studio=True)[0].model.feature_layer == "last"
    for kw in (
        {"fit.feature_cache": False},
        {"fit.fine_tune_blocks": 2},
        {"model.name": "resnet18"},
        {"model.feature_layer": "last"},
    ):
        assert resolve(apply_overrides(cfg, kw), 100, studio=True)[0].model.feature_layer == "last", kw
    assert resolve(config_from("x", options={"feature_layer": "mid"}), 348)[0].model.feature_layer == "mid"
    with pytest.raises(Exception, match="model.feature_layer"):
        apply_overrides(cfg, {"model.feature_layer": "middle"}).validated()
