"""Multi-task heads: one head per taxonomy group, sharing one backbone.

Exclusive groups get a softmax head whose classes are the group's negative class followed
by its leaves; groups whose labels co-occur (a QR code *and* a phone number) get a sigmoid
head over the same class list, where the negative fires exactly when nothing else does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from livelens.errors import ConfigError
from livelens.taxonomy import Taxonomy

HeadKind = Literal["softmax", "sigmoid"]


@dataclass(frozen=True)
class HeadSpec:
    """One output head: its activation and its class names in output order."""

    kind: HeadKind
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("softmax", "sigmoid"):
            raise ConfigError(f"head kind must be softmax or sigmoid, got {self.kind!r}")
        if len(self.classes) < 2 and self.kind == "softmax":
            raise ConfigError(f"a softmax head needs at least 2 classes, got {self.classes}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, d: Mapping) -> HeadSpec:
        return cls(kind=d["kind"], classes=tuple(d["classes"]))


def heads_from_taxonomy(tax: Taxonomy, groups: Sequence[str] | None = None) -> dict[str, HeadSpec]:
    """Head specs for taxonomy groups (all of them by default), in taxonomy order.

    Raises:
        ConfigError: A requested group is not in the taxonomy.
    """
    wanted = list(tax.groups) if groups is None else list(groups)
    unknown = [g for g in wanted if g not in tax.groups]
    if unknown:
        raise ConfigError(f"groups {unknown} are not in taxonomy {tax.version}; it has {list(tax.groups)}")
    return {g: HeadSpec("softmax" if tax.groups[g].kind == "exclusive" else "sigmoid", tax.groups[g].classes)
            for g in tax.groups if g in wanted}


def normalize_heads(heads: Mapping[str, HeadSpec | Mapping] | None, num_classes: int | None) -> dict[str, HeadSpec]:
    """Accept ``heads`` (specs or their dicts) or a plain ``num_classes`` (one softmax head ``main``)."""
    if heads is not None and num_classes is not None:
        raise ConfigError("give either heads or num_classes, not both")
    if heads is None:
        if num_classes is None:
            raise ConfigError("a model needs heads (or taxonomy groups) or num_classes")
        if num_classes < 2:
            raise ConfigError(f"num_classes must be ≥ 2, got {num_classes}")
        return {"main": HeadSpec("softmax", tuple(f"class_{i}" for i in range(num_classes)))}
    if not heads:
        raise ConfigError("heads is empty")
    return {k: v if isinstance(v, HeadSpec) else HeadSpec.from_dict(v) for k, v in heads.items()}


class MultiTaskHead(nn.Module):
    """Linear heads over a shared pooled vector, one per task."""

    def __init__(self, in_features: int, heads: Mapping[str, HeadSpec], drop_rate: float = 0.0):
        super().__init__()
        self.specs = dict(heads)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.ModuleDict({name: nn.Linear(in_features, len(spec.classes)) for name, spec in heads.items()})

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.drop(z)
        return {name: fc(z) for name, fc in self.fc.items()}


def multitask_loss(logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                   heads: Mapping[str, HeadSpec], weights: Mapping[str, float] | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of per-head losses: cross-entropy for softmax heads, BCE for sigmoid heads.

    Args:
        logits: Per-head logits (B, K).
        targets: Per-head class indices (B,) for softmax heads, multi-hot (B, K) for sigmoid heads.
        heads: The head specs.
        weights: Per-head loss weights (default 1.0 each).

    Returns:
        The total loss and the per-head losses.
    """
    weights = weights or {}
    per_head: dict[str, torch.Tensor] = {}
    for name, spec in heads.items():
        if name not in targets:
            continue
        out, tgt = logits[name], targets[name]
        if spec.kind == "softmax":
            per_head[name] = F.cross_entropy(out, tgt.long())
        else:
            per_head[name] = F.binary_cross_entropy_with_logits(out, tgt.to(out.dtype))
    if not per_head:
        raise ConfigError(f"no targets for any head; heads are {list(heads)}, targets {list(targets)}")
    total = sum(weights.get(n, 1.0) * loss for n, loss in per_head.items())
    return total, per_head  # type: ignore[return-value]


def probabilities(logits: Mapping[str, torch.Tensor], heads: Mapping[str, HeadSpec]) -> dict[str, torch.Tensor]:
    """Softmax or sigmoid per head."""
    return {n: (logits[n].float().softmax(-1) if heads[n].kind == "softmax" else logits[n].float().sigmoid())
            for n in logits}


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head probabilities of a model in eval mode (restores its previous mode)."""
    was_training = model.training
    model.eval()
    try:
        return probabilities(model(x), model.heads)
    finally:
        model.train(was_training)
