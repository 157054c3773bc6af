import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from fruitlens.errors import ModelError, WeightsError
from fruitlens.models import MODELS, build_model
from fruitlens.models.registry import pretrained_enums
from fruitlens.models import weights as W
from conftest import mobilenet_cached

HUB = Path(torch.hub.get_dir())  # torchvision's cache as the environment sets it ($TORCH_HOME), before any fixture


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_and_runs(name):
    model = build_model(name, num_classes=5, weights="none", img_size=64)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    assert model.backbone(torch.randn(1, 3, 64, 64)).shape == (1, model.feature_dim)
    assert model.preprocessing.image_size == 64 and len(model.blocks()) >= 4
    # the class activation map is exact: the pooled features are the feature map's mean, the logit the map's mean
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    fmap = model.feature_map(x)
    torch.testing.assert_close(fmap.mean((2, 3)), model.backbone(x), atol=1e-5, rtol=1e-4)
    cams = model.class_maps(fmap)
    torch.testing.assert_close(cams.mean((2, 3)) + model.linear.bias, model(x), atol=1e-4, rtol=1e-4)


def test_mid_layer_features_are_an_earlier_block_standardised_and_class_maps_stay_exact(tmp_path):
    from fruitlens.models.checkpoint import load_model, save_model

    model = build_model("mobilenet_v2", 3, weights="none", img_size=64, feature_layer="mid").eval()
    last = build_model("mobilenet_v2", 3, weights="none", img_size=64).eval()
    assert model.feature_dim == 320 and last.feature_dim == 1280 and model.feature_layer == "mid"
    assert len(model.blocks()) == len(last.blocks()) - 1  # the dropped block is no block to fine-tune
    x = torch.randn(2, 3, 64, 64)
    assert not model.standardise.active
    feats = model.backbone(x)
    torch.testing.assert_close(feats, model.backbone.features[:18](x).mean((2, 3)))
    model.standardise.fit(torch.randn(50, 320) * 3 + 2)
    assert model.standardise.active
    torch.testing.assert_close(model.head[0](feats), (feats - model.standardise.mean) / model.standardise.std)
    cams = model.class_maps(model.feature_map(x))  # standardised map: its mean is the standardised features
    torch.testing.assert_close(cams.mean((2, 3)) + model.linear.bias, model(x), atol=1e-4, rtol=1e-4)
    save_model(tmp_path / "m.ckpt", model, ["a", "b", "c"])
    back = load_model(tmp_path / "m.ckpt").model
    assert back.feature_layer == "mid"
    torch.testing.assert_close(back(x), model(x))
    with pytest.raises(ModelError, match="resnet18 has no mid-layer features"):
        build_model("resnet18", 3, weights="none", feature_layer="mid")
    with pytest.raises(ModelError, match="unknown feature layer 'middle'"):
        build_model("mobilenet_v2", 3, weights="none", feature_layer="middle")


def test_a_checkpoint_of_the_earlier_format_still_loads(tmp_path):
    from fruitlens.models.checkpoint import load_model, save_model

    model = build_model("small_cnn", 3, weights="none", img_size=32).eval()
    save_model(tmp_path / "new.ckpt", model, ["a", "b", "c"])
    old = torch.load(tmp_path / "new.ckpt", weights_only=True)  # format 2: Dropout + Linear (head.1), no layer
    old.update(fruitlens_format=2, state_dict={k.replace("head.2.", "head.1."): v for k, v in old["state_dict"].items()
                                               if not k.startswith("head.0.")})
    old.pop("feature_layer")
    torch.save(old, tmp_path / "old.ckpt")
    back = load_model(tmp_path / "old.ckpt").model
    x = torch.randn(2, 3, 32, 32)
    assert back.feature_layer == "last" and not back.standardise.active
    torch.testing.assert_close(back(x), model(x))


