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
        iqa_ref: ``name`` or ``name@version`` of the learned model; None for the classical measures only.
        stores: The store chain (default :func:`livelens.store.store_chain`).
        tax: The taxonomy.
    """

    def __init__(self, iqa_ref: str | None = "quality_iqa", stores: Sequence[str] | None = None,
                 tax: Taxonomy | None = None):
        from livelens.quality import assess

        self._assess = assess
        self.tax = tax or load_taxonomy()
        self.stores = list(stores) if stores else None
        #: ``(IqaModel, info)`` of the served learned model, swapped as one, or ``(None, None)``.
        self.iqa: tuple[Any, dict[str, Any] | None] = (None, None)
        self.use_iqa(iqa_ref)

    def use_iqa(self, ref: str | None) -> None:
        """Serve ``ref`` (None: no learned score); a ref in no store leaves the classical measures alone."""
        if not ref:
            self.iqa = (None, None)
            return
        import torch

        from livelens.quality.iqa import IqaModel
        from livelens.store import open_in_stores

        try:
            store, full = open_in_stores(ref, self.stores)
        except ModelNotFoundError:
            # The classical measures still answer; the learned score is an addition.
            log.warning("quality model %r is in no model store; serving classical measures only", ref)
            self.iqa = (None, None)
            return
        torch.set_num_threads(1)  # five small MLPs (44 k parameters): more threads only add overhead
        card = store.card(full)
        info = {"ref": full, "kind": "quality_iqa", "store": store.uri,
                         "source": card.get("source") or "model store",
                         "card": {k: card.get(k) for k in ("created_at", "git_sha", "kind", "metrics", "datasets")
                                  if k in card}}
        self.iqa = (IqaModel.from_store(store, full), info)

    def models_info(self) -> list[dict[str, Any]]:
        from livelens.coverage import quality_covers

        out = [{"ref": fusion.QUALITY_MODEL, "source": "livelens.quality (classical measures, no weights)",
                "measures": ["brightness", "blur", "occlusion", "black", "noise", "compression"],
                "covers": quality_covers()}]
        return out + ([self.iqa[1]] if self.iqa[1] else [])

    def assess(self, image: Any) -> dict[str, Any]:
        """Measures, labels and models of one frame (array, checked bytes, or anything ``assess`` reads)."""
        iqa, info = self.iqa
        rgb = as_rgb(image) if isinstance(image, EncodedImage) else image
        out = self._assess(rgb, iqa=iqa)
        labels = fusion.quality_labels(self.tax, out)
        out.pop("labels", None)
        models = [fusion.QUALITY_MODEL] + ([info["ref"]] if info else [])
        return {**out, "labels": labels, "models": models}
