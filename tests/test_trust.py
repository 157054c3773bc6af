"""The trust layer: calibrated scores, "not sure", "unfamiliar", and where the model looked."""

import base64
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fruitlens.cli.main import main
from fruitlens.evaluation.selective import fit_temperature, risk_coverage, threshold_for_accuracy
from fruitlens.inference.predictor import Predictor
from fruitlens.training.heldout import HeadRecipe, group_folds, visual_groups
from fruitlens.evaluation.trust import fit_out_of_fold
from conftest import fruit_image, jpeg_bytes


def test_fit_temperature_recovers_the_temperature_of_the_data():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 5))
    p = np.exp(logits / 2.0)
    p /= p.sum(1, keepdims=True)  # labels drawn from softmax(logits / 2): the true temperature is 2
    y = np.array([rng.choice(5, p=row) for row in p])
    assert fit_temperature(logits, y) == pytest.approx(2.0, rel=0.08)
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0


def test_threshold_rule_on_synthetic_scores():
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    correct = np.array([1, 1, 1, 1, 0, 1, 0, 0, 1, 0], bool)
    # answered from the top: 1, 1, 1, 1, .8, .83, .71, .63, .67, .6
    assert threshold_for_accuracy(conf, correct, 0.8) == pytest.approx(0.6)  # the largest coverage at >= 80%
    assert threshold_for_accuracy(conf, correct, 0.95) == pytest.approx(0.8)
    assert threshold_for_accuracy(conf, correct, 0.5) == 0.0  # all answered
    assert threshold_for_accuracy(conf, ~correct, 0.9) == 1.0  # never reached: every answer is "not sure"
    rc = risk_coverage(conf, correct)
    assert rc.coverage[-1] == 1.0 and rc.accuracy[-1] == pytest.approx(0.6)
    assert rc.coverage_at == {"0.9": 0.4, "0.95": 0.4, "0.99": 0.4}
    assert rc.aurc == pytest.approx(np.mean(1 - np.cumsum(correct) / np.arange(1, 11)))


def _clusters(n_per: int, classes: int, seed: int, dim: int = 32, spread: float = 0.6, noise_seed: int = 1):
    """Features of ``classes`` known classes around their centres, and of two classes the model never sees."""
    centres = np.random.default_rng(seed).normal(0, 1, (classes + 2, dim))
    rng = np.random.default_rng(noise_seed)
    x = np.concatenate([centres[c] + spread * rng.normal(0, 1, (n_per, dim)) for c in range(classes)])
    y = np.repeat(np.arange(classes), n_per)
    out_of_class = centres[classes:].repeat(n_per, 0) + spread * rng.normal(0, 1, (2 * n_per, dim))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y), torch.tensor(out_of_class, dtype=torch.float32)


def test_ood_score_ranks_out_of_class_features_higher():
    from sklearn.metrics import roc_auc_score

    from fruitlens.training.heldout import train_head

    x, y, strangers = _clusters(60, 4, 0, spread=0.3)
    recipe = HeadRecipe(weight_decay=1e-2)
    groups = np.arange(len(y)) // 3  # little groups of three
    trust, scorer, _ = fit_out_of_fold(x, y, [("triples", groups)], 4, recipe, 0.95)
    head = train_head(x, y, 4, recipe)
    known, _, _ = _clusters(30, 4, 0, spread=0.3, noise_seed=7)  # new samples of the known classes
    with torch.no_grad():
        score = lambda f: scorer(f, torch.softmax(head(f) / trust.temperature, 1)).numpy()
        s_known, s_out = score(known), score(strangers)
    auc = roc_auc_score(np.r_[np.zeros(len(s_known)), np.ones(len(s_out))], np.r_[s_known, s_out])
    assert auc > 0.9 and s_out.mean() > s_known.mean()
    assert (s_out > trust.ood_threshold).mean() > 0.5 > (s_known > trust.ood_threshold).mean()
    assert 0 < trust.temperature < 20 and trust.heldout_images == len(y) and 0.03 <= trust.heldout_ood_flagged <= 0.07
    assert "95th percentile" in trust.ood_rule and scorer.bank.dtype == torch.float16


