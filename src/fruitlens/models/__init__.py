"""Models: a registry of builders, each carrying its Preprocessing; pretrained weights through torchvision."""

from fruitlens.models.preprocessing import Preprocessing
from fruitlens.models.registry import MODELS, FruitNet, build_model, list_models

__all__ = ["MODELS", "FruitNet", "Preprocessing", "build_model", "list_models"]
