"""Content-safety models: torchvision backbones × learnable/bilinear poolings × multi-task heads."""

from livelens.models.factory import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    create_model,
    ensure_offline_weights,
    list_models,
    list_pools,
)
from livelens.models.heads import (
    HeadSpec,
    heads_from_taxonomy,
    multitask_loss,
    normalize_heads,
    predict,
    probabilities,
)
from livelens.models.pooling import GatedPool2d, create_pool, replace_max_pooling
from livelens.models.transforms import preprocess

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Classifier",
    "GatedPool2d",
    "HeadSpec",
    "create_model",
    "create_pool",
    "ensure_offline_weights",
    "heads_from_taxonomy",
    "list_models",
    "list_pools",
    "multitask_loss",
    "normalize_heads",
    "predict",
    "preprocess",
    "probabilities",
    "replace_max_pooling",
]
