"""Deadline-aware admission: answer a fast 503 instead of an answer that would come too late.

A platform that samples frames would rather drop a frame at once than wait 50 s for it. Each
route class (``analyze``, ``ocr``, ``moderate``, ``quality``, ``batch``…) has a deadline. Before a
request starts, the gateway estimates how long it would take:

    expected = (in flight + this request's images) / busy throughput

where *busy throughput* is the rate at which the route completed images while it had work,
with completions and busy time both decayed over a half-life (Little's law on the recent past).
Busy time, not wall time, is the denominator, so a quiet route (one request every few seconds) is
not mistaken for a slow one. If ``expected`` passes the deadline, the request is refused with a
503 and a ``Retry-After`` of the excess. Until a route has a few recent completions it admits
everything, unless it has work in flight and a few completions in its history: a slow route under
load (fewer completions per half-life than the minimum) is judged too.

The estimate is per gateway replica: each replica sees its own share of the traffic.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from livelens.errors import OverloadedError

#: Completions a route needs before its estimate is trusted.
MIN_COMPLETIONS = 4.0
#: Half-life (s) of the completions and busy time the estimate is made from.
HALF_LIFE_S = 10.0


@dataclass
class _Route:
    in_flight: float = 0.0
    completions: float = 0.0
    busy_s: float = 0.0
    updated: float = 0.0
    busy_since: float | None = None
    seen: float = 0.0  # completions ever, undecayed: whether the estimate is trusted yet


@dataclass
class Admission:
    """Per-route-class deadlines and the estimate they are checked against.

    Args:
        deadlines_s: Seconds per route class; a class without one is always admitted.
        half_life_s: See :data:`HALF_LIFE_S`.
        min_completions: See :data:`MIN_COMPLETIONS`.
        clock: Monotonic seconds (tests pass a fake).
    """

    deadlines_s: dict[str, float] = field(default_factory=dict)
    half_life_s: float = HALF_LIFE_S
    min_completions: float = MIN_COMPLETIONS
    clock: Callable[[], float] = time.monotonic
    _routes: dict[str, _Route] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _decay(self, r: _Route, now: float) -> None:
        if r.updated:
            k = 0.5 ** ((now - r.updated) / self.half_life_s)
            r.completions *= k
            r.busy_s *= k
        if r.busy_since is not None:  # busy time since the last update, added after the decay like a completion
            r.busy_s += now - r.busy_since
            r.busy_since = now
        r.updated = now

    def expected_s(self, route: str, n: float = 1.0) -> float | None:
        """Seconds a request of ``n`` images would take now, or None while the route has too few completions."""
        with self._lock:
            r = self._routes.setdefault(route, _Route())
            self._decay(r, self.clock())
            # A slow route under load (OCR of large frames) can complete fewer than the minimum
            # per half-life, so its decayed count never earned trust and it admitted everything:
            # requests waited minutes. While work is in flight, its history counts instead. An
            # idle route still goes cold, so an old estimate cannot refuse it for good.
            trusted = r.completions >= self.min_completions or (r.seen >= self.min_completions and r.in_flight > 0)
            if not trusted or r.busy_s <= 0 or r.completions <= 0:
                return None
            return (r.in_flight + n) / (r.completions / r.busy_s)

    def admit(self, route: str, n: float = 1.0) -> Ticket:
        """Start a request of ``n`` images on ``route``, or refuse it.

        Raises:
            OverloadedError: The expected time passes the route's deadline (503, ``retry_after_s`` set).
        """
        deadline = self.deadlines_s.get(route)
        if deadline is not None:
            expected = self.expected_s(route, n)
            if expected is not None and expected > deadline:
                err = OverloadedError(f"{route}: expected {expected:.1f} s in the queue, past its {deadline:g} s "
                                      f"deadline; retry later")
                err.retry_after_s = max(1, math.ceil(expected - deadline))
                raise err
        with self._lock:
            r = self._routes.setdefault(route, _Route())
            now = self.clock()
            self._decay(r, now)
            if r.in_flight <= 0:
                r.busy_since = now
            r.in_flight += n
        return Ticket(self, route, n)

    def _finish(self, route: str, n: float, completed: bool) -> None:
        with self._lock:
            r = self._routes[route]
            self._decay(r, self.clock())
            r.in_flight = max(0.0, r.in_flight - n)
            if completed:
                r.completions += n
                r.seen += n
            if r.in_flight <= 0:
                r.busy_since = None

    def snapshot(self) -> dict[str, dict[str, float | None]]:
        """Per route: in flight, busy throughput (images/s) and deadline, for /healthz."""
        out: dict[str, dict[str, float | None]] = {}
        with self._lock:
            now = self.clock()
            for name, r in self._routes.items():
                self._decay(r, now)
                rate = r.completions / r.busy_s if r.busy_s > 0 and r.seen >= self.min_completions else None
                out[name] = {"in_flight": r.in_flight, "images_per_s": None if rate is None else round(rate, 3),
                             "deadline_s": self.deadlines_s.get(name)}
        return out


@dataclass
class Ticket:
    """An admitted request; :meth:`done` once it is answered (a context manager does it)."""

    admission: Admission
    route: str
    n: float
    _open: bool = True

    def done(self, completed: bool = True) -> None:
        """Release the request; ``completed=False`` (an error) leaves it out of the throughput."""
        if self._open:
            self._open = False
            self.admission._finish(self.route, self.n, completed)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.done(completed=exc_type is None)
