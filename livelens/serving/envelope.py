"""Request ids and the one error envelope every failed answer uses.

``{"error": {"type", "code", "message"}, "request_id"}`` for every 4xx/5xx, so clients tell media
errors, argument errors and usage limits apart without parsing messages.
"""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from typing import Any

from livelens.errors import LivelensError

REQUEST_ID_HEADER = "X-Request-Id"


def new_request_id() -> str:
    """A short, unique, sortable-enough request id (time prefix helps grepping logs)."""
    return f"req_{int(time.time()):x}{uuid.uuid4().hex[:12]}"


def error_body(err: LivelensError, request_id: str) -> dict[str, Any]:
    """The JSON body of an error answer."""
    return {"error": err.to_dict(), "request_id": request_id}


def error_item(err: BaseException) -> dict[str, Any]:
    """A per-item error inside a batch answer (one bad frame never fails the batch)."""
    if isinstance(err, LivelensError):
        return {"error": err.to_dict(), "status": err.http_status}
    return {"error": {"type": "internal_error", "code": "internal", "message": str(err)[:300]}, "status": 500}


class Timings:
    """Wall-clock milliseconds per named stage of one request."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        """Time a ``with`` block under ``name`` (repeated stages add up)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = round(self.ms.get(name, 0.0) + (time.perf_counter() - t0) * 1000.0, 3)

    def add(self, name: str, ms: float) -> None:
        """Record a stage measured elsewhere (e.g. inside a deployment)."""
        self.ms[name] = round(self.ms.get(name, 0.0) + float(ms), 3)

    def to_dict(self) -> dict[str, float]:
        return dict(self.ms)
