"""Frozen-stream detection on a real photo: identical, re-encoded and moving frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage import data

from livelens.errors import InvalidArgumentError, InvalidImageError
from livelens.quality import FrozenDetector
from livelens.quality import distort as D


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return data.astronaut()


def test_repeated_reencoded_frame_becomes_frozen_after_min_seconds(frame):
    det = FrozenDetector(min_seconds=2.0, min_frames=3)
    results = [det.update(D.jpeg(frame, 70 + i % 3 * 10), ts=100.0 + i) for i in range(5)]
    assert [r["frozen"] for r in results] == [False, False, False, True, True]
    assert results[-1]["still_frames"] == 4 and results[-1]["still_seconds"] == pytest.approx(4.0)


def test_moving_picture_is_never_frozen(frame):
    det = FrozenDetector(min_seconds=0.5, min_frames=2)
    h, w = frame.shape[:2]
    for i in range(8):
        # A pan of 24 px per frame: the kind of change a live picture has.
        shifted = np.roll(frame, shift=24 * i, axis=1)
        r = det.update(shifted, ts=float(i))
        assert not r["frozen"] and r["still_frames"] == 0, (i, r)
    assert (h, w) == frame.shape[:2]


def test_state_round_trips_through_json_mid_stream(frame):
    det = FrozenDetector(min_seconds=1.0, min_frames=2)
    det.update(frame, ts=0.0)
    det.update(frame, ts=0.5)
    state = json.loads(json.dumps(det.to_dict()))
    restored = FrozenDetector.from_dict(state)
    r = restored.update(frame, ts=1.5)
    assert r["frozen"] and r["still_frames"] == 2
    # A real change resets the restored detector.
    r = restored.update(D.gamma(frame, 0.5), ts=2.0)
    assert not r["frozen"] and r["still_frames"] == 0


def test_bad_state_and_bad_frame_give_typed_errors(frame):
    with pytest.raises(InvalidArgumentError):
        FrozenDetector.from_dict({"thumb": "!!notbase64", "still_frames": 1})
    with pytest.raises(InvalidArgumentError):
        FrozenDetector.from_dict({"still_frames": "many"})
    with pytest.raises(InvalidImageError):
        FrozenDetector().update(b"")


def test_out_of_order_timestamps_never_go_negative(frame):
    det = FrozenDetector()
    det.update(frame, ts=10.0)
    r = det.update(frame, ts=5.0)
    assert r["still_seconds"] >= 0.0
