"""Per-stream state behind the gateway's /v1/streams routes.

One replica owns the SQLite file (``max_replicas=1``): SQLite is a local-disk store, and a
single writer keeps each stream's window consistent. The state is written after every frame and
read back on start, so killing the replica loses nothing. For several replicas, plug in a shared
:class:`~livelens.serving.streams.StreamStore`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from livelens.serving.envelope import quiet_expected_errors
from livelens.serving.heap import start_heap_trimmer
from serve_apps.common import Args, DeployOptions

logger = logging.getLogger(__name__)


def _focus_default() -> float:
    from livelens.quality.focus import DEFAULT_THRESHOLD

    return DEFAULT_THRESHOLD


def _cut_default() -> float:
    from livelens.quality.focus import DEFAULT_CUT_DIFF

    return DEFAULT_CUT_DIFF


def _exposure_default(name: str) -> float:
    from livelens.quality import exposure

    return getattr(exposure, name)


class StreamsConfig(BaseModel):
    """Streams knobs that change without a restart (``user_config``): the focus and exposure trackers'.

    Attributes:
        focus_threshold: Drop of a frame's spectral tilt against the stream's recent frames that
            calls focus lost (:class:`livelens.quality.focus.FocusTracker`; the default is fitted
            on the real-photo set, docs/quality.md).
        focus_history: Recent in-focus frames that make a stream's focus reference.
        focus_relearn_frames: Lost frames in a row after which the blurred picture is the stream's
            new reference.
        focus_cut_diff: Thumbnail change from the previous frame that makes a cut to another scene,
            which starts a new reference (0: no cut detection).
        exposure_dark_gain: Gain against the stream's last normal frame at or under which a frame
            is darker than its stream (:class:`livelens.quality.exposure.ExposureTracker`).
        exposure_bright_gain: Gain at or over which it is brighter.
        exposure_min_agreement: Share of pixels that must agree on one gain; fewer is a cut.
        exposure_relearn_frames: Changed frames in a row after which the new exposure is the
            stream's reference.
    """

    model_config = ConfigDict(extra="forbid")
    focus_threshold: float = Field(default_factory=_focus_default, gt=0, le=10)
    focus_history: int = Field(8, ge=1, le=64)
    focus_relearn_frames: int = Field(20, ge=1, le=100_000)
    focus_cut_diff: float = Field(default_factory=_cut_default, ge=0, le=255)
    exposure_dark_gain: float = Field(default_factory=lambda: _exposure_default("DEFAULT_DARK_GAIN"), gt=0, lt=1)
    exposure_bright_gain: float = Field(default_factory=lambda: _exposure_default("DEFAULT_BRIGHT_GAIN"), gt=1, le=100)
    exposure_min_agreement: float = Field(default_factory=lambda: _exposure_default("DEFAULT_MIN_AGREEMENT"),
                                          gt=0, le=1)
    exposure_relearn_frames: int = Field(20, ge=1, le=100_000)


class StreamsArgs(Args):
    """Streams settings.

    Attributes:
        db_path: The SQLite file.
        window: n of the k-of-n escalation rule.
        k: k of the k-of-n escalation rule.
        base_interval_s: Suggested sampling interval of a quiet stream.
        min_interval_s: Suggested interval at the highest risk.
        max_evidence: Evidence bundles kept per stream.
        thumb_side: Long side of the JPEG thumbnail kept as evidence.
        live: The starting :class:`StreamsConfig` (Serve's ``user_config`` replaces it live).
    """

    model_config = ConfigDict(extra="forbid")
    db_path: str = "runs/streams.sqlite"
    window: int = Field(10, ge=1)
    k: int = Field(3, ge=1)
    base_interval_s: float = Field(10.0, gt=0)
    min_interval_s: float = Field(1.0, gt=0)
    max_evidence: int = Field(5, ge=1)
    thumb_side: int = Field(320, ge=32)
    live: StreamsConfig = Field(default_factory=lambda: StreamsConfig())
    deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.1, max_ongoing_requests=16))


@serve.deployment
class Streams:
    """Folds frame verdicts into persisted stream state."""

    def __init__(self, args: StreamsArgs):
        quiet_expected_errors()  # a client's 4xx: one INFO line in this replica's log, no traceback
        start_heap_trimmer()  # large images leave the heap at its peak otherwise
        from livelens.serving.streams import SqliteStreamStore, StreamPolicy

        self.args = args
        a = self.args
        self.policy = StreamPolicy(window=a.window, k=a.k, base_interval_s=a.base_interval_s,
                                   min_interval_s=a.min_interval_s, max_evidence=a.max_evidence)
        self.store = SqliteStreamStore(a.db_path)
        self.live = a.live
        # Per-stream locks: frames of one stream are folded in order, different streams in parallel.
        self._locks: dict[str, asyncio.Lock] = {}

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a new ``user_config`` (:class:`StreamsConfig`); the next frame of every stream uses it."""
        from livelens.errors import ConfigError

        try:
            self.live = StreamsConfig.model_validate(config or {})
        except ValueError as exc:
            raise ConfigError(f"streams user_config: {exc}") from None

    def check_health(self) -> None:
        # A store that cannot be read means lost state: let Serve restart the replica.
        self.store.load("__health__")

    def _thumb(self, image) -> str:
        from livelens.imageio import thumbnail_jpeg

        return base64.b64encode(thumbnail_jpeg(image, self.args.thumb_side, quality=80)).decode()

    def _ingest(self, stream_id: str, image, result: dict[str, Any], ts: float | None) -> dict[str, Any]:
        from livelens.errors import InvalidArgumentError
        from livelens.imageio import as_rgb
        from livelens.quality import LABELS, FrozenDetector
        from livelens.quality.exposure import ExposureTracker
        from livelens.quality.focus import FocusTracker
        from livelens.serving.streams import StreamState, check_stream_id, update_state

        check_stream_id(stream_id)
        image = as_rgb(image)
        state = self.store.load(stream_id) or StreamState(stream_id, next_interval_s=self.policy.base_interval_s)
        live = self.live
        settings = {"threshold": live.focus_threshold, "history": live.focus_history,
                    "relearn_frames": live.focus_relearn_frames, "cut_diff": live.focus_cut_diff}
        exposure_settings = {"dark_gain": live.exposure_dark_gain, "bright_gain": live.exposure_bright_gain,
                             "min_agreement": live.exposure_min_agreement,
                             "relearn_frames": live.exposure_relearn_frames}
        # A stored state that cannot be read (another version's, or a damaged row) is the store's
        # fault, not the frame's: answering every later frame of the stream with an error would
        # lock it out for good. Start that detector afresh and say so in the answer.
        frozen_reset = focus_reset = exposure_reset = False
        try:
            det = FrozenDetector.from_dict(state.frozen_state) if state.frozen_state else FrozenDetector()
        except InvalidArgumentError as exc:
            logger.warning("stream %s: unreadable frozen state, starting afresh: %s", stream_id, exc)
            det, frozen_reset = FrozenDetector(), True
        try:
            tracker = FocusTracker.from_dict(state.focus_state or {}, **settings)
        except InvalidArgumentError as exc:
            logger.warning("stream %s: unreadable focus state, starting afresh: %s", stream_id, exc)
            tracker, focus_reset = FocusTracker(**settings), True
        try:
            exp_tracker = ExposureTracker.from_dict(state.exposure_state or {}, **exposure_settings)
        except InvalidArgumentError as exc:
            logger.warning("stream %s: unreadable exposure state, starting afresh: %s", stream_id, exc)
            exp_tracker, exposure_reset = ExposureTracker(**exposure_settings), True
        frozen = det.update(image, ts) | ({"state_reset": True} if frozen_reset else {})
        state.frozen_state, state.frozen = det.to_dict(), frozen["frozen"]
        focus = tracker.update(image) | ({"state_reset": True} if focus_reset else {})
        state.focus_state, state.focus_lost = tracker.to_dict(), focus["lost"]
        exposure = exp_tracker.update(image) | ({"state_reset": True} if exposure_reset else {})
        state.exposure_state, state.exposure_change = exp_tracker.to_dict(), exposure["change"]
        state, risky = update_state(state, result, self.policy, ts)
        if state.frozen:
            state.frames[-1]["labels"].append(LABELS["frozen"])
        # Blurrier than this stream's own recent frames: quality_blur, even where the frame alone
        # (a soft scene) does not say so.
        if state.focus_lost and LABELS["blur"] not in state.frames[-1]["labels"]:
            state.frames[-1]["labels"].append(LABELS["blur"])
        # Darker or brighter than this stream's last normal frame: quality_dark or quality_bright,
        # even where the frame alone (a dim room, a pale wall) measures as an ordinary exposure.
        if state.exposure_change and LABELS[state.exposure_change] not in state.frames[-1]["labels"]:
            state.frames[-1]["labels"].append(LABELS[state.exposure_change])
        self.store.save(state)
        if risky:
            bundle = {
                "ts": state.updated_at,
                "frame_index": state.frame_count,
                "thumbnail_jpeg_b64": self._thumb(image),
                "labels": [lab for lab in result.get("labels", []) if lab.get("decision") != "pass"],
                "ocr_text": [ln.get("text") for ln in (result.get("ocr") or {}).get("lines", [])],
                "entities": (result.get("ocr") or {}).get("entities", []),
                "heatmaps": (result.get("moderation") or {}).get("heatmaps", []),
                "models": result.get("models", []),
            }
            self.store.add_evidence(stream_id, bundle, keep=self.policy.max_evidence)
        return self._public(state, frozen, focus, exposure)

    def _public(self, state, frozen: dict | None = None, focus: dict | None = None,
                exposure: dict | None = None) -> dict[str, Any]:
        return {
            "stream_id": state.stream_id,
            "frame_count": state.frame_count,
            "escalated": state.escalated,
            "escalated_at": state.escalated_at,
            "escalation_reason": state.escalation_reason,
            "window": state.frames,
            "policy": {"k": self.policy.k, "n": self.policy.window},
            "next_interval_s": state.next_interval_s,
            "frozen": frozen if frozen is not None else {"frozen": state.frozen},
            "focus": focus if focus is not None else {"lost": state.focus_lost},
            "exposure": exposure if exposure is not None else {"change": state.exposure_change},
        }

    async def ingest(self, stream_id: str, image, result: dict[str, Any], ts: float | None = None) -> dict[str, Any]:
        """Add one analysed frame; returns the stream's verdict after it."""
        from livelens.serving.streams import check_ts

        ts = check_ts(ts)
        lock = self._locks.setdefault(stream_id, asyncio.Lock())
        async with lock:
            return await asyncio.to_thread(self._ingest, stream_id, image, result, ts)

    def state(self, stream_id: str, evidence: int = 5) -> dict[str, Any]:
        """A stream's state with its newest evidence bundles."""
        from livelens.errors import ModelNotFoundError
        from livelens.serving.streams import check_stream_id

        check_stream_id(stream_id)
        st = self.store.load(stream_id)
        if st is None:
            err = ModelNotFoundError(f"no frames seen for stream {stream_id!r}", code="stream_not_found")
            raise err
        return {**self._public(st), "evidence": self.store.evidence(stream_id, evidence),
                "served_at": time.time()}


def bind_streams(args: StreamsArgs | dict | None = None):
    """The streams deployment, bound (for composition into the gateway)."""
    a = args if isinstance(args, StreamsArgs) else StreamsArgs.model_validate(args or {})
    # One replica owns the SQLite file (module docstring).
    return Streams.options(**a.deploy.to_options(single_replica=True), user_config=a.live.model_dump()).bind(a)


def build_app(args: StreamsArgs | dict | None = None):
    """Streams alone (used through a handle)."""
    return bind_streams(args)
