"""Deadline-aware admission (issue 19): the estimate on a fake clock, with answers worked out by hand."""

from __future__ import annotations

import pytest

from livelens.errors import OverloadedError
from livelens.serving.admission import Admission


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def serve_sequential(adm: Admission, clock: Clock, route: str, n: int, seconds: float, gap: float = 0.0) -> None:
    for _ in range(n):
        with adm.admit(route):
            clock.t += seconds
        clock.t += gap


def test_cold_route_admits_until_it_has_completions() -> None:
    clock = Clock()
    adm = Admission({"analyze": 0.001}, clock=clock)
    tickets = [adm.admit("analyze") for _ in range(10)]  # no completions yet: no estimate
    assert adm.expected_s("analyze") is None
    for t in tickets:
        t.done()


def test_refuses_past_the_deadline_with_retry_after() -> None:
    clock = Clock()
    adm = Admission({"analyze": 3.0}, clock=clock, half_life_s=1e9)
    serve_sequential(adm, clock, "analyze", 5, seconds=1.0)  # busy throughput: 1 image/s
    assert adm.expected_s("analyze") == pytest.approx(1.0)
    held = [adm.admit("analyze"), adm.admit("analyze")]  # 2 in flight: the next expects 3 s, at the deadline
    third = adm.admit("analyze")
    with pytest.raises(OverloadedError) as exc:
        adm.admit("analyze")  # 3 in flight: 4 s > 3 s
    assert exc.value.http_status == 503 and exc.value.retry_after_s == 1
    with pytest.raises(OverloadedError) as exc:
        adm.admit("analyze", n=4)  # a batch of 4 images: (3 + 4) / 1 = 7 s
    assert exc.value.retry_after_s == 4
    for t in [*held, third]:
        t.done()
    assert adm.admit("analyze") is not None  # room again
    assert adm.snapshot()["analyze"]["in_flight"] == 1


def test_a_quiet_route_is_not_mistaken_for_a_slow_one() -> None:
    """One request every 10 s taking 0.5 s: throughput over busy time is 2/s, so nothing is refused."""
    clock = Clock()
    adm = Admission({"ocr": 1.0}, clock=clock, half_life_s=120.0)
    serve_sequential(adm, clock, "ocr", 8, seconds=0.5, gap=10.0)
    assert adm.expected_s("ocr") == pytest.approx(0.5, rel=0.01)
    adm.admit("ocr").done()


def test_failures_do_not_count_as_throughput_and_unknown_routes_pass() -> None:
    clock = Clock()
    adm = Admission({"moderate": 1.0}, clock=clock, half_life_s=1e9)
    for _ in range(6):
        with pytest.raises(ValueError), adm.admit("moderate"):
            clock.t += 1.0
            raise ValueError("downstream failed")
    assert adm.expected_s("moderate") is None  # no completions: still cold
    for _ in range(20):
        adm.admit("quality")  # no deadline for this class
    assert adm.snapshot()["quality"]["deadline_s"] is None


def test_estimate_decays_back_to_cold_after_idle() -> None:
    clock = Clock()
    adm = Admission({}, clock=clock, half_life_s=10.0)
    serve_sequential(adm, clock, "analyze", 6, seconds=1.0)
    adm.deadlines_s = {"analyze": 0.5}  # a live change, as reconfigure() makes
    with pytest.raises(OverloadedError):
        adm.admit("analyze")  # 1 s expected, 0.5 s deadline
    clock.t += 200.0  # 20 half-lives idle: the old completions no longer count
    adm.admit("analyze").done()


def test_a_slow_route_under_load_is_judged_by_its_history() -> None:
    """OCR of large frames: one completion every 20 s, fewer than the minimum per half-life. The
    decayed count alone never trusted it, so it admitted every request, and they waited minutes."""
    clock = Clock()
    adm = Admission({"ocr": 10.0}, clock=clock, half_life_s=10.0)
    serve_sequential(adm, clock, "ocr", 5, seconds=20.0)
    assert adm.expected_s("ocr") is None  # idle: cold again, a lone request is admitted
    first = adm.admit("ocr")  # one in flight: 2 × 20 s expected for the next, past 10 s
    with pytest.raises(OverloadedError) as exc:
        adm.admit("ocr")
    assert exc.value.retry_after_s == 30
    first.done()
