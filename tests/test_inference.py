import json
import logging

import numpy as np
import onnx
import pytest
import torch

from fruitlens.cli.main import main
from fruitlens.errors import ExportError, ImageError
from fruitlens.inference.onnx import Parity
from fruitlens.inference.predictor import Predictor
from fruitlens.pipelines import export as ex
from conftest import fruit_image


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    import shutil

    run = shutil.copytree(trained_run, tmp_path_factory.mktemp("exported") / "run")  # export rewrites the run's model
    return run, ex.export(run, int8=True, bench=True)


def test_every_path_feeds_the_model_the_same_pixels(trained_run, tmp_path):
    """Training's dataset, the predictor (predict, evaluate) and the service decode a file identically."""
    from fruitlens.data.dataset import ImageDataset
    from fruitlens.data.manifest import Manifest, Record

    p = Predictor.load(trained_run, engine="torch")
    img = fruit_image("plum", 9, 57).resize((57, 41))
    img.save(tmp_path / "p.jpg", quality=90)
    training = ImageDataset(Manifest((Record(str(tmp_path / "p.jpg"), "plum"),)), ["plum"], p.preprocessing)[0][0]
    from_path = p.pixels(tmp_path / "p.jpg")
    from_bytes = p.pixels((tmp_path / "p.jpg").read_bytes())  # what serve decodes
    assert np.array_equal(training.permute(1, 2, 0).numpy(), from_path) and np.array_equal(from_path, from_bytes)


def test_auto_engine_uses_the_export_of_this_checkpoint(run_copy):
    assert Predictor.load(run_copy).engine == "onnxruntime"  # training exported it
    assert Predictor.load(run_copy, engine="torch").engine == "pytorch"
    # a checkpoint the export was not made from (e.g. retrained in place): auto falls back to PyTorch
    ckpt = run_copy / "checkpoints" / "best.ckpt"
    ckpt.write_bytes(ckpt.read_bytes())  # same content: still the export's checkpoint
    assert Predictor.load(run_copy).engine == "onnxruntime"
    from fruitlens.models.checkpoint import load_model, save_model

    c = load_model(ckpt)
    save_model(ckpt, c.model, c.classes, {"note": "changed"})
    assert Predictor.load(run_copy).engine == "pytorch"


def test_predict_paths_pil_and_arrays_agree(trained_run, tmp_path):
    p = Predictor.load(trained_run)
    img = fruit_image("kiwi", 7, 48)
    img.save(tmp_path / "k.png")
    a, b, c = p.predict([tmp_path / "k.png", img, np.asarray(img)], top_k=2)
    assert a.label == b.label == c.label and abs(a.score - c.score) < 1e-5
    assert len(a.top_k) == 2 and a.top_k[0] == (a.label, a.score) and a.score >= a.top_k[1][1]
    with pytest.raises(ImageError, match="not an image"):
        (tmp_path / "bad.jpg").write_bytes(b"junk")
        p.predict([tmp_path / "bad.jpg"])


def test_predict_many_keeps_order_across_prefetched_batches(trained_run, tmp_path):
    p = Predictor.load(trained_run)
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    images = (
        [fruit_image("kiwi", i, 48) for i in range(5)]
        + [tmp_path / "bad.jpg"]
        + [fruit_image("plum", i, 48) for i in range(6)]
    )
    got = list(p.predict_many(images, top_k=1, batch_size=4))  # 3 batches, decoded one batch ahead
    assert [im for im, _ in got] == images
    assert isinstance(got[5][1], ImageError) and "bad.jpg" in got[5][1].message
    want = p.predict([im for im in images if not isinstance(im, type(tmp_path))], top_k=1, batch_size=32)
    assert [r.label for _, r in got if not isinstance(r, ImageError)] == [w.label for w in want]


