"""The quality answer of one frame: classical measures, the learned score and the quality labels.

:class:`QualityEngine` is what the ``Quality`` deployment runs and what evaluations call, so both
give the same flags for the same frame.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from livelens import fusion
from livelens.errors import ModelNotFoundError
from livelens.imageio import EncodedImage, as_rgb
from livelens.taxonomy import Taxonomy, load_taxonomy

log = logging.getLogger("livelens.quality")


class QualityEngine:
    """Classical measures plus, when a store has one, the learned NR-IQA score.

    Args:
        iqa_ref: ``name`` or ``name@version`` of the learned score; None for none.
        flags_ref: ``name`` or ``name@version`` of the learned flags (:mod:`livelens.quality.flags`);
            None leaves the dark, bright, blur and occlusion flags to the classical thresholds.
        stores: The store chain (default :func:`livelens.store.store_chain`).
        tax: The taxonomy.
    """

    def __init__(self, iqa_ref: str | None = "quality_iqa", stores: Sequence[str] | None = None,
                 tax: Taxonomy | None = None, flags_ref: str | None = "quality_flags"):
        from livelens.quality import assess

        self._assess = assess
        self.tax = tax or load_taxonomy()
        self.stores = list(stores) if stores else None
        #: ``(IqaModel, info)`` of the served learned model, swapped as one, or ``(None, None)``.
        self.iqa: tuple[Any, dict[str, Any] | None] = (None, None)
        #: ``(FlagModel, info)`` of the served learned flags, or ``(None, None)``.
        self.flags: tuple[Any, dict[str, Any] | None] = (None, None)
        self.use_iqa(iqa_ref)
        self.use_flags(flags_ref)

    def _open(self, ref: str, kind: str) -> tuple[Any, dict[str, Any]] | None:
        from livelens.store import open_in_stores

        try:
            store, full = open_in_stores(ref, self.stores)
        except ModelNotFoundError:
            # The classical measures still answer; the learned models are additions.
            log.warning("quality model %r is in no model store; serving classical measures for it", ref)
            return None
        card = store.card(full)
        info = {"ref": full, "kind": kind, "store": store.uri, "source": card.get("source") or "model store",
                "card": {k: card.get(k) for k in ("created_at", "git_sha", "kind", "metrics", "datasets", "licence")
                         if k in card}}
        return store, info

    def use_flags(self, ref: str | None) -> None:
        """Decide dark, bright, blur and occlusion with ``ref`` (None: the classical thresholds)."""
        if not ref:
            self.flags = (None, None)
            return
        from livelens.quality.flags import FlagModel

        opened = self._open(ref, "quality_flags")
        if opened is None:
            self.flags = (None, None)
            return
        store, info = opened
        # Drop the card's bulky per-level tables from /v1/models; the store keeps them.
        info["card"].pop("metrics", None)
        self.flags = (FlagModel.from_store(store, info["ref"]), info)

    def use_iqa(self, ref: str | None) -> None:
        """Serve ``ref`` (None: no learned score); a ref in no store leaves the classical measures alone."""
        if not ref:
            self.iqa = (None, None)
            return
        import torch

        from livelens.quality.iqa import IqaModel

        opened = self._open(ref, "quality_iqa")
        if opened is None:
            self.iqa = (None, None)
            return
        store, info = opened
        torch.set_num_threads(1)  # small models on one frame: more threads only add overhead
        self.iqa = (IqaModel.from_store(store, info["ref"]), info)

    def models_info(self) -> list[dict[str, Any]]:
        from livelens.coverage import quality_covers

        out = [{"ref": fusion.QUALITY_MODEL, "source": "livelens.quality (classical measures, no weights)",
                "measures": ["brightness", "blur", "occlusion", "black", "noise", "compression"],
                "covers": quality_covers()}]
        return out + [info for _, info in (self.iqa, self.flags) if info]

    def assess(self, image: Any) -> dict[str, Any]:
        """Measures, labels and models of one frame (array, checked bytes, or anything ``assess`` reads)."""
        iqa, info = self.iqa
        flags, flags_info = self.flags
        rgb = as_rgb(image) if isinstance(image, EncodedImage) else image
        out = self._assess(rgb, iqa=iqa, flags=flags)
        labels = fusion.quality_labels(self.tax, out)
        out.pop("labels", None)
        models = [fusion.QUALITY_MODEL] + [i["ref"] for i in (info, flags_info) if i]
        return {**out, "labels": labels, "models": models}
