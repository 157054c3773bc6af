import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fruitlens.cli.main import main
from fruitlens.config import TrainConfig, apply_overrides
from fruitlens.evaluation.report import Report
from fruitlens.models.checkpoint import load_model
from fruitlens.pipelines.train import train
from fruitlens.rundir import RunDir
from conftest import HANG, make_tree, mobilenet_cached, need, ROOT


def _cfg(data, **kw):
    base = {"data.path": str(data), "data.num_workers": 0, "fit.batch_size": 16, "data.group": "none"}
    return apply_overrides(TrainConfig(), {**base, **kw}).validated()


def test_run_folder_is_complete(trained_run):
    run = RunDir(trained_run)
    for name in (
        "config.yaml",
        "manifest.csv",
        "labels.json",
        "checkpoints/best.ckpt",
        "history.csv",
        "report.json",
        "report.html",
        "plots/confusion_matrix.png",
    ):
        assert (run.path / name).exists(), name
    assert json.loads(run.labels.read_text()) == ["apple", "kiwi", "lemon", "plum"]
    rows = list(csv.DictReader(run.history.open()))
    assert len(rows) == 3 and rows[0]["phase"] == "full"
    ckpt = load_model(run.best_ckpt)
    assert ckpt.model(torch.zeros(1, 3, 32, 32)).shape == (1, 4) and ckpt.extra["model_name"] == "small_cnn"
    report = Report.from_json(run.report_json)
    assert report.metrics.accuracy > 0.5  # four colours are easy
    # the data picked the random crop (48 px images: studio-shot range) and config.yaml records it
    assert TrainConfig.from_yaml(run.config).augment.crop_scale == 0.6


def test_auto_crop_scale_by_kind_of_data():
    from fruitlens.config import AugmentConfig
    from fruitlens.training.auto import auto_crop_scale

    assert auto_crop_scale(100) == 0.6 and auto_crop_scale(348) == 0.08  # Fruits-360, GroceryStore
    assert AugmentConfig().min_crop_area == 0.08 and AugmentConfig(crop_scale=0.3).min_crop_area == 0.3


def test_auto_epochs_by_phase():
    from fruitlens.training.auto import HEAD_EPOCHS, IMAGE_EPOCHS, auto_epochs

    assert auto_epochs(TrainConfig()) == HEAD_EPOCHS == 40  # a head on cached features: the solver finishes it
    for kw in ({"model.name": "small_cnn"}, {"model.weights": "none"}, {"fit.feature_cache": False}):
        assert auto_epochs(apply_overrides(TrainConfig(), kw)) == IMAGE_EPOCHS == 30, kw


def test_pretrainable_model_without_weights_warns(tmp_path, caplog, monkeypatch):
    from dataclasses import replace

    from fruitlens.models import registry

    # a newly registered model (one registry entry, nothing else) gets the warning too
    monkeypatch.setitem(registry.MODELS, "resnet18_new", replace(registry.MODELS["resnet18"], name="resnet18_new"))
    data = make_tree(tmp_path / "d", per_class=6, size=40)
    cfg = _cfg(
        data,
        **{
            "model.name": "resnet18_new",
            "model.weights": "none",
            "model.img_size": 32,
            "fit.epochs": 1,
            "fit.target_acc": 0,
        },
    )
    with caplog.at_level("WARNING"):
        train(cfg, tmp_path / "run")
    assert "resnet18_new trains from scratch (--weights none)" in caplog.text


def test_mobilenet_feature_cache_then_fine_tune(tmp_path):
    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not cached (run 'make weights')")
    data = make_tree(tmp_path / "d", per_class=12, size=64)
    cfg = _cfg(
        data,
        **{
            "model.img_size": 64,
            "fit.epochs": 4,
            "fit.feature_views": 1,
            "fit.target_acc": 0,
            "fit.fine_tune_blocks": 1,
            "fit.fine_tune_epochs": 1,
        },
    )
    run = train(cfg, tmp_path / "run").run
    rows = list(csv.DictReader(run.history.open()))
    assert {r["phase"] for r in rows} == {"head", "fine-tune"}
    assert (run.path / "cache" / "features.pt").is_file()
    feats = torch.load(run.path / "cache" / "features.pt")
    n_train = sum(1 for r in csv.DictReader(run.manifest.open()) if r["split"] == "train")
    assert feats["train"][0].shape == (n_train, 1280) and feats["train_aug"][0].shape == (n_train, 1280)
    assert Report.from_json(run.report_json).metrics.accuracy >= 0.8