def test_cli_predict_reports_bad_file_and_goes_on(trained_run, tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    fruit_image("apple", 1, 48).save(folder / "a.jpg")
    rgba = fruit_image("lemon", 2, 48).convert("RGBA")
    rgba.save(folder / "sub" / "alpha.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8junk")
    assert main(["predict", str(trained_run), str(folder), "--json", "--top-k", "2"]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3
    errors = [x for x in lines if "error" in x]
    assert len(errors) == 1 and errors[0]["path"].endswith("broken.jpg")
    assert all(len(x["top_k"]) == 2 for x in lines if "error" not in x)
    assert main(["predict", str(trained_run), str(folder / "a.jpg"), "--unknown-threshold", "1"]) == 0
    assert "not sure: " in capsys.readouterr().out or "unfamiliar: " in capsys.readouterr().out


def test_export_metadata_parity_and_speed(exported):
    run, res = exported
    proto = onnx.load(str(run / "export" / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["fruitlens_classes"]) == ["apple", "kiwi", "lemon", "plum"]
    assert json.loads(meta["fruitlens_preprocessing"])["image_size"] == 32
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert (run / "export" / "labels.txt").read_text().split() == ["apple", "kiwi", "lemon", "plum"]
    assert res.parity["fp32"].top1_agreement == 1.0 and res.parity["fp32"].max_abs_logit_diff < 1e-3
    assert res.parity["fp32"].max_abs_ood_diff < 1e-3  # the score serve's "unfamiliar" rests on, checked too
    assert {"pytorch", "model.onnx", "model.int8.onnx"} <= set(res.speed)
    assert json.loads((run / "export" / "export.json").read_text())["parity"]["fp32"]["top1_agreement"] == 1.0
    assert not list((run / "export").glob("*partial*"))  # temporary files are gone


def test_int8_model_agrees_and_predicts(exported):
    run, res = exported
    assert res.parity["int8"].images > 0 and res.parity["int8"].top1_agreement >= 0.9
    int8 = Predictor.load(run / "export" / "model.int8.onnx")
    fp32 = Predictor.load(run / "export" / "model.onnx")
    imgs = [fruit_image(c, i, 48) for c in ("apple", "kiwi", "lemon", "plum") for i in range(4)]
    assert int8.classes == fp32.classes and int8.engine == "onnxruntime"
    agree = np.mean([a.label == b.label for a, b in zip(int8.predict(imgs), fp32.predict(imgs))])
    assert agree >= 0.8


def test_an_int8_model_of_an_earlier_checkpoint_is_removed_on_export(exported, tmp_path):
    import shutil

    run = shutil.copytree(exported[0], tmp_path / "run")
    int8 = run / "export" / "model.int8.onnx"
    ex.export(run, bench=False)
    assert int8.is_file()  # the same checkpoint: its int8 model still answers for it
    ckpt = run / "checkpoints" / "best.ckpt"
    state = torch.load(ckpt, weights_only=False)
    state["resumed"] = True  # a resumed run's new best checkpoint (other bytes)
    torch.save(state, ckpt)
    ex.export(run, bench=False)
    assert not int8.exists()  # it would have answered for the old model


def test_int8_below_the_agreement_threshold_warns_and_keeps_fp32(run_copy, monkeypatch, caplog):
    from dataclasses import replace

    real = ex.onnx_io.parity
    references = {}

    def parity(model, path, batch, reference=None):
        references[path.name] = reference
        got = real(model, path, batch, reference=reference)
        return replace(got, top1_agreement=0.5) if "int8" in path.name else got

    monkeypatch.setattr(ex.onnx_io, "parity", parity)
    with caplog.at_level(logging.WARNING):
        res = ex.export(run_copy, int8=True, bench=False)
    assert "keep using the fp32 model" in caplog.text and res.parity["fp32"].top1_agreement == 1.0
    # the int8 model is checked against the fp32 export that passed parity with PyTorch on the same batch
    fp32 = run_copy / "export" / "model.onnx"
    assert references["model.int8.partial.onnx"] == fp32
    # and that reference's outputs are what it is compared with: the fp32 model against itself differs by nothing
    from fruitlens.data.manifest import Manifest
    from fruitlens.models.checkpoint import load_model

    model = load_model(run_copy / "checkpoints" / "best.ckpt").model
    batch = ex.model_inputs(Manifest.from_csv(run_copy / "manifest.csv"), model.preprocessing, 8)
    same = real(model, fp32, batch, reference=fp32)
    assert same.top1_agreement == 1.0 and same.max_abs_logit_diff == 0.0 and same.max_abs_ood_diff == 0.0
    assert (run_copy / "export" / "model.onnx").is_file()


def test_an_export_whose_ood_score_drifts_is_refused(run_copy, monkeypatch):
    # a broken OOD scorer in the graph changes every "unfamiliar" answer of serve while the logits still agree
    from fruitlens.models.serving import ServingModel

    (run_copy / "export" / "model.onnx").unlink()
    real = ex.onnx_io.export_module

    def drifting(module, path, *args, **kwargs):
        class Drift(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                out = self.inner(x)
                return (*out[:3], out[3] + 1.0)

        return real(Drift(module) if isinstance(module, ServingModel) else module, path, *args, **kwargs)

    monkeypatch.setattr(ex.onnx_io, "export_module", drifting)
    with pytest.raises(ExportError, match="ood_score differs from PyTorch's"):
        ex.export(run_copy, bench=False)
    assert not list((run_copy / "export").glob("*.onnx"))


def test_onnx_predictor_matches_pytorch(exported):
    run, _ = exported
    imgs = [fruit_image(c, 3, 48) for c in ("apple", "kiwi", "lemon", "plum")]
    torch_p = Predictor.load(run, engine="torch").predict(imgs)
    onnx_p = Predictor.load(run / "export" / "model.onnx")
    assert onnx_p.classes == ["apple", "kiwi", "lemon", "plum"]
    for a, b in zip(torch_p, onnx_p.predict(imgs)):
        assert a.label == b.label and abs(a.score - b.score) < 1e-4


def test_failed_parity_writes_no_model_and_nothing_uses_one(run_copy, monkeypatch, capsys):
    (run_copy / "export" / "model.onnx").unlink()
    monkeypatch.setattr(
        ex.onnx_io, "parity", lambda model, path, batch: Parity(images=1, top1_agreement=0.5, max_abs_logit_diff=9.0)
    )
    with pytest.raises(ExportError, match="agreement 50.00%"):
        ex.export(run_copy, bench=False)
    assert not list((run_copy / "export").glob("*.onnx"))  # no model.onnx, no partial file left
    assert Predictor.load(run_copy).engine == "pytorch"  # predict, evaluate and serve fall back to the checkpoint
    assert main(["export", str(run_copy)]) == 7  # ExitCode.EXPORT
    assert "no model.onnx was written" in capsys.readouterr().err


def test_an_image_where_the_model_goes_gets_a_clear_error(tmp_path, capsys):
    img = tmp_path / "apple.jpg"
    fruit_image("apple", 1, 48).save(img)
    assert main(["predict", str(img), str(img)]) == 6  # ExitCode.RUN_DIR
    err = capsys.readouterr().err
    assert "expected a run folder or an exported .onnx model but received a file" in err
    assert "--out " + str(img) not in err  # not the advice to train into the image's name
