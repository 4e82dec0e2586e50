"""Picture quality: brightness, blur, occlusion, black frames (classical measures) and the learned score.

The learned NR-IQA score (``quality_iqa``, 0–100) is added when a model store holds one; the
shipped defaults do. Frozen-stream detection needs consecutive frames of one stream, so it lives
in the streams app.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from serve_apps.common import DeployOptions

QUALITY_MODEL = "quality_classical@1"
log = logging.getLogger("ray.serve")


class QualityArgs(BaseModel):
    """Quality settings.

    Attributes:
        iqa_ref: ``name`` or ``name@version`` of the learned quality model; None turns it off.
        stores: Model stores to search in order (default: runs/model_store, then the shipped defaults).
    """

    model_config = ConfigDict(extra="forbid")
    iqa_ref: str | None = "quality_iqa"
    stores: list[str] | None = None
    deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.2, max_ongoing_requests=8))


@serve.deployment
class Quality:
    """``assess`` per frame, with its flags turned into taxonomy labels (group ``quality``, tag only)."""

    def __init__(self, args: dict):
        from livelens.quality import assess
        from livelens.taxonomy import load_taxonomy

        self.args = QualityArgs.model_validate(args)
        self._assess = assess
        self.tax = load_taxonomy()
        self.iqa = None
        self.models_info: list[dict[str, Any]] = [
            {"ref": QUALITY_MODEL, "source": "livelens.quality (classical measures, no weights)",
             "measures": ["brightness", "blur", "occlusion", "black", "noise", "compression"]}]
        if self.args.iqa_ref:
            self._load_iqa(self.args.iqa_ref)

    def _load_iqa(self, ref: str) -> None:
        import torch

        from livelens.quality.iqa import IqaModel
        from livelens.store import ModelStore
        from serve_apps.common import find_in_stores

        found = find_in_stores(ref, self.args.stores)
        if found is None:
            # The classical measures still answer; the learned score is an addition.
            log.warning("quality model %r is in no model store; serving classical measures only", ref)
            return
        torch.set_num_threads(1)  # five small MLPs (44 k parameters): more threads only add overhead
        root, resolved = found
        store = ModelStore(root)
        self.iqa = IqaModel.from_store(store, resolved)
        card = store.card(resolved)
        self.models_info.append({"ref": resolved, "kind": "quality_iqa", "store": root,
                                 "source": card.get("source") or "model store",
                                 "card": {k: card.get(k) for k in ("created_at", "git_sha", "kind", "metrics",
                                                                    "datasets") if k in card}})

    def check_health(self) -> None:
        """Stateless; nothing can go stale."""

    def info(self) -> dict[str, Any]:
        return {"models": self.models_info}

    def assess(self, image) -> dict[str, Any]:
        """Classical measures, the learned score and quality labels for one frame (array or bytes)."""
        from livelens.imageio import as_rgb

        t0 = time.perf_counter()
        out = self._assess(as_rgb(image), iqa=self.iqa)
        labels = []
        for name in out.pop("labels", []):
            lab = self.tax.describe(name, 1.0)
            box = out.get("occlusion", {}).get("box") if name == "quality_occluded" else None
            lab["evidence"] = [{"kind": "box", "box": box, "source": "quality"}] if box else []
            lab["model"] = QUALITY_MODEL
            labels.append(lab)
        return {**out, "labels": labels, "models": [m["ref"] for m in self.models_info],
                "timings_ms": {"assess": round((time.perf_counter() - t0) * 1000, 3)}}


def bind_quality(args: dict | None = None):
    """The quality deployment, bound (for composition into the gateway)."""
    a = QualityArgs.model_validate(args or {})
    return Quality.options(**a.deploy.to_options()).bind(a.model_dump())


def build_app(args: QualityArgs | dict | None = None):
    """Quality alone (called with ``.assess`` through a handle; HTTP goes through the gateway)."""
    return bind_quality(args.model_dump() if isinstance(args, QualityArgs) else args)
