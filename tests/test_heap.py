"""The replica heap trimmer gives freed memory back to the OS (livelens.serving.heap)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from livelens.serving import heap

# Fragments 200 MB of malloc'd 2 KB blocks (every 64th block stays alive, so glibc cannot shrink
# the heap from the top by itself), then reads RSS before and after one trim.
_PROBE = r"""
import json, sys
from livelens.serving.heap import HeapTrimmer, rss_mb
t = HeapTrimmer(interval_s=3600, min_growth_mb=float(sys.argv[1]))
blocks = [bytearray(2048) for _ in range(100_000)]
kept = blocks[::64]
del blocks
before = rss_mb()
trimmed = t.maybe_trim()
print(json.dumps({"before": before, "after": rss_mb(), "trimmed": trimmed, "released": t.released_mb,
                  "kept": len(kept)}))
"""


def _probe(min_growth_mb: float) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(min_growth_mb)], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_trim_gives_freed_fragmented_heap_back():
    if not heap.HeapTrimmer().available:
        pytest.skip("this C library has no malloc_trim (not glibc)")  # the service then just doesn't trim
    r = _probe(min_growth_mb=32)
    assert r["trimmed"] and r["before"] - r["after"] > 100, r  # ~195 MB of the 200 MB were freed
    assert r["released"] == pytest.approx(r["before"] - r["after"], abs=1)


def test_growth_below_the_threshold_does_not_trim():
    r = _probe(min_growth_mb=10_000)
    assert not r["trimmed"] and r["released"] == 0, r


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setattr(heap, "_PROCESS_TRIMMER", None)
    monkeypatch.setenv(heap.ENV_INTERVAL, "0")
    assert heap.start_heap_trimmer() is None  # off
    for bad in ("-1", "nan", "inf", "soon"):
        monkeypatch.setenv(heap.ENV_INTERVAL, bad)
        with pytest.raises(ValueError):
            heap.start_heap_trimmer()
    monkeypatch.setenv(heap.ENV_INTERVAL, "30")
    t = heap.start_heap_trimmer()
    try:
        if t is not None:  # glibc
            assert t.interval_s == 30 and heap.start_heap_trimmer() is t  # once per process
    finally:
        if t is not None:
            t.stop()


# Frees a 24 MB buffer (glibc then raises its mmap threshold to 24 MB), then allocates, fills and
# frees a second one: with the dynamic threshold it comes from the heap's top and stays resident.
_MMAP_PROBE = r"""
import json, sys
import numpy as np
from livelens.serving.heap import fix_mmap_threshold, rss_mb
fixed = fix_mmap_threshold() if sys.argv[1] == "fix" else None
a = np.ones(24 << 20, np.uint8)
del a
base = rss_mb()
b = np.ones(24 << 20, np.uint8)
del b
print(json.dumps({"fixed": fixed, "kept_mb": rss_mb() - base}))
"""


def test_a_fixed_mmap_threshold_gives_frame_sized_buffers_back_on_free():
    if not heap.HeapTrimmer().available:
        pytest.skip("this C library has no mallopt/malloc_trim (not glibc)")

    def probe(arm: str) -> dict:
        out = subprocess.run([sys.executable, "-c", _MMAP_PROBE, arm], capture_output=True, text=True,
                             timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    dynamic, fixed = probe("dynamic"), probe("fix")
    assert fixed["fixed"] is True and fixed["kept_mb"] < 4, fixed
    assert dynamic["kept_mb"] > 20, dynamic  # why the persons replica sets it: 24 MB stay otherwise
