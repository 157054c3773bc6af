"""The last feature map of each backbone, (N, C, h, w), whose spatial mean is exactly what the backbone's pooling
gives the head: so the class activation map (``FruitNet.class_maps``) is exact. A test holds every registered model
to that. Each function takes the torchvision module (its classifier replaced) and the input batch."""

from __future__ import annotations

import torch
from torch import nn


def features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Models that pool ``net.features`` directly: MobileNets, EfficientNets, the small CNN."""
    return net.features(x)


def densenet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DenseNet pools ``relu(features)``."""
    return torch.relu(net.features(x))


def resnet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def regnet(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.trunk_output(net.stem(x))


def convnext(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ConvNeXt pools, then layer-normalises the pooled vector (``classifier[0]``). Given the pooled vector's mean and
    variance over channels, that normalisation is one affine map per image; applied at every position with those
    statistics, the map's spatial mean is the normalised pooled vector, the head's input."""
    fmap = net.features(x)
    norm = net.classifier[0]
    pooled = fmap.mean((2, 3), keepdim=True)
    mean = pooled.mean(1, keepdim=True)
    var = pooled.var(1, correction=0, keepdim=True)
    shape = (1, -1, 1, 1)
    return (fmap - mean) * torch.rsqrt(var + norm.eps) * norm.weight.view(shape) + norm.bias.view(shape)


def swin(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Swin's last stage, layer-normalised per position (``net.norm``, as torchvision does before pooling), as
    (N, C, h, w)."""
    return net.permute(net.norm(net.features(x)))


def patch_grid(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ViT's final-layer-normed patch tokens on their grid (``PatchMeanViT``, whose pooled features are their mean)."""
    return net.patch_grid(x)
