"""Picture quality: brightness, blur, occlusion, black frames (classical measures) and the learned score.

The learned NR-IQA score (``quality_iqa``, 0–100) is added when a model store holds one; the
shipped defaults do. Which model scores is live (:class:`QualityConfig`). Frozen-stream detection
needs consecutive frames of one stream, so it lives in the streams app.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from livelens.serving.envelope import quiet_expected_errors
from livelens.serving.heap import start_heap_trimmer
from serve_apps.common import Args, DeployOptions

log = logging.getLogger("ray.serve")


class QualityConfig(BaseModel):
    """Quality knobs that change without a restart (``user_config``).

    Attributes:
        iqa_ref: ``name`` or ``name@version`` of the learned quality model; None turns it off.
        flags_ref: ``name`` or ``name@version`` of the learned flags; None falls back to the
            classical thresholds.
    """

    model_config = ConfigDict(extra="forbid")
    iqa_ref: str | None = "quality_iqa"
    flags_ref: str | None = "quality_flags"


class QualityArgs(Args):
    """Quality settings fixed for a replica's life.

    Attributes:
        stores: Model stores to search in order (default: the store chain of :mod:`livelens.store`).
        live: The starting :class:`QualityConfig`.
    """

    model_config = ConfigDict(extra="forbid")
    stores: list[str] | None = None
    live: QualityConfig = Field(default_factory=QualityConfig)
    deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.2, max_ongoing_requests=8))


@serve.deployment
class Quality:
    """``assess`` per frame, with its flags turned into taxonomy labels (group ``quality``, tag only)."""

    def __init__(self, args: QualityArgs):
        quiet_expected_errors()  # a client's 4xx: one INFO line in this replica's log, no traceback
        start_heap_trimmer()  # large images leave the heap at its peak otherwise
        from livelens.quality.engine import QualityEngine

        self.args = args
        self.live = args.live
        self.engine = QualityEngine(args.live.iqa_ref, args.stores, flags_ref=args.live.flags_ref)

    def reconfigure(self, config: dict[str, Any]) -> None:
        from livelens.errors import ConfigError

        try:
            live = QualityConfig.model_validate(config or {})
        except ValueError as exc:
            raise ConfigError(f"quality user_config: {exc}") from None
        if live.iqa_ref != self.live.iqa_ref:
            self.engine.use_iqa(live.iqa_ref)
        if live.flags_ref != self.live.flags_ref:
            self.engine.use_flags(live.flags_ref)
        self.live = live

    def check_health(self) -> None:
        """Stateless; nothing can go stale."""

    def info(self) -> dict[str, Any]:
        return {"models": self.engine.models_info(), "live": self.live.model_dump()}

    def assess(self, image) -> dict[str, Any]:
        """Classical measures, the learned score and quality labels for one frame (array or bytes)."""
        t0 = time.perf_counter()
        out = self.engine.assess(image)
        return {**out, "timings_ms": {"assess": round((time.perf_counter() - t0) * 1000, 3)}}


def bind_quality(args: QualityArgs | dict | None = None):
    """The quality deployment, bound (for composition into the gateway)."""
    a = args if isinstance(args, QualityArgs) else QualityArgs.model_validate(args or {})
    return Quality.options(**a.deploy.to_options(), user_config=a.live.model_dump()).bind(a)


def build_app(args: QualityArgs | dict | None = None):
    """Quality alone (called with ``.assess`` through a handle; HTTP goes through the gateway)."""
    return bind_quality(args)
