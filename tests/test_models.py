import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import models as tvm

from fruitlens.errors import ModelError, WeightsError
from fruitlens.models import MODELS, build_model
from fruitlens.models.registry import check_options, imagenet_weights, pretrained_enums
from fruitlens.models import weights as W
from conftest import fruit_image, mobilenet_cached

HUB = Path(torch.hub.get_dir())  # torchvision's cache as the environment sets it ($TORCH_HOME), before any fixture


def _size(name: str) -> int:
    """ViT-B/16 takes 224 px only; every other model is tested at 64 px."""
    return MODELS[name].fixed_size or 64


def _lively(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` in eval mode with BatchNorm statistics of the batch ``x``. Untrained MobileNets and EfficientNets give
    features near 1e-10, where any feature map would pass a tolerance check; these bring them to about 1 on ``x``."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the one batch's statistics
        model.train()
        with torch.no_grad():
            model(x)
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_and_runs(name):
    size = _size(name)
    n = 1 if size > 64 else 2
    model = build_model(name, num_classes=5, weights="none", img_size=size)
    assert model.preprocessing.image_size == size and len(model.blocks()) >= 4
    # the blocks are the backbone's, bottom -> top (fine-tuning trains the last N), and hold nearly all its weights
    order = {id(m): i for i, m in enumerate(model.backbone.modules())}
    assert [order[id(b)] for b in model.blocks()] == sorted(order[id(b)] for b in model.blocks())
    in_blocks = sum(p.numel() for b in model.blocks() for p in b.parameters())
    assert in_blocks >= 0.99 * sum(p.numel() for p in model.backbone.parameters())
    x = torch.randn(n, 3, size, size)
    model = _lively(model, torch.randn(4, 3, size, size))
    with torch.no_grad():
        out, feats, fmap = model(x), model.backbone(x), model.feature_map(x)
    assert out.shape == (n, 5) and feats.shape == (n, model.feature_dim) and fmap.shape[:2] == (n, model.feature_dim)
    assert feats.std() > 0.01  # features worth comparing
    # the class activation map is exact: the pooled features are the feature map's mean, the logit the map's mean
    torch.testing.assert_close(fmap.mean((2, 3)), feats, atol=1e-5, rtol=1e-4)
    cams = model.class_maps(fmap)
    torch.testing.assert_close(cams.mean((2, 3)) + model.linear.bias, out, atol=1e-4, rtol=1e-4)


def test_vit_reads_the_mean_of_its_patch_tokens_and_loads_torchvision_weights():
    from torchvision.models import vit_b_16

    from fruitlens.models import vit

    ref, ours = vit_b_16().eval(), vit.vit_b_16().eval()
    ours.load_state_dict(ref.state_dict())  # strict: torchvision's ViT-B/16 weights load as they are
    ref.heads = ours.heads = nn.Identity()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = ref.encoder(torch.cat([ref.class_token, ref._process_input(x)], 1))
        torch.testing.assert_close(ours(x), tokens[:, 1:].mean(1))  # final-layer-normed patch tokens, averaged
        assert not torch.allclose(ours(x), ref(x), atol=1e-3)  # not the class token, which torchvision's head reads
    with pytest.raises(ModelError, match="vit_b_16 takes 224 px images only") as err:
        build_model("vit_b_16", 3, weights="none", img_size=96)
    assert "--img-size 224" in err.value.hint
    with pytest.raises(ModelError, match="224 px images only"):  # before any data is read
        check_options("vit_b_16", "none", 96)


def test_a_model_of_one_size_gets_that_size_from_the_data_step():
    from fruitlens.config import TrainConfig, apply_overrides
    from fruitlens.training.auto import resolve

    cfg = apply_overrides(TrainConfig(), {"data.path": "x", "model.name": "vit_b_16"})
    for side, studio in ((100, True), (100, False), (348, False)):  # others would get 224, 96 and 448 px
        resolved, notes = resolve(cfg, side, studio=studio)
        assert resolved.model.img_size == 224 and any("only size vit_b_16 takes" in n for n in notes)
    convnet = apply_overrides(cfg, {"model.name": "efficientnet_b0"})
    assert resolve(convnet, 348)[0].model.img_size == 448


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
    old.update(
        fruitlens_format=2,
        state_dict={
            k.replace("head.2.", "head.1."): v for k, v in old["state_dict"].items() if not k.startswith("head.0.")
        },
    )
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


NEW_BACKBONES = (
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_v2_s",
    "convnext_tiny",
    "resnet50",
    "regnet_y_800mf",
    "regnet_y_1_6gf",
    "mobilenet_v3_large",
    "vit_b_16",
    "swin_t",
)


def test_every_backbone_with_weights_is_importable():
    assert set(NEW_BACKBONES) <= set(MODELS)
    assert set(pretrained_enums()) == {s.weights_enum for s in MODELS.values() if s.weights_enum is not None}


@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_tiny", "swin_t", "vit_b_16"])  # each feature map kind
def test_a_new_backbone_exports_with_parity_and_explains(name, tmp_path):
    from fruitlens.inference import onnx as onnx_io
    from fruitlens.inference.explain import explain
    from fruitlens.inference.predictor import Predictor
    from fruitlens.models.serving import OUTPUTS, ServingModel

    size = _size(name)
    model = build_model(name, 3, weights="none", img_size=size)
    pre = model.preprocessing
    photos = [fruit_image(c, 0, 80) for c in ("apple", "kiwi", "lemon")]
    pixels = np.stack([pre.pixels(p) for p in photos])  # 3 images: another batch size than the export's
    model = _lively(model, torch.from_numpy(pre.inputs(pixels)))
    path = onnx_io.export_module(ServingModel(model), tmp_path / "model.onnx", size, output_names=OUTPUTS)
    onnx_io.write_metadata(
        path, {"fruitlens_classes": ["apple", "kiwi", "lemon"], "fruitlens_preprocessing": pre.to_dict()}
    )
    figures = onnx_io.parity(model, path, pre.inputs(pixels))
    assert figures.top1_agreement == 1.0 and figures.max_abs_logit_diff < 1e-3
    predictor = Predictor.from_onnx(path)
    out = predictor.outputs_batch(pixels)
    with torch.no_grad():
        ref = ServingModel(model)(torch.from_numpy(pre.inputs(pixels)))
    for key, want in zip(OUTPUTS, ref):  # features and class maps too: serve draws the map from the ONNX model
        np.testing.assert_allclose(out[key], want.numpy(), atol=1e-3, rtol=1e-3, err_msg=key)
    pred = predictor.predict([photos[1]])[0]
    k = predictor.classes.index(pred.label)
    assert pred.class_map.shape == tuple(ref[2].shape[2:])
    # the map is the evidence for the answer: its mean plus the class's bias is the class's logit
    assert pred.class_map.mean() + model.linear.bias[k].item() == pytest.approx(float(out["logits"][1, k]), abs=1e-3)
    assert explain(photos[1], pred, pre).size == photos[1].size
    path.unlink()  # ViT-B/16's is 330 MB


def test_vit_never_picks_weights_made_for_another_input_size(torch_home):
    spec, e = MODELS["vit_b_16"], tvm.ViT_B_16_Weights
    W.cache_dir().mkdir(parents=True)
    (W.cache_dir() / W.file_name(e.IMAGENET1K_SWAG_E2E_V1)).write_bytes(b"384 px position embeddings")
    assert imagenet_weights(spec) == e.IMAGENET1K_V1  # the default: downloaded on first use
    (W.cache_dir() / W.file_name(e.IMAGENET1K_SWAG_LINEAR_V1)).write_bytes(b"224 px")
    assert imagenet_weights(spec) == e.IMAGENET1K_SWAG_LINEAR_V1  # cached and the right size
    assert W.pick(e) == e.IMAGENET1K_SWAG_E2E_V1  # what an unrestricted pick would have loaded


def test_a_new_backbone_downloads_its_weights_through_torchvision_into_the_cache(tmp_path, torch_home, monkeypatch):
    entry = tvm.EfficientNet_B0_Weights.IMAGENET1K_V1
    served = tmp_path / "served"
    served.mkdir()
    state = tvm.efficientnet_b0().state_dict()
    torch.save(state, served / "w.pth")
    name = f"efficientnet_b0-{hashlib.sha256((served / 'w.pth').read_bytes()).hexdigest()[:8]}.pth"
    (served / "w.pth").rename(served / name)
    server = _Server(served)
    monkeypatch.setattr(entry.value, "url", f"{server.url}/{name}")  # torchvision's own entry, at this server
    try:
        model = build_model("efficientnet_b0", 3, weights="imagenet", img_size=64)
    finally:
        server.close()
    assert (W.cache_dir() / name).is_file() and W.is_cached(entry)
    assert torch.equal(model.backbone.features[0][0].weight, state["features.0.0.weight"])
    again = build_model("efficientnet_b0", 3, weights="imagenet", img_size=64)  # the server is gone: the cache
    assert torch.equal(again.backbone.features[-1][0].weight, state["features.8.0.weight"])


def test_weights_import_takes_a_new_backbones_file(tmp_path, torch_home, monkeypatch, capsys):
    from fruitlens.cli.main import main

    entry = tvm.ConvNeXt_Tiny_Weights.IMAGENET1K_V1
    f = tmp_path / "downloaded.pth"
    f.write_bytes(b"a stand-in for convnext_tiny's weights")
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    monkeypatch.setattr(entry.value, "url", f"https://download.pytorch.org/models/convnext_tiny-{digest[:8]}.pth")
    assert main(["weights", "import", str(f)]) == 0
    assert W.is_cached(entry) and f"convnext_tiny-{digest[:8]}.pth" in capsys.readouterr().out
