"""Picture quality: brightness, blur, occlusion, black frames (classical measures, no model load).

Frozen-stream detection needs consecutive frames of one stream, so it lives in the streams app.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from serve_apps.common import DeployOptions

QUALITY_MODEL = "quality_classical@1"


class QualityArgs(BaseModel):
    """Quality settings."""

    model_config = ConfigDict(extra="forbid")
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

    def check_health(self) -> None:
        """Stateless; nothing can go stale."""

    def info(self) -> dict[str, Any]:
        return {"models": [{"ref": QUALITY_MODEL, "source": "livelens.quality (classical measures, no weights)",
                            "measures": ["brightness", "blur", "occlusion", "black", "noise", "compression"]}]}

    def assess(self, image) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = self._assess(image)
        labels = []
        for name in out.pop("labels", []):
            lab = self.tax.describe(name, 1.0)
            box = out.get("occlusion", {}).get("box") if name == "quality_occluded" else None
            lab["evidence"] = [{"kind": "box", "box": box, "source": "quality"}] if box else []
            lab["model"] = QUALITY_MODEL
            labels.append(lab)
        return {**out, "labels": labels, "models": [QUALITY_MODEL],
                "timings_ms": {"assess": round((time.perf_counter() - t0) * 1000, 3)}}


def bind_quality(args: dict | None = None):
    """The quality deployment, bound (for composition into the gateway)."""
    a = QualityArgs.model_validate(args or {})
    return Quality.options(**a.deploy.to_options()).bind(a.model_dump())


def build_app(args: QualityArgs | dict | None = None):
    """Quality alone (called with ``.assess`` through a handle; HTTP goes through the gateway)."""
    return bind_quality(args.model_dump() if isinstance(args, QualityArgs) else args)
