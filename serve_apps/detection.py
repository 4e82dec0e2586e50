"""Detection: livelens' mmdet detector on the whole frame, its boxes routed to the next steps.

:class:`livelens.detection.DetectionEngine` answers overlay objects (picture-in-picture windows,
QR codes, logos, text overlays, HUD panels; never faces, which are personal data) and the labels
they raise: ``ads_picture_in_picture`` from a window, ``ads_qrcode`` from a code the decoder read
inside a QR box. The gateway sends each window on to the moderation deployment for a
second-pass classification of its content (``Moderation.classify_regions``). The model and
thresholds are live (:class:`DetectionConfig`); a model no store holds is reported by
``/v1/models`` and the stage answers no objects, so a fresh clone serves before
``make train-persons`` has run.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from ray import serve

from livelens.serving.envelope import quiet_expected_errors
from livelens.serving.heap import start_heap_trimmer
from serve_apps.common import Args, DeployOptions

log = logging.getLogger("ray.serve")


#: A model-store ref as the live config takes it (``name`` or ``name@version``).
REF_PATTERN = r"^[a-z][a-z0-9_]{0,63}(@\d{1,9})?$"


class DetectionConfig(BaseModel):
    """Detection knobs that change without a restart (``user_config``).

    Attributes:
        model: The detector's model-store ref (``persons_det``, ``persons_det@2``).
        min_scores: Per class (``pip``, ``qrcode``, ``logo``, ``text_overlay``, ``hud``), the score
            a box needs; classes left out take the thresholds the model's card chose on held-out
            frames.
        enabled: Run the stage; off, it answers no objects without running the model (the
            detector stays loaded, so switching it back on is immediate).
        decode_qr: Send QR boxes to the decoder.
        qr_probe: QR boxes under their threshold but at this score or more are decoded too, and
            answered only when read (:class:`livelens.detection.DetectionEngine`).
        second_pass: Classify the content of picture-in-picture windows.
        max_objects: Objects answered per frame, best first.
        window_check: Who decides picture-in-picture boxes: ``true`` the window check the
            detector's card names (:class:`livelens.detection.WindowCheck`), ``false`` the ``pip``
            threshold alone, or a check's ref (``window_check@1``). A ref no store has is refused.
    """

    model_config = ConfigDict(extra="forbid")
    model: str = Field("persons_det", pattern=REF_PATTERN)
    min_scores: dict[str, float] = Field(default_factory=dict)
    enabled: bool = True
    decode_qr: bool = True
    qr_probe: float = Field(0.1, ge=0.0, le=1.0)
    second_pass: bool = True
    max_objects: int = Field(50, ge=1, le=500)
    window_check: bool | Annotated[str, StringConstraints(pattern=REF_PATTERN)] = True

    def model_post_init(self, _: Any) -> None:
        from livelens.detection import ANSWERED

        bad = {k: v for k, v in self.min_scores.items() if k not in ANSWERED or not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"min_scores takes classes {list(ANSWERED)} with values in [0, 1], got {bad}")


class DetectionArgs(Args):
    """Detection settings fixed for a replica's life.

    Attributes:
        stores: Model stores the detector's ref is searched in, in order (default: the store chain).
        threads: Intra-op threads of the replica.
        live: The starting :class:`DetectionConfig`.
    """

    model_config = ConfigDict(extra="forbid")
    stores: list[str] | None = None
    threads: int = Field(1, ge=1, le=64)
    live: DetectionConfig = Field(default_factory=DetectionConfig)
    deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.2, max_ongoing_requests=4))


@serve.deployment
class Detection:
    """``analyze`` per frame: overlay objects and the labels they raise (the second pass is the gateway's)."""

    def __init__(self, args: DetectionArgs):
        quiet_expected_errors()
        start_heap_trimmer()
        import torch

        torch.set_num_threads(args.threads)
        self.args = args
        self.live = args.live
        self.missing = ""
        self.engine = None
        try:
            self.engine = self._engine(args.live)
        except Exception as exc:
            from livelens.errors import ModelNotFoundError

            if not isinstance(exc, ModelNotFoundError):
                raise
            # A fresh clone has no detector until `make train-persons`: serve, and say so.
            self.missing = f"{exc}; run `make train-persons` (detection answers no objects)"
            log.warning(self.missing)

    def _engine(self, live: DetectionConfig):
        import numpy as np

        from livelens.detection import DetectionEngine

        engine = DetectionEngine(live.model, self.args.stores, min_scores=live.min_scores, decode_qr=live.decode_qr,
                                 second_pass=live.second_pass, max_objects=live.max_objects, qr_probe=live.qr_probe,
                                 window_check=live.window_check)
        engine.analyze(np.zeros((360, 640, 3), np.uint8))  # torch's first forward allocates its buffers
        return engine

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a new ``user_config``; a model no store holds is a ``ModelNotFoundError`` and the old one stays."""
        from livelens.errors import ConfigError, ModelNotFoundError

        try:
            live = DetectionConfig.model_validate(config or {})
        except ValueError as exc:
            raise ConfigError(f"detection user_config: {exc}") from None
        changed = live.model_dump(exclude={"enabled"}) != self.live.model_dump(exclude={"enabled"})
        if changed or self.engine is None:
            try:
                self.engine = self._engine(live)  # built first: a failure leaves the old one serving
                self.missing = ""
            except ModelNotFoundError:
                # Serve calls this at start with the config __init__ had: a detector still not
                # stored keeps the stage idle. A new ref no store has is refused (the admin route
                # refuses it before it gets here).
                if self.engine is not None or live.model != self.live.model:
                    raise
        self.live = live

    def check_health(self) -> None:
        """Stateless; nothing can go stale."""

    def info(self) -> dict[str, Any]:
        from livelens.coverage import detection_covers

        models = []
        if self.engine is not None:
            card = getattr(self.engine.detector, "card", None) or {}
            models.append({"ref": self.engine.ref, "kind": "overlay detector (mmdet)",
                           "source": "livelens' mmdet detector (make train-persons), from the model store",
                           "licence": "Apache-2.0 code; weights trained by livelens (sources in card.licence)",
                           "thresholds": self.engine.min_scores, "covers": detection_covers(card),
                           **({"card": card} if card else {})})
            check = self.engine.window_check
            if check is not None:
                models.append({"ref": check.ref, "kind": "picture-in-picture window check",
                               "source": "livelens (python -m livelens.detection_eval window-check), from the model store",
                               "licence": "Apache-2.0 code; torchvision's ImageNet MobileNetV2 (BSD-3-Clause) and a "
                                          "head fitted by livelens",
                               "thresholds": {"floor": check.floor, "check": check.threshold}})
        return {"models": models, "missing": self.missing, "live": self.live.model_dump()}

    def analyze(self, image) -> dict[str, Any]:
        """Objects, QR payloads and labels of one frame (array or checked bytes), before the second pass."""
        from livelens.detection import idle_answer

        t0 = time.perf_counter()
        if self.engine is None or not self.live.enabled:
            return {**idle_answer(self.missing or "detection is switched off (detect.enabled)"),
                    "timings_ms": {"detect": 0.0}}
        out = self.engine.analyze(image)
        out["second_pass_on"] = self.engine.second_pass
        return {**out, "timings_ms": {"detect": round((time.perf_counter() - t0) * 1000, 3)}}


def bind_detection(args: DetectionArgs | dict | None = None):
    """The detection deployment, bound (for composition into the gateway)."""
    a = args if isinstance(args, DetectionArgs) else DetectionArgs.model_validate(args or {})
    return Detection.options(**a.deploy.to_options(), user_config=a.live.model_dump()).bind(a)


def build_app(args: DetectionArgs | dict | None = None):
    """Detection alone (called with ``.analyze`` through a handle; HTTP goes through the gateway)."""
    return bind_detection(args)