def test_fold_heads_standardise_their_features_as_a_mid_layer_head_does_and_start_from_the_real_head():
    from fruitlens.training.heldout import train_head

    x, y, _ = _clusters(20, 3, 0, spread=0.3)
    x = x * 5 + 3  # features far from zero mean, unit spread
    plain = train_head(x, y, 3, HeadRecipe())
    assert torch.equal(plain.mean, torch.zeros(x.shape[1])) and torch.equal(plain.std, torch.ones(x.shape[1]))
    stats = (x.mean(0), x.std(0) + 1e-3)
    std = train_head(x, y, 3, HeadRecipe(stats=stats))
    torch.testing.assert_close(std.mean, stats[0])
    # the same objective from the real head: the same head, in fewer steps
    again = train_head(x, y, 3, HeadRecipe(stats=stats), init=std)
    torch.testing.assert_close(again(x), std(x), atol=1e-3, rtol=1e-3)
    # the solver's minimum is the head with the lowest penalised loss: a perturbed head scores worse
    import torch.nn.functional as F

    loss = lambda h: float(F.cross_entropy(h(x), y) + 0.5 * 1e-4 * (h.weight**2).sum())
    from fruitlens.training.solver import LinearFit

    moved = LinearFit(std.weight + 0.05 * torch.randn_like(std.weight), std.bias, std.mean, std.std)
    assert loss(std) < loss(moved)


def test_folds_keep_groups_whole_and_coarse_groups_join_near_copies():
    y = np.repeat([0, 1, 2], 20)
    groups = np.arange(60) // 4
    folds = group_folds(y, groups, 5, seed=0)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    x = torch.randn(60, 8)
    x[:10] = x[0] + 0.01 * torch.randn(10, 8)  # ten near-identical images of class 0
    vg = visual_groups(np.array([f"g{i // 2}" for i in range(60)]), x, y, images_per_group=5)
    assert len(set(vg[:10])) == 1  # clustered together
    assert all(vg[2 * i] == vg[2 * i + 1] for i in range(30))  # near copies stay together


def test_folds_that_hold_out_whole_classes_fall_back_to_finer_groups():
    x, y, _ = _clusters(20, 3, 1, spread=0.3)
    one_group_per_class = y.numpy()
    trust, _, _ = fit_out_of_fold(x, y, [("classes", one_group_per_class)], 3, HeadRecipe(), 0.95)
    assert "classes" not in trust.source and "single images" in trust.source
    assert trust.heldout_accuracy > 0.8  # not the near-chance figure of heads that never saw the class


def test_a_grouping_that_joins_every_image_falls_back_to_finer_groups():
    # a near copy filed under both classes can join every image into one visual group: no folds can be made of it
    x, y, _ = _clusters(10, 2, 1, spread=0.3)
    one_group = np.zeros(len(y), dtype=int)
    assert len(set(group_folds(y.numpy(), one_group, 5))) == 1
    trust, _, _ = fit_out_of_fold(x, y, [("near copies", one_group)], 2, HeadRecipe(), 0.95)
    assert "single images" in trust.source


def test_trained_run_folds_the_temperature_and_onnx_matches(trained_run):
    from fruitlens.models.checkpoint import load_model
    from fruitlens.models.serving import ServingModel

    ckpt = load_model(trained_run / "checkpoints" / "best.ckpt")
    from fruitlens.models.trust import Trust

    trust = Trust.from_saved(ckpt.extra["trust"])  # stored as JSON, read back through its type
    assert trust.temperature > 0 and "validation split" in trust.source  # small_cnn trained its backbone
    assert ckpt.model.ood is not None
    onnx_p, torch_p = Predictor.load(trained_run), Predictor.load(trained_run, engine="torch")
    assert onnx_p.engine == "onnxruntime" and onnx_p.trust == torch_p.trust == trust
    pixels = np.stack([onnx_p.pixels(fruit_image(c, 4, 48)) for c in ("apple", "kiwi", "lemon", "plum")])
    a, b = onnx_p.outputs_batch(pixels), torch_p.outputs_batch(pixels)
    for name in ("logits", "features", "class_maps", "ood_score"):
        np.testing.assert_allclose(a[name], b[name], atol=2e-4, rtol=1e-3, err_msg=name)
    # the checkpoint's head is the trained head divided by T: argmax unchanged, scores softened or sharpened
    with torch.no_grad():
        x = torch.from_numpy(onnx_p.inputs(pixels))
        folded = ServingModel(ckpt.model)(x)[0]
    assert np.array_equal(folded.argmax(1).numpy(), a["logits"].argmax(1))


