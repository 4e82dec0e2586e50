"""Models in the model store: the card records the architecture, the file holds the weights.

``state: "head_only"`` keeps shipped default models small: when the backbone is the
untouched ImageNet one, only the pooling and head parameters are stored (a few hundred KB
instead of 14 MB for mobilenet_v2), and loading rebuilds the backbone from torchvision's
ImageNet weights.
"""

from __future__ import annotations

from typing import Any

import torch

from livelens.errors import ConfigError
from livelens.models.factory import Classifier, create_model
from livelens.store import ModelStore


def _backbone_is_imagenet(model: Classifier) -> bool:
    reference = create_model(model.backbone_name, model.pool_name, heads=model.heads, pretrained=True,
                             **model.pool_kw).backbone.state_dict()
    mine = model.backbone.state_dict()
    return all(torch.equal(mine[k].cpu(), v) for k, v in reference.items())


def save_to_store(store: ModelStore, name: str, model: Classifier, card: dict[str, Any],
                  head_only: bool = False) -> str:
    """Publish ``model`` as ``name@<next version>`` with its architecture in the card.

    Args:
        store: The model store.
        name: Model name.
        model: A :class:`~livelens.models.Classifier` (DDP-unwrapped).
        card: The model card; ``arch``, ``state`` and ``backbone_weights`` are filled in.
        head_only: Store only non-backbone parameters. Allowed only when the backbone is
            exactly the ImageNet one (a frozen backbone kept in eval mode).

    Raises:
        ConfigError: ``head_only`` with a backbone that differs from ImageNet's (e.g. its
            BatchNorm statistics were updated in train mode).
    """
    model = getattr(model, "module", model)
    state = model.state_dict()
    # A card that already asks for a head-only save gets one (the training job writes its card first).
    head_only = head_only or (card.get("state") == "head_only" and card.get("backbone_weights") == "imagenet")
    card = {**card, "arch": model.arch()}
    if head_only:
        if not _backbone_is_imagenet(model):
            raise ConfigError("head_only save needs the untouched ImageNet backbone, but its weights or BatchNorm "
                              "statistics changed; keep the frozen backbone in eval mode or save the full state")
        state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        card.update(state="head_only", backbone_weights="imagenet")
    else:
        card["state"] = "full"
    return store.save(name, state, card)


def load_from_store(store: ModelStore, ref: str) -> Classifier:
    """Rebuild a model from its card and load its weights (``weights_only``, strict)."""
    stored = store.load(ref)
    arch = stored.card.get("arch")
    if not arch:
        raise ConfigError(f"model card of {stored.ref} has no 'arch'; it was not saved by save_to_store")
    head_only = stored.card.get("state") == "head_only"
    model = create_model(arch["name"], arch["pool"], heads=arch["heads"], pretrained=head_only,
                         drop_rate=arch.get("drop_rate", 0.0), **arch.get("pool_kw", {}))
    if head_only:
        missing, unexpected = model.load_state_dict(stored.state_dict, strict=False)
        bad = [k for k in missing if not k.startswith("backbone.")]
        if bad or unexpected:
            raise ConfigError(f"{stored.ref}: weights do not match the architecture (missing {bad}, "
                              f"unexpected {unexpected})")
    else:
        model.load_state_dict(stored.state_dict, strict=True)
    size = stored.card.get("input_size")
    if isinstance(size, int):
        model.default_cfg["input_size"] = (3, size, size)
    elif isinstance(size, list | tuple) and len(size) in (2, 3):
        model.default_cfg["input_size"] = (3, *[int(v) for v in size[-2:]])
    return model.eval()