def test_folding_the_temperature_divides_the_logits_and_keeps_the_argmax():
    model = build_model("small_cnn", 4, weights="none", img_size=32).eval()
    x = torch.randn(5, 3, 32, 32)
    before = model(x)
    model.fold_temperature(2.5)
    torch.testing.assert_close(model(x), before / 2.5)
    assert torch.equal(model(x).argmax(1), before.argmax(1))


def test_unknown_model_did_you_mean():
    with pytest.raises(ModelError, match="unknown model 'mobilnet_v2'. Did you mean 'mobilenet_v2'\\? Available: "):
        build_model("mobilnet_v2", 5)


def test_image_size_too_small_and_one_class():
    with pytest.raises(ModelError, match="too small for mobilenet_v2"):
        build_model("mobilenet_v2", 5, weights="none", img_size=16)
    with pytest.raises(ModelError, match="at least 2 classes"):
        build_model("small_cnn", 1, weights="none")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    before = torch.hub.get_dir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))
    yield tmp_path / "torch"
    torch.hub.set_dir(before)


def test_import_rejects_unknown_file(tmp_path, torch_home):
    f = tmp_path / "x.pth"
    f.write_bytes(b"not weights")
    with pytest.raises(WeightsError, match="matches none of the known weights files"):
        W.import_weights(f, pretrained_enums())


def test_import_real_mobilenet_file_into_empty_cache(tmp_path, torch_home, monkeypatch):
    from conftest import need

    real = HUB / "checkpoints" / "mobilenet_v2-b0353104.pth"
    need(real.is_file(), "MobileNetV2 weights not imported (run 'make weights')")
    renamed = tmp_path / "downloaded.bin"
    renamed.write_bytes(real.read_bytes())
    dest = W.import_weights(renamed, pretrained_enums())
    assert dest == W.cache_dir() / "mobilenet_v2-b0353104.pth" and dest.parent.parent.parent == torch_home
    model = build_model("mobilenet_v2", 3, weights="imagenet", img_size=64)
    assert model.preprocessing.mean == (0.485, 0.456, 0.406)


class _Server:
    def __init__(self, root: Path):
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def _fake_weights(url: str):
    from torchvision.models._api import Weights, WeightsEnum

    class FakeWeights(WeightsEnum):
        V1 = Weights(url=url, transforms=None, meta={})

    return FakeWeights.V1


def test_download_through_torchvision_loader_from_local_server(tmp_path, torch_home):
    served = tmp_path / "served"
    served.mkdir()
    sd = {"w": torch.arange(4.0)}
    torch.save(sd, served / "tmp.pth")
    digest = hashlib.sha256((served / "tmp.pth").read_bytes()).hexdigest()
    name = f"fake-{digest[:8]}.pth"
    (served / "tmp.pth").rename(served / name)
    server = _Server(served)
    try:
        got = W.load_state_dict(_fake_weights(f"{server.url}/{name}"))
        assert torch.equal(got["w"], sd["w"]) and (W.cache_dir() / name).is_file()
        with pytest.raises(WeightsError) as err:
            W.load_state_dict(_fake_weights(f"{server.url}/missing-0123abcd.pth"))
        assert "missing-0123abcd.pth is not in the cache" in err.value.message
        assert "fruitlens weights import missing-0123abcd.pth" in err.value.hint
    finally:
        server.close()


def test_load_state_dict_file_for_weights_path(tmp_path):
    src = build_model("small_cnn", 3, weights="none")
    sd_path = tmp_path / "sd.pth"
    torch.save(src.backbone.state_dict(), sd_path)
    model = build_model("small_cnn", 3, weights=str(sd_path))
    assert torch.equal(model.backbone.features[0][0].weight, src.backbone.features[0][0].weight)
    with pytest.raises(WeightsError, match="no such file"):
        build_model("small_cnn", 3, weights=str(tmp_path / "nope.pth"))


def test_mobilenet_real_weights_are_cached_for_tests():
    from conftest import need

    need(mobilenet_cached(), "MobileNetV2 ImageNet weights are not in torchvision's cache (run 'make weights')")
