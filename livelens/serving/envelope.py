"""Request ids and the one error envelope every failed answer uses.

``{"error": {"type", "code", "message"}, "request_id"}`` for every 4xx/5xx, so clients tell media
errors, argument errors and usage limits apart without parsing messages.
"""

from __future__ import annotations

import logging
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


class ExpectedErrorFilter(logging.Filter):
    """Turn Serve's ERROR-with-traceback for a client's mistake into one INFO line.

    A replica method that raises logs ``Request failed.`` with the whole traceback at ERROR
    (Ray Serve's replica wrapper does it), so every corrupt upload showed as a server error in
    the replica logs. A :class:`~livelens.errors.LivelensError` with a 4xx status is expected:
    it is logged as ``Request failed: <code> (<status>): <message>`` at INFO, without the
    traceback. 5xx errors and every other exception keep Serve's record as it was.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, LivelensError) and 400 <= int(getattr(exc, "http_status", 500)) < 500:
            record.msg, record.args = "Request failed: %s (%s): %s", (exc.code, exc.http_status, str(exc)[:300])
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_errors() -> None:
    """Install :class:`ExpectedErrorFilter` on Ray Serve's logger in this process (once; a replica calls it)."""
    from ray.serve._private.constants import SERVE_LOGGER_NAME

    logger = logging.getLogger(SERVE_LOGGER_NAME)
    if not any(isinstance(f, ExpectedErrorFilter) for f in logger.filters):
        logger.addFilter(ExpectedErrorFilter())
