"""Per-stream state: a rolling window of frame verdicts, k-of-n escalation, adaptive sampling, evidence.

The big moderation APIs judge single frames. A live stream needs memory: one borderline frame is
noise, three of the last ten is a pattern. The state is small (the window, counters, the frozen
detector's thumbnail) and goes to a pluggable :class:`StreamStore` after every frame, so it survives
a replica restart. :class:`SqliteStreamStore` is the local-disk default.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from livelens.errors import ConfigError, InvalidArgumentError

MAX_STREAM_ID = 128
STREAM_ID_FORBIDDEN = ("/", "\\", "?", "#", "%")
DEFAULT_DB = "runs/streams.sqlite"


@dataclass(frozen=True)
class StreamPolicy:
    """Escalation and sampling policy.

    Attributes:
        window: n, the frames remembered.
        k: Escalate when at least k of the last n frames are risky.
        risky_decisions: Frame decisions that count as risky.
        base_interval_s: Suggested sampling interval of a quiet stream.
        min_interval_s: Interval at the highest risk (sampling rate rises with risk).
        max_evidence: Evidence bundles kept per stream (newest win).
    """

    window: int = 10
    k: int = 3
    risky_decisions: tuple[str, ...] = ("review", "block")
    base_interval_s: float = 10.0
    min_interval_s: float = 1.0
    max_evidence: int = 5

    def __post_init__(self) -> None:
        if not (1 <= self.k <= self.window):
            raise ConfigError(f"stream policy needs 1 <= k <= window, got k={self.k}, window={self.window}")
        if not (0 < self.min_interval_s <= self.base_interval_s):
            raise ConfigError("stream policy needs 0 < min_interval_s <= base_interval_s")


@dataclass
class StreamState:
    """What is remembered about one stream."""

    stream_id: str
    frames: list[dict[str, Any]] = field(default_factory=list)
    frame_count: int = 0
    escalated: bool = False
    escalated_at: float | None = None
    escalation_reason: str = ""
    frozen_state: dict[str, Any] | None = None
    frozen: bool = False
    focus_state: dict[str, Any] | None = None
    focus_lost: bool = False
    exposure_state: dict[str, Any] | None = None
    exposure_change: str | None = None
    next_interval_s: float = 10.0
    updated_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StreamState:
        return cls(**json.loads(text))


class StreamStore(Protocol):
    """Where stream states and evidence bundles live (SQLite here; Redis or a table elsewhere)."""

    def load(self, stream_id: str) -> StreamState | None: ...

    def save(self, state: StreamState) -> None: ...

    def add_evidence(self, stream_id: str, bundle: dict[str, Any], keep: int) -> None: ...

    def evidence(self, stream_id: str, limit: int = 10) -> list[dict[str, Any]]: ...


class SqliteStreamStore:
    """A StreamStore in one SQLite file (WAL mode: readers never block the writer).

    Args:
        path: The database file; its folder is created.
    """

    def __init__(self, path: str | Path = DEFAULT_DB):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=10)
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS streams (id TEXT PRIMARY KEY, state TEXT NOT NULL, "
                             "updated_at REAL NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS evidence (id TEXT NOT NULL, ts REAL NOT NULL, "
                             "bundle TEXT NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS evidence_id ON evidence (id, ts)")

    def load(self, stream_id: str) -> StreamState | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM streams WHERE id = ?", (stream_id,)).fetchone()
        return StreamState.from_json(row[0]) if row else None

    def save(self, state: StreamState) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO streams (id, state, updated_at) VALUES (?, ?, ?)",
                             (state.stream_id, state.to_json(), state.updated_at))

    def add_evidence(self, stream_id: str, bundle: dict[str, Any], keep: int) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT INTO evidence (id, ts, bundle) VALUES (?, ?, ?)",
                             (stream_id, float(bundle.get("ts", time.time())), json.dumps(bundle)))
            # Bounded per stream: evidence is for a reviewer's next look, not an archive.
            self._db.execute("DELETE FROM evidence WHERE id = ? AND rowid NOT IN (SELECT rowid FROM evidence "
                             "WHERE id = ? ORDER BY ts DESC, rowid DESC LIMIT ?)", (stream_id, stream_id, keep))

    def evidence(self, stream_id: str, limit: int = 10) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT bundle FROM evidence WHERE id = ? ORDER BY ts DESC, rowid DESC LIMIT ?",
                                    (stream_id, limit)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


#: How far in the future a frame's ``ts`` may lie (clock skew between a platform and the service).
MAX_TS_AHEAD_S = 24 * 3600.0


def check_ts(ts: object, now: float | None = None) -> float | None:
    """A frame's capture time: None, or finite seconds since the epoch, not more than a day ahead.

    ``inf`` once poisoned a stream for good (every later frame and GET answered 500) and ``nan``
    broke the SQLite write; both are refused here, before anything is stored.

    Raises:
        InvalidArgumentError: Not a number, not finite, negative, or too far ahead.
    """
    if ts is None or ts == "":
        return None
    try:
        value = float(ts)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"ts must be seconds since the epoch, got {str(ts)[:40]!r}") from None
    now = time.time() if now is None else now
    if not math.isfinite(value) or value < 0 or value > now + MAX_TS_AHEAD_S:
        raise InvalidArgumentError(f"ts must be finite seconds since the epoch, at most {MAX_TS_AHEAD_S:g} s "
                                   f"ahead of the service's clock, got {str(ts)[:40]!r}")
    return value


def check_stream_id(stream_id: str) -> str:
    """Stream ids are opaque but bounded and printable (they end up in logs and file names).

    Characters with a meaning in a URL path (``/ \\ ? # %``) and the ids ``.`` and ``..`` are
    refused: a client building ``/v1/streams/{id}`` from ``demo/../x`` would otherwise post to ``x``.
    """
    if not stream_id or len(stream_id) > MAX_STREAM_ID or not stream_id.isprintable():
        raise InvalidArgumentError(f"stream id must be 1–{MAX_STREAM_ID} printable characters")
    if stream_id in (".", "..") or any(c in stream_id for c in STREAM_ID_FORBIDDEN) or stream_id != stream_id.strip():
        raise InvalidArgumentError(f"stream id {stream_id[:40]!r} may not be '.' or '..', contain any of "
                                   f"{' '.join(STREAM_ID_FORBIDDEN)}, or start or end with a space")
    return stream_id


def frame_risk(result: dict[str, Any], policy: StreamPolicy) -> tuple[float, str, list[str]]:
    """A frame's risk (0–1), decision and risky label names from an analyze result."""
    labels = [lab for lab in result.get("labels", []) if lab.get("decision") in policy.risky_decisions]
    risk = max((float(lab["score"]) for lab in labels), default=0.0)
    return risk, str(result.get("decision", "pass")), [lab["name"] for lab in labels]


def update_state(state: StreamState, result: dict[str, Any], policy: StreamPolicy,
                 ts: float | None = None) -> tuple[StreamState, bool]:
    """Fold one frame's analysis into the stream state.

    Args:
        state: The stream's state (mutated and returned).
        result: The gateway's analysis of the frame (``labels``, ``decision``).
        policy: Window, k and sampling bounds.
        ts: Frame timestamp in seconds (default now).

    Returns:
        The state, and whether this frame is risky (its evidence is worth keeping).
    """
    ts = time.time() if ts is None else float(ts)
    risk, decision, names = frame_risk(result, policy)
    risky = decision in policy.risky_decisions
    state.frames = [*state.frames, {"ts": ts, "decision": decision, "risk": round(risk, 4), "labels": names,
                                    "risky": risky}][-policy.window:]
    state.frame_count += 1
    hits = sum(f["risky"] for f in state.frames)
    if hits >= policy.k and not state.escalated:
        state.escalated, state.escalated_at = True, ts
        top = sorted({n for f in state.frames for n in f["labels"]})
        state.escalation_reason = f"{hits} of the last {len(state.frames)} frames risky ({', '.join(top)})"
    elif hits == 0 and state.escalated and len(state.frames) >= policy.window:
        # De-escalate only after a whole clean window, so an alert does not flap.
        state.escalated, state.escalation_reason = False, ""
    # Sampling rate rises with risk: the interval shrinks with the window's hit rate and this frame's risk.
    pressure = max(risk, hits / policy.k if policy.k else 0.0, 1.0 if state.escalated else 0.0)
    pressure = min(1.0, pressure)
    span = policy.base_interval_s - policy.min_interval_s
    state.next_interval_s = round(policy.base_interval_s - span * pressure, 3)
    state.updated_at = ts
    return state, risky
