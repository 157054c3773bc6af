"""``ServingModel``: what predict, evaluate and serve run, in PyTorch and as the exported ONNX model.

One forward gives the calibrated logits (the temperature is folded into the head), the pooled features, the class
activation maps and the out-of-distribution score, so that the service needs nothing but ONNX Runtime.
"""

from __future__ import annotations

import torch
from torch import nn

from fruitlens.models.registry import FruitNet

OUTPUTS = ("logits", "features", "class_maps", "ood_score")


class ServingModel(nn.Module):
    def __init__(self, model: FruitNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        fmap = m.feature_map(x)
        features = fmap.mean(dim=(2, 3))
        logits = m.head(features)
        ood = getattr(m, "ood", None)
        # zeros_like: a traced len(x) would fix the batch size of the exported model
        score = ood(features, torch.softmax(logits, dim=1)) if ood is not None else torch.zeros_like(logits[:, 0])
        return logits, features, m.class_maps(fmap), score