def test_mid_layer_features_train_a_standardised_head_end_to_end(tmp_path):
    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not cached (run 'make weights')")
    from fruitlens.pipelines.calibrate import _recipe
    from fruitlens.training.store import FeatureStore

    data = make_tree(tmp_path / "d", per_class=12, size=64)
    cfg = _cfg(
        data,
        **{
            "model.img_size": 64,
            "model.feature_layer": "mid",
            "fit.epochs": 40,
            "fit.feature_views": 1,
            "fit.target_acc": 0,
        },
    )
    result = train(cfg, tmp_path / "run")
    run = result.run
    feats = torch.load(run.path / "cache" / "features.pt")
    rows = torch.cat([feats["train"][0], feats["train_aug"][0]]).float()  # cached in half precision
    assert rows.shape[1] == 320  # block 17's channels, cached raw
    model = load_model(run.best_ckpt).model
    assert model.feature_layer == "mid"
    # the head standardises on every training row; the trust layer's fold heads do too
    torch.testing.assert_close(model.standardise.mean, rows.mean(0), atol=1e-4, rtol=1e-4)
    assert _recipe(cfg, model).stats is not None
    assert "features of a mid-level block" in (run.path / "MODEL_CARD.md").read_text()
    assert (
        FeatureStore("mobilenet_v2", "imagenet", model.preprocessing, layer="mid").path
        != FeatureStore("mobilenet_v2", "imagenet", model.preprocessing).path
    )  # 320 and 1280 channels never mix
    assert Report.from_json(run.report_json).metrics.accuracy >= 0.8


def test_the_feature_store_tells_weights_apart(tmp_path, monkeypatch):
    # importing MobileNetV2's IMAGENET1K_V2 beside V1 switches 'imagenet' to it: V1's cached features must not be read
    from torchvision.models import MobileNet_V2_Weights

    from fruitlens.models.preprocessing import Preprocessing
    from fruitlens.training.store import FeatureStore

    pre = Preprocessing(96, 96, (0.5,) * 3, (0.25,) * 3)
    store = lambda weights: FeatureStore("mobilenet_v2", weights, pre, cache=tmp_path).path
    monkeypatch.setattr("fruitlens.models.registry.imagenet_weights", lambda spec: MobileNet_V2_Weights.IMAGENET1K_V1)
    v1 = store("imagenet")
    monkeypatch.setattr("fruitlens.models.registry.imagenet_weights", lambda spec: MobileNet_V2_Weights.IMAGENET1K_V2)
    assert store("imagenet") != v1
    own = tmp_path / "mine.pth"
    own.write_bytes(b"one")
    first = store(str(own))
    own.write_bytes(b"other weights")  # the same file name, other contents
    assert store(str(own)) != first and first != v1


def test_feature_engine_matches_pytorch_and_leaves_no_temp_files(tmp_path, monkeypatch):
    import tempfile

    from torch import nn

    from fruitlens.training.engine import Engine

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the ONNX file is written (and removed) here
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    engine = Engine(backbone, 32)
    x = torch.randn(4, 3, 32, 32)
    assert engine.name == "onnxruntime"
    torch.testing.assert_close(engine(x), backbone(x).detach(), atol=1e-5, rtol=1e-4)
    assert list(tmp_path.iterdir()) == []  # every training run used to leave an 8.5 MB backbone.onnx in /tmp


def test_last_checkpoint_is_the_last_epoch_not_the_best(tmp_path, monkeypatch):
    from fruitlens.training.module import ClassifierModule

    log = ClassifierModule.log

    def rising_val_loss(self, name, value, *args, **kwargs):  # only the first epoch is the best one
        return log(self, name, value + self.current_epoch if name == "val/loss" else value, *args, **kwargs)

    monkeypatch.setattr(ClassifierModule, "log", rising_val_loss)
    data = make_tree(tmp_path / "d", per_class=6, size=40)
    run = train(
        _cfg(data, **{"model.name": "small_cnn", "model.img_size": 32, "fit.epochs": 3, "fit.target_acc": 0}),
        tmp_path / "run",
    ).run
    epoch = lambda name: torch.load(run.checkpoints / "full" / name, weights_only=True)["epoch"]
    assert epoch("best.ckpt") == 0
    assert epoch("last.ckpt") == 2  # --resume continues after the last epoch, not from the best one


