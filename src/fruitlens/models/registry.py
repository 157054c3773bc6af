"""Model registry: a name -> builder entry; every built model is a ``FruitNet`` with backbone, head, preprocessing.

Adding a torchvision classification model takes one entry in ``MODELS`` (and, where its pooling is not a plain mean
of ``features``, a feature-map function in ``_feature_maps``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import WeightsEnum

from fruitlens.errors import ModelError, WeightsError, did_you_mean
from fruitlens.models import _feature_maps as fm
from fruitlens.models import vit
from fruitlens.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from fruitlens.models.small_cnn import SmallCNN
from fruitlens.models.weights import load_state_dict, pick

log = logging.getLogger(__name__)

FeatureMap = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one backbone: the torchvision builder, its weights enum, where its classifier and blocks are."""

    name: str
    builder: Callable[..., nn.Module]
    weights_enum: type[WeightsEnum] | None
    head_attr: str  # the classifier (a dotted path) that the backbone drops: backbone(x) is then the head's input
    # ordered bottom -> top, dotted paths; an nn.Sequential (not a subclass such as a conv-norm-act stem) expands into
    # its children
    block_attrs: tuple[str, ...]
    min_size: int = 32
    description: str = ""
    # the last feature map, (N, C, h, w): the backbone's pooled features are its spatial mean (a test holds them so),
    # which makes the class activation map exact
    feature_map: FeatureMap = fm.features
    # ``feature_layer="mid"``: the index in ``features`` of the last block kept (the blocks above it are dropped);
    # None: the model has only its last layer
    mid_block: int | None = None
    fixed_size: int = 0  # the only input size the model takes (ViT: position embeddings); 0: any from min_size up
    skip_weights: tuple[str, ...] = ()  # entries of the enum this build cannot load (another input size)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="mobilenet_v2",
            builder=tvm.mobilenet_v2,
            weights_enum=tvm.MobileNet_V2_Weights,
            head_attr="classifier",
            block_attrs=("features",),
            description="MobileNetV2; the fast default",
            mid_block=17,
        ),
        ModelSpec(
            name="mobilenet_v3_large",
            builder=tvm.mobilenet_v3_large,
            weights_enum=tvm.MobileNet_V3_Large_Weights,
            head_attr="classifier",
            block_attrs=("features",),
            description="MobileNetV3-Large; the head reads its 960 pooled channels, not the 1280-wide layer",
        ),
        ModelSpec(
            name="densenet121",
            builder=tvm.densenet121,
            weights_enum=tvm.DenseNet121_Weights,
            head_attr="classifier",
            block_attrs=("features",),
            description="DenseNet-121; slower on a CPU",
            feature_map=fm.densenet,
        ),
        ModelSpec(
            name="resnet18",
            builder=tvm.resnet18,
            weights_enum=tvm.ResNet18_Weights,
            head_attr="fc",
            block_attrs=("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"),
            description="ResNet-18",
            feature_map=fm.resnet,
        ),
        ModelSpec(
            name="resnet50",
            builder=tvm.resnet50,
            weights_enum=tvm.ResNet50_Weights,
            head_attr="fc",
            block_attrs=("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"),
            description="ResNet-50",
            feature_map=fm.resnet,
        ),
        ModelSpec(
            name="efficientnet_b0",
            builder=tvm.efficientnet_b0,
            weights_enum=tvm.EfficientNet_B0_Weights,
            head_attr="classifier",
            block_attrs=("features",),
            description="EfficientNet-B0",
        ),
        ModelSpec(
            name="efficientnet_b1",
            builder=tvm.efficientnet_b1,
            weights_enum=tvm.EfficientNet_B1_Weights,
            head_attr="classifier",
            block_attrs=("features",),
            description="EfficientNet-B1",
        ),
        ModelSpec(
            name="efficientnet_b2",
            builder=tvm.efficientnet_b2,
            weights_enum=tvm.EfficientNet_B2_Weights,
            head_attr="classifier",
            block_attrs=("features",),
            description="EfficientNet-B2",
        ),
        ModelSpec(
            name="efficientnet_b3",
            builder=tvm.efficientnet_b3,
            weights_enum=tvm.EfficientNet_B3_Weights,
            head_attr="classifier",
            block_attrs=("features",),
            description="EfficientNet-B3",
        ),
        ModelSpec(
            name="efficientnet_v2_s",
            builder=tvm.efficientnet_v2_s,
            weights_enum=tvm.EfficientNet_V2_S_Weights,
            head_attr="classifier",
            block_attrs=("features",),
            description="EfficientNetV2-S",
        ),
        ModelSpec(
            name="regnet_y_800mf",
            builder=tvm.regnet_y_800mf,
            weights_enum=tvm.RegNet_Y_800MF_Weights,
            head_attr="fc",
            block_attrs=("stem", "trunk_output"),
            description="RegNetY-800MF",
            feature_map=fm.regnet,
        ),
        ModelSpec(
            name="regnet_y_1_6gf",
            builder=tvm.regnet_y_1_6gf,
            weights_enum=tvm.RegNet_Y_1_6GF_Weights,
            head_attr="fc",
            block_attrs=("stem", "trunk_output"),
            description="RegNetY-1.6GF",
            feature_map=fm.regnet,
        ),
        # the classifier is LayerNorm2d, Flatten, Linear: only the Linear goes, the head reads the normalised features
        ModelSpec(
            name="convnext_tiny",
            builder=tvm.convnext_tiny,
            weights_enum=tvm.ConvNeXt_Tiny_Weights,
            head_attr="classifier.2",
            block_attrs=("features", "classifier.0"),
            description="ConvNeXt-Tiny",
            feature_map=fm.convnext,
        ),
        ModelSpec(
            name="swin_t",
            builder=tvm.swin_t,
            weights_enum=tvm.Swin_T_Weights,
            head_attr="head",
            block_attrs=("features", "norm"),
            description="Swin-T",
            feature_map=fm.swin,
        ),
        ModelSpec(
            name="vit_b_16",
            builder=vit.vit_b_16,
            weights_enum=tvm.ViT_B_16_Weights,
            head_attr="heads",
            block_attrs=("conv_proj", "encoder.layers", "encoder.ln"),
            min_size=vit.IMAGE_SIZE,
            description="ViT-B/16; the head reads the mean of its patch tokens, not the class token",
            feature_map=fm.patch_grid,
            fixed_size=vit.IMAGE_SIZE,
            skip_weights=("IMAGENET1K_SWAG_E2E_V1",),
        ),
        ModelSpec(
            name="small_cnn",
            builder=SmallCNN,
            weights_enum=None,
            head_attr="classifier",
            block_attrs=("features",),
            min_size=16,
            description="the original's Sequential Conv2D + pooling CNN; trains from scratch",
        ),
    )
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

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        dropout: float,
        preprocessing: Preprocessing,
        blocks: list[nn.Module],
        feature_map: FeatureMap = fm.features,
        feature_layer: str = "last",
    ) -> None:
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


