"""Model registry: a name -> builder entry; every built model is a ``FruitNet`` with backbone, head, preprocessing.

Adding a torchvision classification model takes one entry in ``MODELS``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm
from torchvision.models import WeightsEnum

from fruitlens.errors import ModelError, WeightsError, did_you_mean
from fruitlens.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from fruitlens.models.small_cnn import SmallCNN
from fruitlens.models.weights import load_state_dict, pick

log = logging.getLogger(__name__)


def _features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.features(x)


def _densenet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.relu(net.features(x))


def _resnet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


@dataclass(frozen=True)
class ModelSpec:
    """How to build one backbone: the torchvision builder, its weights enum, where its classifier and blocks are."""

    name: str
    builder: Callable[..., nn.Module]
    weights_enum: type[WeightsEnum] | None
    head_attr: str  # attribute holding the classifier that the backbone drops
    block_attrs: tuple[str, ...]  # ordered bottom -> top; a Sequential attribute expands into its children
    min_size: int = 32
    description: str = ""
    # the last feature map, (N, C, h, w): the backbone's pooled features are its spatial mean (a test holds them so),
    # which makes the class activation map exact
    feature_map: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _features
    # ``feature_layer="mid"``: the index in ``features`` of the last block kept (the blocks above it are dropped);
    # None: the model has only its last layer
    mid_block: int | None = None


MODELS: dict[str, ModelSpec] = {
    "mobilenet_v2": ModelSpec("mobilenet_v2", tvm.mobilenet_v2, tvm.MobileNet_V2_Weights, "classifier", ("features",),
                              32, "MobileNetV2 (3.5M params), ImageNet weights; the fast default", mid_block=17),
    "densenet121": ModelSpec("densenet121", tvm.densenet121, tvm.DenseNet121_Weights, "classifier", ("features",),
                             32, "DenseNet121 (8.0M params), ImageNet weights; slower on a CPU", _densenet),
    "resnet18": ModelSpec("resnet18", tvm.resnet18, tvm.ResNet18_Weights, "fc",
                          ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"), 32, "ResNet-18 (11.7M params)",
                          _resnet),
    "small_cnn": ModelSpec("small_cnn", SmallCNN, None, "classifier", ("features",), 16,
                           "the original's Sequential Conv2D + pooling CNN; trains from scratch"),
}


FEATURE_LAYERS = ("last", "mid")


class Standardise(nn.Module):
    """``(x - mean) / std`` per feature dimension with fixed statistics (buffers, not trained): the identity until
    ``fit`` sets them from the training features. Works on pooled features (N, C) and on feature maps (N, C, h, w)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, floor: float = 1e-3) -> None:
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0) + floor)

    @torch.no_grad()
    def set(self, stats: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Fixes the statistics at ``(mean, std)`` (computed elsewhere, e.g. over memory-mapped features)."""
        self.mean.copy_(stats[0])
        self.std.copy_(stats[1])

    @property
    def active(self) -> bool:
        return bool(self.mean.any() or (self.std != 1).any())


class FruitNet(nn.Module):
    """``head(backbone(x))``: backbone -> pooled features, head -> Standardise + Dropout + Linear(num_classes).

    ``feature_layer``: "last" (the backbone's last layer) or "mid" (the output of an earlier block, ``mid_block``);
    the head standardises mid-layer features on the training features (``Standardise.fit``), else passes them on.
    """

    def __init__(self, name: str, backbone: nn.Module, feature_dim: int, num_classes: int, dropout: float,
                 preprocessing: Preprocessing, blocks: list[nn.Module],
                 feature_map: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _features,
                 feature_layer: str = "last") -> None:
        super().__init__()
        self.name = name
        self.feature_layer = feature_layer
        self.backbone = backbone
        self.head = nn.Sequential(Standardise(feature_dim), nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.dropout = float(dropout)
        self.preprocessing = preprocessing
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self._blocks = blocks  # not registered twice: plain list of sub-modules of backbone
        self._feature_map = feature_map
        self.ood: nn.Module | None = None  # the out-of-distribution scorer (models/ood.py), fitted after training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def blocks(self) -> list[nn.Module]:
        """Backbone blocks ordered bottom -> top, for freezing and fine-tuning the top N."""
        return list(self._blocks)

    @property
    def linear(self) -> nn.Linear:
        return self.head[-1]

    @property
    def standardise(self) -> Standardise:
        return self.head[0]

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map (N, C, h, w); ``backbone(x)`` is its mean over h and w."""
        return self._feature_map(self.backbone, x)

    def class_maps(self, fmap: torch.Tensor) -> torch.Tensor:
        """Class activation maps (N, classes, h, w): each class's head weights over the (standardised) feature map
        (Zhou et al. 2016). Exact for this head: a map's spatial mean plus the bias is the class's logit."""
        return torch.einsum("kc,nchw->nkhw", self.linear.weight, self.standardise(fmap))

    @torch.no_grad()
    def fold_temperature(self, temperature: float) -> None:
        """Divides the head's weights and bias by ``temperature``: softmax(logits / T) with no extra step anywhere
        (checkpoint, ONNX, predict, serve). The argmax does not change."""
        self.linear.weight.div_(temperature)
        self.linear.bias.div_(temperature)


def model_parameters(model: nn.Module) -> int:
    """Trained numbers of a model: its floating-point parameters and buffers, BatchNorm's running statistics aside."""
    return int(sum(v.numel() for k, v in model.state_dict().items() if v.is_floating_point() and "running" not in k))


def list_models() -> list[ModelSpec]:
    return [MODELS[k] for k in sorted(MODELS)]


def pretrained_enums() -> list[type[WeightsEnum]]:
    """The weights enums of every registered model that has pretrained weights (for ``fruitlens weights``)."""
    return [spec.weights_enum for spec in list_models() if spec.weights_enum is not None]


def has_pretrained_weights(name: str) -> bool:
    """``name`` has ImageNet weights in torchvision (small_cnn has none)."""
    return get_spec(name).weights_enum is not None


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ModelError(did_you_mean(name, MODELS, "model"), "'fruitlens models' lists them")
    return MODELS[name]


def check_options(name: str, weights: str) -> None:
    """A model name or ``--weights`` value that cannot work fails here, before any data is read."""
    get_spec(name)
    if weights not in ("imagenet", "none", "", None) and not Path(weights).is_file():
        close = did_you_mean(str(weights), ("imagenet", "none"), "weights").split(" Available")[0]
        hint = "use imagenet, none, or the path of a .pth state dict"
        raise WeightsError(f"--weights {weights}: no such file" + (f" ({close})" if "Did you mean" in close else ""),
                           hint)


def _preprocessing(spec: ModelSpec, img_size: int) -> Preprocessing:
    if spec.weights_enum is not None:
        t = pick(spec.weights_enum).transforms()
        pre = Preprocessing(int(t.crop_size[0]), int(t.resize_size[0]), tuple(t.mean), tuple(t.std))
    else:
        pre = Preprocessing(96, 96, IMAGENET_MEAN, IMAGENET_STD)
    if img_size:
        if img_size < spec.min_size:
            raise ModelError(f"image size {img_size} px is too small for {spec.name}: expected at least {spec.min_size} px",
                             f"use --img-size {max(spec.min_size, 64)} or larger")
        pre = pre.with_image_size(img_size)
    return pre


def build_model(name: str, num_classes: int, *, weights: str = "imagenet", img_size: int = 0,
                dropout: float = 0.2, feature_layer: str = "last") -> FruitNet:
    """Builds ``name`` with ``num_classes`` outputs. ``weights``: imagenet | none | PATH to a state dict.
    ``feature_layer``: "last", or "mid" (the features of an earlier block, ``ModelSpec.mid_block``)."""
    spec = get_spec(name)
    if feature_layer not in FEATURE_LAYERS:
        raise ModelError(f"unknown feature layer {feature_layer!r}", f"use one of: {', '.join(FEATURE_LAYERS)}")
    if feature_layer == "mid" and spec.mid_block is None:
        raise ModelError(f"{name} has no mid-layer features (feature layer 'mid' is built for "
                         f"{', '.join(k for k, v in MODELS.items() if v.mid_block is not None)})",
                         "use --feature-layer last (or auto)")
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes but received {num_classes}",
                         "add a second class folder to the data")
    pre = _preprocessing(spec, img_size)
    net = spec.builder(weights=None) if spec.weights_enum is not None else spec.builder()
    if weights == "imagenet":
        if spec.weights_enum is None:
            log.info("%s has no pretrained weights: it trains from scratch", name)
        else:
            net.load_state_dict(load_state_dict(pick(spec.weights_enum)))
    elif weights not in ("none", "", None):
        _load_file(net, Path(weights), spec)
    head = getattr(net, spec.head_attr)
    feature_dim = head.in_features if isinstance(head, nn.Linear) else next(
        m.in_features for m in head.modules() if isinstance(m, nn.Linear))
    setattr(net, spec.head_attr, nn.Identity())
    if feature_layer == "mid":  # the blocks above mid_block go; the pooled output is then mid_block's
        top = net.features
        for i in range(spec.mid_block + 1, len(top)):
            top[i] = nn.Identity()
        feature_dim = _channels(top[spec.mid_block])
    blocks: list[nn.Module] = []
    for attr in spec.block_attrs:
        mod = getattr(net, attr)
        blocks.extend(mod.children() if isinstance(mod, nn.Sequential) else [mod])
    blocks = [b for b in blocks if not isinstance(b, nn.Identity)]
    return FruitNet(name, net, feature_dim, num_classes, dropout, pre, blocks, spec.feature_map, feature_layer)


def _channels(block: nn.Module) -> int:
    """Output channels of a block: those of its last BatchNorm (torchvision's blocks end in one)."""
    return [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


def _load_file(net: nn.Module, path: Path, spec: ModelSpec) -> None:
    if not path.is_file():
        raise WeightsError(f"--weights {path}: no such file", "use imagenet, none, or the path of a .pth state dict")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: cannot read a state dict ({exc})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    own = net.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape and not k.startswith(spec.head_attr)}
    if not usable:
        raise WeightsError(f"{path}: none of its tensors fit {spec.name} (expected keys like {next(iter(own))})",
                           f"pass a torchvision {spec.name} state dict")
    net.load_state_dict(usable, strict=False)
    log.info("loaded %d of %d tensors from %s", len(usable), len(own), path)