def test_target_accuracy_stops_training(tmp_path, capfd):
    data = make_tree(tmp_path / "d", per_class=10, size=40)
    run = train(
        _cfg(data, **{"model.name": "small_cnn", "model.img_size": 32, "fit.epochs": 20, "fit.target_acc": 0.01}),
        tmp_path / "run",
    ).run
    assert len(list(csv.DictReader(run.history.open()))) == 1
    out = capfd.readouterr()
    assert "it/s" not in out.out + out.err  # not a terminal: no progress bar redraws, the epoch summary is enough


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    one = make_tree(tmp_path / "one", per_class=6, classes=("apple",))
    assert main(["train", str(one), "--out", str(tmp_path / "r1")]) != 0
    assert "only the class 'apple'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", str(tmp_path / "empty"), "--out", str(tmp_path / "r2")]) != 0
    assert "no images found" in capsys.readouterr().err
    two = make_tree(tmp_path / "two", per_class=6, classes=("apple", "kiwi"))
    assert main(["train", str(two), "--model", "mobilnet_v2", "--out", str(tmp_path / "r3")]) != 0
    err = capsys.readouterr().err
    assert "Did you mean 'mobilenet_v2'" in err and "Traceback" not in err
    # before the data is read: a typo fails at once, not after minutes of checking a large folder
    assert main(["train", str(tmp_path / "no-data"), "--model", "mobilnet_v2", "--out", str(tmp_path / "r3")]) == 4
    assert main(["train", str(tmp_path / "no-data"), "--weights", "imagenett", "--out", str(tmp_path / "r3")]) == 5
    assert "Did you mean 'imagenet'" in capsys.readouterr().err
    assert main(["train", str(two), "--out", str(two / "run")]) == 2  # a run inside the data becomes a class of it
    assert "is inside the data folder" in capsys.readouterr().err and not (two / "run").exists()
    assert main(["train", str(two), "--img-size", "16", "--weights", "none", "--out", str(tmp_path / "r4")]) != 0
    assert "too small for mobilenet_v2" in capsys.readouterr().err
    assert main(["train", str(two), "--weights", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "r5")]) != 0
    assert "nope.pth: no such file" in capsys.readouterr().err
    assert not [r for r in ("r1", "r2", "r3", "r4", "r5") if (tmp_path / r).exists()]  # no empty run folder left
    assert main(["train", str(tmp_path / "empty"), "--out", str(tmp_path / "runs" / "a" / "r6")]) != 0
    assert not (tmp_path / "runs").exists()  # nor the parents it made for it
    kept = tmp_path / "mine"
    (kept / "notes.txt").parent.mkdir()
    (kept / "notes.txt").write_text("the user's")
    assert main(["train", str(tmp_path / "empty"), "--out", str(kept)]) != 0
    assert (kept / "notes.txt").read_text() == "the user's"  # a folder that was there stays, with what it held


def test_a_new_run_refuses_an_unfinished_runs_folder(tmp_path, capsys):
    # a run killed after its feature pass leaves config.yaml and cache/: a new run must not read them as its own
    data = make_tree(tmp_path / "d", per_class=6, classes=("apple", "kiwi"))
    out = tmp_path / "run"
    (out / "cache").mkdir(parents=True)
    (out / "cache" / "features.pt").write_bytes(b"an earlier run's features")
    (out / "config.yaml").write_text("earlier: run\n")
    assert main(["train", str(data), "--out", str(out), "--model", "small_cnn", "--img-size", "32"]) == 6
    err = capsys.readouterr().err
    assert "holds an unfinished run (config.yaml, cache)" in err and f"--resume {out}" in err
    assert (out / "cache" / "features.pt").read_bytes() == b"an earlier run's features"  # left as it was
    assert (out / "config.yaml").read_text() == "earlier: run\n"