def imagenet_weights(spec: ModelSpec) -> WeightsEnum:
    """The weights entry that ``weights="imagenet"`` loads for ``spec`` (``weights.pick`` over the entries it can
    load); ``spec`` must have a weights enum."""
    return pick(spec.weights_enum, spec.skip_weights)


def usable_weights(spec: ModelSpec) -> list[WeightsEnum]:
    """The entries of ``spec``'s weights enum that this build loads (none for a model without pretrained weights)."""
    return [w for w in spec.weights_enum or () if w.name not in spec.skip_weights]


@dataclass(frozen=True)
class ModelFacts:
    """What torchvision publishes about the ImageNet model whose weights ``weights="imagenet"`` loads; nothing here is
    measured by fruitlens. For a model without pretrained weights only ``params`` (its backbone's) is known."""

    params: int
    weights: str = ""  # the weights entry, e.g. IMAGENET1K_V2
    imagenet_top1: float | None = None  # ImageNet-1K top-1 accuracy (%) of torchvision's model with these weights
    file_mb: float | None = None  # the weights file's size, downloaded on first use


def model_facts(spec: ModelSpec) -> ModelFacts:
    """``spec``'s parameter count, ImageNet top-1 accuracy and weights file size, read from its weights enum's
    ``meta`` (torchvision's figures for its ImageNet model, with the 1000-class layer that fruitlens replaces)."""
    if spec.weights_enum is None:
        net = spec.builder()
        head = net.get_submodule(spec.head_attr)
        return ModelFacts(sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in head.parameters()))
    w = imagenet_weights(spec)
    top1 = w.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    return ModelFacts(int(w.meta["num_params"]), w.name, top1, w.meta.get("_file_size"))


def has_pretrained_weights(name: str) -> bool:
    """``name`` has ImageNet weights in torchvision (small_cnn has none)."""
    return get_spec(name).weights_enum is not None


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ModelError(did_you_mean(name, MODELS, "model"), "'fruitlens models' lists them")
    return MODELS[name]


