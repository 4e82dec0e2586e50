"""Frozen-stream detection from consecutive frames of one stream.

The state is a tiny grayscale thumbnail of the last frame that changed plus counters, so the
stream store can persist it as JSON between requests (``to_dict``/``from_dict``).
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from livelens.errors import InvalidArgumentError
from livelens.quality.measures import luminance, to_rgb

THUMB = (32, 18)  # (width, height): 16:9; codec noise averages out, real motion does not.


@dataclass
class FrozenDetector:
    """Flags a stream whose picture stopped changing.

    Args:
        diff_threshold: Mean absolute thumbnail difference (0–255) below which two frames are
            the same picture. Re-encoding a frozen frame moves the thumbnail by well under 1;
            a talking streamer moves it by several.
        min_seconds: Seconds without change before the stream counts as frozen.
        min_frames: Consecutive unchanged frames required as well, so two samples a minute
            apart are not called frozen.
    """

    diff_threshold: float = 1.0
    min_seconds: float = 3.0
    min_frames: int = 3
    last_thumb: np.ndarray | None = field(default=None, repr=False)
    last_change_ts: float | None = None
    last_ts: float | None = None
    still_frames: int = 0

    def update(self, frame: Any, ts: float | None = None) -> dict[str, Any]:
        """Feed the next frame of the stream.

        Args:
            frame: The frame (anything :func:`livelens.quality.measures.to_rgb` accepts).
            ts: Its timestamp in seconds (wall clock; default now). Out-of-order timestamps are
                treated as "now" for the elapsed time so the counters never go negative.

        Returns:
            ``frozen`` (bool), ``still_frames`` (consecutive unchanged frames after the last
            change), ``still_seconds`` and ``diff`` (the thumbnail difference to the previous frame).
        """
        now = time.time() if ts is None else float(ts)
        if self.last_ts is not None and now < self.last_ts:
            now = self.last_ts
        thumb = cv2.resize(luminance(to_rgb(frame)), THUMB, interpolation=cv2.INTER_AREA).astype(np.float32)
        if self.last_thumb is None:
            diff = float("inf")
        else:
            diff = float(np.abs(thumb - self.last_thumb).mean())
        if diff < self.diff_threshold:
            self.still_frames += 1
        else:
            self.still_frames = 0
            self.last_change_ts = now
            # Keep the thumbnail of the last *change*, so a slow drift accumulates and resets.
            self.last_thumb = thumb
        self.last_ts = now
        still_seconds = now - (self.last_change_ts if self.last_change_ts is not None else now)
        frozen = self.still_frames >= self.min_frames and still_seconds >= self.min_seconds
        return {
            "frozen": bool(frozen),
            "still_frames": int(self.still_frames),
            "still_seconds": round(float(still_seconds), 3),
            "diff": None if diff == float("inf") else round(diff, 4),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (the thumbnail as base64 uint8)."""
        thumb = None
        if self.last_thumb is not None:
            thumb = base64.b64encode(np.clip(self.last_thumb + 0.5, 0, 255).astype(np.uint8).tobytes()).decode()
        return {
            "diff_threshold": self.diff_threshold,
            "min_seconds": self.min_seconds,
            "min_frames": self.min_frames,
            "thumb": thumb,
            "last_change_ts": self.last_change_ts,
            "last_ts": self.last_ts,
            "still_frames": self.still_frames,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> FrozenDetector:
        """Rebuild a detector from :meth:`to_dict` output.

        Raises:
            InvalidArgumentError: The state is malformed.
        """
        try:
            det = cls(
                diff_threshold=float(state.get("diff_threshold", 1.0)),
                min_seconds=float(state.get("min_seconds", 3.0)),
                min_frames=int(state.get("min_frames", 3)),
                last_change_ts=None if state.get("last_change_ts") is None else float(state["last_change_ts"]),
                last_ts=None if state.get("last_ts") is None else float(state["last_ts"]),
                still_frames=int(state.get("still_frames", 0)),
            )
            if state.get("thumb"):
                raw = np.frombuffer(base64.b64decode(state["thumb"]), np.uint8)
                det.last_thumb = raw.reshape(THUMB[1], THUMB[0]).astype(np.float32)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise InvalidArgumentError(f"bad FrozenDetector state: {exc}") from exc
        return det
