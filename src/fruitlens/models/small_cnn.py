"""The original notebook's Sequential Conv2D + pooling CNN, in PyTorch."""

from __future__ import annotations

from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


class SmallCNN(nn.Module):
    """Four Conv-BN-ReLU-MaxPool blocks, global average pooling, dropout, linear (the classifier is replaced)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), num_classes: int = 1000) -> None:
        super().__init__()
        chans = (3, *widths)
        self.features = nn.Sequential(*[_block(a, b) for a, b in zip(chans, chans[1:])])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))
