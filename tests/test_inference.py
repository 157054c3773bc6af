import json

import numpy as np
import onnx
import pytest

from fruitlens.cli.main import main
from fruitlens.errors import DataError
from fruitlens.inference.export import export_run
from fruitlens.inference.predictor import Predictor
from conftest import fruit_image


@pytest.fixture(scope="module")
def exported(trained_run):
    figures = export_run(trained_run, int8=True, bench=True)
    return trained_run, figures


def test_fast_preprocessing_equals_the_training_transforms(trained_run):
    from fruitlens.data.images import shrink
    from fruitlens.data.transforms import eval_transforms

    p = Predictor.from_run(trained_run, engine="torch")
    img = fruit_image("plum", 9, 57).resize((57, 41))
    # what the training loader feeds the model: load_image(path, min_side) then eval_transforms
    want = eval_transforms(p.preprocessing)(shrink(img, int(p.preprocessing.resize_size * 1.25))).numpy()
    got = p.inputs(np.stack([p.pixels(img)]))[0]
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-5


def test_auto_engine_uses_the_fresh_export(trained_run):
    assert Predictor.from_run(trained_run).engine == "onnxruntime"  # training exported it
    assert Predictor.from_run(trained_run, engine="torch").engine == "pytorch"


def test_predict_paths_pil_and_arrays_agree(trained_run, tmp_path):
    p = Predictor.from_run(trained_run)
    img = fruit_image("kiwi", 7, 48)
    img.save(tmp_path / "k.png")
    a, b, c = p.predict([tmp_path / "k.png", img, np.asarray(img)], top_k=2)
    assert a.label == b.label == c.label and abs(a.score - c.score) < 1e-5
    assert len(a.top_k) == 2 and a.top_k[0] == (a.label, a.score) and a.score >= a.top_k[1][1]
    with pytest.raises(DataError, match="cannot decode"):
        (tmp_path / "bad.jpg").write_bytes(b"junk")
        p.predict([tmp_path / "bad.jpg"])


def test_predict_many_keeps_order_across_prefetched_batches(trained_run, tmp_path):
    p = Predictor.from_run(trained_run)
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    images = [fruit_image("kiwi", i, 48) for i in range(5)] + [tmp_path / "bad.jpg"] + \
             [fruit_image("plum", i, 48) for i in range(6)]
    got = list(p.predict_many(images, top_k=1, batch_size=4))  # 3 batches, decoded one batch ahead
    assert [im for im, _ in got] == images
    assert isinstance(got[5][1], DataError) and "bad.jpg" in got[5][1].message
    want = p.predict([im for im in images if not isinstance(im, type(tmp_path))], top_k=1, batch_size=32)
    assert [r.label for _, r in got if not isinstance(r, DataError)] == [w.label for w in want]


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
    assert main(["predict", str(trained_run), str(folder / "a.jpg"), "--unknown-threshold", "1.01"]) == 0
    assert "unknown" in capsys.readouterr().out


def test_export_metadata_parity_and_speed(exported):
    run, fig = exported
    proto = onnx.load(str(run / "export" / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["fruitlens_classes"]) == ["apple", "kiwi", "lemon", "plum"]
    assert json.loads(meta["fruitlens_preprocessing"])["image_size"] == 32
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert (run / "export" / "labels.txt").read_text().split() == ["apple", "kiwi", "lemon", "plum"]
    assert fig["parity"]["fp32"]["top1_agreement"] == 1.0 and fig["parity"]["fp32"]["max_abs_logit_diff"] < 1e-3
    assert "int8" in fig["parity"] and (run / "export" / "model.int8.onnx").is_file()
    assert {"pytorch", "model.onnx", "model.int8.onnx"} <= set(fig["speed"])


def test_onnx_predictor_matches_pytorch(exported, tmp_path):
    run, _ = exported
    imgs = [fruit_image(c, 3, 48) for c in ("apple", "kiwi", "lemon", "plum")]
    torch_p = Predictor.from_run(run, engine="torch").predict(imgs)
    onnx_p = Predictor.from_onnx(run / "export" / "model.onnx")
    assert onnx_p.classes == ["apple", "kiwi", "lemon", "plum"]
    for a, b in zip(torch_p, onnx_p.predict(imgs)):
        assert a.label == b.label and abs(a.score - b.score) < 1e-4


def test_export_fails_loudly_when_parity_is_broken(trained_run, monkeypatch):
    from fruitlens.errors import ExportError
    from fruitlens.inference import export as ex

    monkeypatch.setattr(ex, "_parity", lambda model, path, batch: {"images": 1, "top1_agreement": 0.5,
                                                                    "max_abs_logit_diff": 9.0})
    with pytest.raises(ExportError, match="agreement 50.00%"):
        ex.export_run(trained_run, bench=False)