def check_options(name: str, weights: str, img_size: int = 0) -> None:
    """A model name, ``--weights`` or ``--img-size`` value that cannot work fails here, before any data is read."""
    _check_size(get_spec(name), img_size)
    if weights not in ("imagenet", "none", "", None) and not Path(weights).is_file():
        close = did_you_mean(str(weights), ("imagenet", "none"), "weights").split(" Available")[0]
        hint = "use imagenet, none, or the path of a .pth state dict"
        raise WeightsError(
            f"--weights {weights}: no such file" + (f" ({close})" if "Did you mean" in close else ""), hint
        )


def _check_size(spec: ModelSpec, img_size: int) -> None:
    """``img_size`` (0: not given) fits ``spec``."""
    if img_size and spec.fixed_size and img_size != spec.fixed_size:
        raise ModelError(
            f"{spec.name} takes {spec.fixed_size} px images only (its position embeddings are for "
            f"{spec.fixed_size} px) but received an image size of {img_size} px",
            f"use --img-size {spec.fixed_size}, or leave it out",
        )
    if img_size and img_size < spec.min_size:
        raise ModelError(
            f"image size {img_size} px is too small for {spec.name}: expected at least {spec.min_size} px",
            f"use --img-size {max(spec.min_size, 64)} or larger",
        )


def _preprocessing(spec: ModelSpec, img_size: int) -> Preprocessing:
    if spec.weights_enum is not None:
        t = imagenet_weights(spec).transforms()
        pre = Preprocessing(int(t.crop_size[0]), int(t.resize_size[0]), tuple(t.mean), tuple(t.std))
    else:
        pre = Preprocessing(96, 96, IMAGENET_MEAN, IMAGENET_STD)
    _check_size(spec, img_size)
    return pre.with_image_size(img_size) if img_size else pre


def build_model(
    name: str,
    num_classes: int,
    *,
    weights: str = "imagenet",
    img_size: int = 0,
    dropout: float = 0.2,
    feature_layer: str = "last",
) -> FruitNet:
    """Builds ``name`` with ``num_classes`` outputs. ``weights``: imagenet | none | PATH to a state dict.
    ``feature_layer``: "last", or "mid" (the features of an earlier block, ``ModelSpec.mid_block``)."""
    spec = get_spec(name)
    if feature_layer not in FEATURE_LAYERS:
        raise ModelError(f"unknown feature layer {feature_layer!r}", f"use one of: {', '.join(FEATURE_LAYERS)}")
    if feature_layer == "mid" and spec.mid_block is None:
        raise ModelError(
            f"{name} has no mid-layer features (feature layer 'mid' is built for "
            f"{', '.join(k for k, v in MODELS.items() if v.mid_block is not None)})",
            "use --feature-layer last (or auto)",
        )
    if num_classes < 2:
        raise ModelError(
            f"a classifier needs at least 2 classes but received {num_classes}", "add a second class folder to the data"
        )
    pre = _preprocessing(spec, img_size)
    net = spec.builder(weights=None) if spec.weights_enum is not None else spec.builder()
    if weights == "imagenet":
        if spec.weights_enum is None:
            log.info("%s has no pretrained weights: it trains from scratch", name)
        else:
            net.load_state_dict(load_state_dict(imagenet_weights(spec)))
    elif weights not in ("none", "", None):
        _load_file(net, Path(weights), spec)
    head = net.get_submodule(spec.head_attr)
    feature_dim = (
        head.in_features
        if isinstance(head, nn.Linear)
        else next(m.in_features for m in head.modules() if isinstance(m, nn.Linear))
    )
    parent, _, attr = spec.head_attr.rpartition(".")
    setattr(net.get_submodule(parent), attr, nn.Identity())
    if feature_layer == "mid":  # the blocks above mid_block go; the pooled output is then mid_block's
        top = net.features
        for i in range(spec.mid_block + 1, len(top)):
            top[i] = nn.Identity()
        feature_dim = _channels(top[spec.mid_block])
    blocks: list[nn.Module] = []
    for attr in spec.block_attrs:
        mod = net.get_submodule(attr)
        blocks.extend(mod.children() if type(mod) is nn.Sequential else [mod])
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
    head = spec.head_attr + "."
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape and not k.startswith(head)}
    if not usable:
        raise WeightsError(
            f"{path}: none of its tensors fit {spec.name} (expected keys like {next(iter(own))})",
            f"pass a torchvision {spec.name} state dict",
        )
    net.load_state_dict(usable, strict=False)
    log.info("loaded %d of %d tensors from %s", len(usable), len(own), path)
