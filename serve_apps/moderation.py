"""Content safety: :class:`livelens.moderation.ModerationEngine` behind ``@serve.batch``, reconfigurable live.

Frames from concurrent requests are classified together (one forward pass per batch); a lone
request skips the batch wait. Labels and evidence come from the engine, so this deployment answers
what ``make eval-safety`` measures. The safety model version, the batch settings and the evidence
knobs are Serve ``user_config`` (:class:`ModerationConfig`): a changed config swaps them in
``reconfigure`` without a restart, while requests keep being answered by the version they started on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from livelens.imageio import EncodedImage
from livelens.serving.envelope import quiet_expected_errors
from livelens.serving.heap import start_heap_trimmer
from serve_apps.common import Args, DeployOptions

log = logging.getLogger("ray.serve")


class ModerationConfig(BaseModel):
    """Moderation knobs that change without a restart (the deployment's ``user_config``).

    Attributes:
        safety_ref: ``name`` or ``name@version`` of the safety model, looked up in the store chain.
        min_score: Labels scoring below this are left out of answers (decisions are unaffected).
        max_batch_size: Frames per forward pass.
        batch_wait_timeout_s: How long a batch waits to fill.
        cam_labels: Most labels per frame that get Grad-CAM evidence.
        second_pass: Re-classify 1.5× crops around evidence boxes.
    """

    model_config = ConfigDict(extra="forbid")
    safety_ref: str = "safety"
    min_score: float = Field(0.05, ge=0, le=1)
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5)
    cam_labels: int = Field(2, ge=0, le=16)
    second_pass: bool = True


class ModerationArgs(Args):
    """Moderation settings fixed for a replica's life.

    Attributes:
        stores: Model stores to search in order (default: the store chain of :mod:`livelens.store`).
        use_open_nsfw: Also run Yahoo's open_nsfw (ONNX) and report it on the porn group.
        torch_threads: Intra-op threads of the replica.
        live: The starting :class:`ModerationConfig` (Serve's ``user_config`` replaces it live).
        deploy: Resources and queue limits.
    """

    model_config = ConfigDict(extra="forbid")
    stores: list[str] | None = None
    use_open_nsfw: bool = True
    torch_threads: int = Field(2, ge=1)
    live: ModerationConfig = Field(default_factory=ModerationConfig)
    deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.5, max_ongoing_requests=16,
                                                                        max_queued_requests=64))


_BATCH = ModerationConfig()


@serve.deployment
class Moderation:
    """The safety classifier (batched) and open_nsfw; evidence on request."""

    def __init__(self, args: ModerationArgs):
        quiet_expected_errors()  # a client's 4xx: one INFO line in this replica's log, no traceback
        start_heap_trimmer()  # large images leave the heap at its peak otherwise
        from livelens.moderation import ModerationEngine

        self.args = args
        self.live = args.live
        self.engine = ModerationEngine(args.live.safety_ref, args.stores, args.use_open_nsfw, args.torch_threads)
        # Requests in the classify stage, and forward passes running (all on the replica's event loop).
        self._waiting = 0
        self._computing = 0
        self._set_batching(self.live)

    def _set_batching(self, live: ModerationConfig) -> None:
        self._classify.set_max_batch_size(live.max_batch_size)
        self._classify.set_batch_wait_timeout_s(live.batch_wait_timeout_s)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a new ``user_config``: load the new model version first, then swap it in.

        Raises:
            ConfigError: The config is invalid (pydantic's message).
            ModelNotFoundError: The model version is in no store (the served one stays).
        """
        from livelens.errors import ConfigError

        try:
            live = ModerationConfig.model_validate(config or {})
        except ValueError as exc:
            raise ConfigError(f"moderation user_config: {exc}") from None
        await asyncio.to_thread(self.engine.use_safety, live.safety_ref)
        self._set_batching(live)
        self.live = live

    def check_health(self) -> None:
        """Fails (and so restarts the replica) if the model went away."""
        if self.engine.safety is None and self.engine.nsfw is None:
            raise RuntimeError("no moderation model loaded")

    def info(self) -> dict[str, Any]:
        return {"models": self.engine.models_info(), "missing": self.engine.missing, "live": self.live.model_dump()}

    async def history(self, name: str) -> list[dict[str, Any]]:
        """Every version of ``name`` in this replica's store chain (:func:`livelens.store.model_history`)."""
        from livelens.store import model_history

        return await asyncio.to_thread(model_history, name, self.args.stores)

    def _decode_and_classify(self, frame: np.ndarray | EncodedImage) -> tuple[np.ndarray, dict[str, Any]]:
        rgb, ms = self.engine.decode(frame)
        return rgb, {**self.engine.classify([rgb])[0], "decode_ms": ms}

    # Two batches in flight: while one is in open_nsfw (ONNX Runtime), the next runs the torch model.
    # With one, a core sat idle between the two models; 2 raised served img/s from 20.5 to 27.2 here.
    @serve.batch(max_batch_size=_BATCH.max_batch_size, batch_wait_timeout_s=_BATCH.batch_wait_timeout_s,
                 max_concurrent_batches=2)
    async def _classify(self, frames: list[np.ndarray]) -> list[dict[str, Any]]:
        self._computing += 1
        try:
            return await asyncio.to_thread(self.engine.classify, frames)
        finally:
            self._computing -= 1

    async def moderate(self, frame: np.ndarray | EncodedImage, evidence: str = "boxes",
                       model: str | None = None) -> dict[str, Any]:
        """Labels with decisions for one frame (array or checked bytes), plus evidence unless ``evidence == 'none'``.

        Args:
            frame: The frame.
            evidence: ``none``, ``boxes``, ``heatmap`` or ``polygons``.
            model: Pin the answer to this safety version (``safety@N``). The served version rides
                the batches; another one runs alone, loaded once and kept (``ModerationEngine.pinned``).

        Raises:
            ModelNotFoundError: The pinned version is in no store.
        """
        t0 = time.perf_counter()
        live = self.live
        if model:
            pinned = await asyncio.to_thread(self.engine.pinned, model)
            if pinned is not self.engine.safety:
                return await asyncio.to_thread(self._moderate_pinned, frame, evidence, pinned, live, t0)
        # Batching pays only when requests overlap. A lone request skips the batch queue, where it
        # would wait ``batch_wait_timeout_s`` for company that is not coming (10 ms at c=1 here),
        # and decodes in the same worker-thread trip as its forward pass.
        self._waiting += 1
        try:
            if self._waiting == 1 and self._computing == 0:
                self._computing += 1
                try:
                    frame, scores = await asyncio.to_thread(self._decode_and_classify, frame)
                finally:
                    self._computing -= 1
            else:
                frame, decode_ms = await asyncio.to_thread(self.engine.decode, frame)
                scores = {**await self._classify(frame), "decode_ms": decode_ms}
        finally:
            self._waiting -= 1
        # ``compute`` is the forward pass of the batch this frame rode in; the rest of ``classify``
        # is queueing and the batch wait, i.e. serving overhead.
        decode_ms = scores["decode_ms"]
        timings = {"decode": decode_ms, "classify": (time.perf_counter() - t0) * 1000 - decode_ms,
                   "compute": scores["compute_ms"]}
        kw = {"min_score": live.min_score, "cam_labels": live.cam_labels, "second_pass": live.second_pass}
        if evidence != "none" and scores["safety"] is not None:
            out = await asyncio.to_thread(self.engine.finish, frame, scores, evidence, **kw)
        else:
            out = self.engine.finish(frame, scores, "none", **kw)
        timings.update(out.pop("_timings"))
        return {**out, "timings_ms": {k: round(v, 3) for k, v in timings.items()}}

    async def classify_regions(self, frame: np.ndarray | EncodedImage, boxes: list[list[float]],
                               model: str | None = None) -> list[list[dict[str, Any]]]:
        """The detection stage's second pass: each box's crop classified as a frame (one forward pass).

        Args:
            frame: The frame.
            boxes: ``[x0, y0, x1, y1]`` per window, in the frame's pixels.
            model: The safety version a request pinned (default: the served one).
        """
        safety = await asyncio.to_thread(self.engine.pinned, model) if model else None
        return await asyncio.to_thread(self.engine.classify_regions, frame, boxes, self.live.min_score, safety)

    def _moderate_pinned(self, frame: np.ndarray | EncodedImage, evidence: str, safety: Any,
                         live: ModerationConfig, t0: float) -> dict[str, Any]:
        """A frame for a version other than the served one: alone, outside the batches of the served one."""
        out = self.engine.moderate(frame, evidence, min_score=live.min_score, cam_labels=live.cam_labels,
                                   second_pass=live.second_pass, safety=safety)
        timings = out.pop("_timings")
        timings["classify"] = (time.perf_counter() - t0) * 1000 - timings.get("decode", 0.0)
        return {**out, "timings_ms": {k: round(v, 3) for k, v in timings.items()}}


def bind_moderation(args: ModerationArgs | dict | None = None):
    """The moderation deployment, bound (for composition into the gateway)."""
    a = args if isinstance(args, ModerationArgs) else ModerationArgs.model_validate(args or {})
    return Moderation.options(**a.deploy.to_options(), user_config=a.live.model_dump()).bind(a)


def build_app(args: ModerationArgs | dict | None = None):
    """Moderation alone (used through a handle)."""
    return bind_moderation(args)