def test_predict_json_and_csv_carry_the_trust_fields(trained_run, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for c in ("apple", "kiwi"):
        fruit_image(c, 3, 48).save(folder / f"{c}.jpg")
    (folder / "bad.jpg").write_bytes(b"junk")
    out_csv = tmp_path / "p.csv"
    assert main(["predict", str(trained_run), str(folder), "--json", "--csv", str(out_csv), "--top-k", "2"]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    good = [x for x in lines if "error" not in x]
    assert {"path", "label", "score", "top_k", "unknown", "reason", "ood_score"} <= set(good[0])
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["path"] for r in rows] == [x["path"] for x in lines]  # one row per image, in order, errors too
    for r, x in zip(rows, lines):
        if "error" in x:
            assert r["reason"].startswith("error:") and r["label"] == ""
            continue
        assert r["label"] == x["label"] and float(r["score"]) == pytest.approx(x["score"], abs=1e-6)
        assert r["unknown"] == str(x["unknown"]) and float(r["ood_score"]) == pytest.approx(x["ood_score"], abs=1e-6)
        assert r["top2_label"] == x["top_k"][1]["label"]
    # a threshold above every probability: everything is "not sure", still with its top-k
    assert main(["predict", str(trained_run), str(folder / "apple.jpg"), "--json", "--unknown-threshold", "1"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["unknown"] and one["reason"] in ("not sure", "unfamiliar") and len(one["top_k"]) == 3
    with pytest.raises(SystemExit) as exc:  # argparse's own usage error
        main(["predict", str(trained_run), str(folder / "apple.jpg"), "--unknown-threshold", "2"])
    assert exc.value.code == 2 and "between 0 and 1" in capsys.readouterr().err


def test_explain_writes_an_overlay_of_the_image_size(trained_run, tmp_path, capsys):
    img = fruit_image("lemon", 5, 48).resize((70, 50))
    img.save(tmp_path / "lemon.jpg")
    assert main(["predict", str(trained_run), str(tmp_path / "lemon.jpg"), "--explain", str(tmp_path / "out")]) == 0
    png = Image.open(tmp_path / "out" / "lemon.png")
    assert png.format == "PNG" and png.size == (70, 50)


def test_serve_explain_returns_a_png_heatmap_of_the_image_size(trained_run):
    from fastapi.testclient import TestClient

    from fruitlens.serve.app import create_app
    from fruitlens.serve.settings import ServeSettings

    data = jpeg_bytes(fruit_image("kiwi", 2, 48).resize((64, 40)))
    with TestClient(create_app(ServeSettings(str(trained_run)))) as c:
        plain = c.post("/predict", files={"file": ("k.jpg", data, "image/jpeg")}).json()
        assert "heatmap" not in plain or plain["heatmap"] is None
        assert {"unknown", "reason", "ood_score"} <= set(plain)
        r = c.post("/predict?explain=true", files={"file": ("k.jpg", data, "image/jpeg")}).json()
    head, b64 = r["heatmap"].split(",", 1)
    assert head == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(b64))).size == (64, 40)
    assert r["label"] == plain["label"] and r["score"] == pytest.approx(plain["score"])


def test_report_shows_calibration_and_selective_prediction(trained_run):
    from fruitlens.evaluation.report import Report

    rep = Report.from_json(trained_run / "report.json")
    t = rep.trust
    assert t is not None and t.ece_before is not None and t.ece_after is not None
    assert t.risk_coverage.coverage[-1] == 1.0 and set(t.risk_coverage.coverage_at) == {"0.9", "0.95", "0.99"}
    assert 0 <= t.answered <= 1 and t.not_sure + t.unfamiliar == pytest.approx(1 - t.answered)
    page = (trained_run / "report.html").read_text()
    assert 'id="calibration"' in page and 'id="selective"' in page and "ECE before" in page
    assert (trained_run / "plots" / "risk_coverage.png").stat().st_size > 1000


def test_a_run_that_is_never_sure_says_so_in_summary_report_and_card(trained_run, capsys):
    # a small or hard data set can give held-out predictions that reach the target accuracy at no threshold: then
    # every answer is "not sure", and the user must hear why (a 100% test split would hide it)
    from dataclasses import replace

    from fruitlens.cli.train_cmds import print_summary
    from fruitlens.evaluation.card import model_card
    from fruitlens.evaluation.html import render_html
    from fruitlens.evaluation.report import Report

    rep = Report.from_json(trained_run / "report.json")
    assert "at no confidence threshold" not in (trained_run / "report.html").read_text()  # this run answers
    never = replace(rep, trust=replace(rep.trust, unknown_threshold=1.0))
    print_summary(trained_run / "report.html", never)
    assert "warning: held-out predictions" in capsys.readouterr().out
    assert "so every answer is &#39;not sure&#39;" in render_html(never, {})
    assert "**Warning:** held-out predictions" in model_card(never)
