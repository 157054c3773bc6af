"""ViT-B/16 whose pooled features are the mean of its patch tokens, so that its class activation map is exact.

torchvision's ViT gives its classifier the class token. fruitlens's head (and the out-of-distribution score, and the
class activation map) reads pooled features that are the spatial mean of a feature map. For ViT those are the mean
of the final-layer-normed patch tokens, reshaped to their 14 x 14 grid as the feature map: a deliberate change of
the head's input from the class token (the ImageNet weights load unchanged; the class token still takes part in
attention in every layer, only its last output goes unused). Mean-pooled patch tokens are a common input for a new
linear head on a ViT (MAE, BEiT); how they compare with the class token on fruit is not measured here.
"""

from __future__ import annotations

import torch
from torchvision.models.vision_transformer import VisionTransformer

from fruitlens.errors import ModelError

IMAGE_SIZE = 224  # the position embeddings of the ImageNet weights are for 224 px (14 x 14 patches of 16 px)


class PatchMeanViT(VisionTransformer):
    """torchvision's ``VisionTransformer``, same parameters, pooling the patch tokens by their mean."""

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The patch tokens (N, h * w, C) after the encoder and its final LayerNorm, without the class token."""
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder(x)[:, 1:]

    def patch_grid(self, x: torch.Tensor) -> torch.Tensor:
        """The patch tokens as a feature map (N, C, h, w)."""
        t = self.tokens(x)
        side = self.image_size // self.patch_size
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.tokens(x).mean(1))


def vit_b_16(weights: None = None) -> PatchMeanViT:
    """ViT-B/16 with torchvision's ``vit_b_16`` layout (its state dicts load as they are), untrained."""
    if weights is not None:
        raise ModelError(
            "vit_b_16() builds an untrained model but received weights",
            "build it with fruitlens.models.build_model(..., weights='imagenet')",
        )
    return PatchMeanViT(image_size=IMAGE_SIZE, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