def test_ddp_on_two_cpu_processes(tmp_path):
    data = make_tree(tmp_path / "d", per_class=8, size=40)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fruitlens",
        "train",
        str(data),
        "--out",
        str(out),
        "--model",
        "small_cnn",
        "--img-size",
        "32",
        "--epochs",
        "2",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--accelerator",
        "cpu",
        "--workers",
        "0",
        "--target-acc",
        "0",
        "--group",
        "none",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "report.json").is_file()
    assert json.loads((out / "train_info.json").read_text())["world_size"] == 2  # both processes trained
    # one set of messages: rank zero speaks for the run, data preparation ran once
    assert proc.stderr.count("[full] epoch 1:") == 1 and proc.stdout.count("test accuracy") == 1, proc.stderr


def _features_of(run: Path) -> dict:
    return torch.load(run / "cache" / "features.pt", weights_only=True)


def test_ddp_shards_the_feature_pass_and_merges_to_the_single_process_cache(tmp_path):
    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not cached (run 'make weights')")
    data = make_tree(tmp_path / "d", per_class=20, size=48)  # 42 training images: two batches of 32, one each
    common = [
        "train",
        str(data),
        "--img-size",
        "32",
        "--epochs",
        "2",
        "--workers",
        "0",
        "--target-acc",
        "0",
        "--group",
        "none",
        "--feature-views",
        "1",
        "--accelerator",
        "cpu",
    ]
    two = ["--devices", "2", "--strategy"]
    for name, extra in (("single", []), ("ddp", [*two, "ddp"]), ("spawn", [*two, "ddp_spawn"])):
        # a feature store of its own: each run computes every feature itself
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "FRUITLENS_CACHE": str(tmp_path / f"cache-{name}")}
        proc = subprocess.run(
            [sys.executable, "-m", "fruitlens", *common, "--out", str(tmp_path / name), *extra],
            capture_output=True,
            text=True,
            timeout=HANG,
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = _features_of(tmp_path / "single")
    for ddp in (_features_of(tmp_path / "ddp"), _features_of(tmp_path / "spawn")):
        for key in ("train", "val", "train_aug"):  # the merged shards are the single-process pass, views included
            assert len(single[key]) == len(ddp[key])
            for a, b in zip(single[key], ddp[key]):
                assert torch.equal(a, b), key
    fp = json.loads((tmp_path / "ddp" / "train_info.json").read_text())["feature_pass"]
    n_train, n_val = len(single["train"][0]), len(single["val"][0])
    assert fp["world_size"] == 2 and sum(fp["images_per_rank"]) == n_train + n_val  # each image once, not twice
    assert all(n > 0 for n in fp["images_per_rank"]) and len(fp["seconds_per_rank"]) == 2
    assert not list((tmp_path / "ddp" / "cache").glob("*.rank*.pt"))  # the shards are merged and gone
    solo = json.loads((tmp_path / "single" / "train_info.json").read_text())["feature_pass"]
    assert solo["world_size"] == 1 and solo["images_per_rank"] == [n_train + n_val]


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_feature_cache_is_memory_mapped_and_resume_reuses_it(tmp_path):
    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not cached (run 'make weights')")
    need(Path("/proc/self/maps").is_file(), "needs Linux's /proc to see memory maps")
    from fruitlens.data.check import check
    from fruitlens.data.scan import scan
    from fruitlens.data.split import split
    from fruitlens.models.registry import build_model
    from fruitlens.training import loaders
    from fruitlens.training.features import Views, cached_features

    data = make_tree(tmp_path / "d", per_class=8, size=48)
    cfg = _cfg(data)
    m = split(check(scan(data)), group="none").manifest
    net = build_model("mobilenet_v2", 3, weights="imagenet", img_size=32)
    datasets = {s: loaders.dataset(m.split(s), m.classes, net.preprocessing, cfg) for s in ("train", "val")}
    cache = tmp_path / "run" / "cache" / "features.pt"
    kw = dict(views=Views(1, cfg.augment, 0), batch_size=8, cache_file=cache)
    first, fp = cached_features(net.backbone, net.preprocessing, datasets, **kw)
    assert not fp.reused and fp.images_per_rank == [len(datasets["train"]) + len(datasets["val"])]
    assert _mapped(cache)  # the head reads pages of the file
    again, fp2 = cached_features(net.backbone, net.preprocessing, datasets, **kw)  # --resume: no pass
    assert fp2.reused and fp2.images_per_rank == fp.images_per_rank
    for key in first:
        for a, b in zip(first[key], again[key]):
            assert torch.equal(a, b)
