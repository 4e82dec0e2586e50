"""Exposure changed in a stream (livelens.quality.exposure) on real photos, and its evaluation."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from skimage import data

from livelens.errors import InvalidArgumentError, InvalidImageError
from livelens.imageio import load_image
from livelens.quality import distort as D
from livelens.quality import exposure_eval as E
from livelens.quality import realset as R
from livelens.quality.exposure import ExposureTracker


def _frame(name: str) -> np.ndarray:
    return R.base_frame(getattr(data, name)(), f"skimage/{name}", "centre")


def _after(frame: np.ndarray, nxt: np.ndarray, **settings) -> dict:
    """The answer for ``nxt`` in a stream whose previous frame was ``frame`` (state through JSON)."""
    tr = ExposureTracker(**settings)
    assert tr.update(frame)["change"] is None
    return ExposureTracker.from_dict(json.loads(json.dumps(tr.to_dict())), **settings).update(nxt)


def test_the_mildest_darkening_is_measured_as_the_gain_every_pixel_went_through():
    """The set's level 1 (×0.45) on the astronaut, against the stream's previous frame; the frame's
    own darkest window, a hard negative for the per-frame flag, is no change for its stream."""
    frame = _frame("astronaut")
    dim = D.exposure(frame, R.LEVELS["dark"][0])
    out = _after(frame, dim)
    assert out["change"] == "dark" and abs(out["gain"] - 0.45) < 0.03 and out["agreement"] > 0.9, out
    darkest = R.base_frame(data.astronaut(), "skimage/astronaut", "dark_35")
    out = _after(darkest, D.jpeg(darkest, 75))
    assert out["change"] is None and abs(out["gain"] - 1) < 0.05, out


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_each_level_is_found_and_the_gain_follows_it(name):
    """Darker levels give lower gains, brighter ones higher, every level is called, and the set's
    benign changes, blur and occluders are not."""
    frame = _frame(name)
    dark = [_after(frame, D.exposure(frame, g)) for g in R.LEVELS["dark"]]
    assert all(o["change"] == "dark" for o in dark), dark
    gains = [o["gain"] for o in dark]
    assert gains == sorted(gains, reverse=True), gains
    if R.distortable("bright", frame):
        bright = [_after(frame, D.exposure(frame, g)) for g in R.LEVELS["bright"]]
        assert all(o["change"] == "bright" for o in bright), bright
        # Measured while unclipped pixels remain; a frame clipped nearly everywhere gives a lower
        # bound, still beyond the threshold.
        gains = [o["gain"] for o in bright]
        assert gains[:3] == sorted(gains[:3]) and min(gains) >= 1.6, gains
    px = max(frame.shape[1] / R.FRAME[0], R.MIN_BLUR_SCALE)
    for f in (D.exposure(frame, 0.85), D.exposure(frame, 1.15), D.jpeg(frame, 60), D.gaussian_noise(frame, 3.0, 1),
              D.gaussian_blur(frame, 6.0 * px), D.motion_blur(frame, 30, 20.0),
              D.plant_occluder(frame, 0.2, "block", seed=3)[0], D.plant_occluder(frame, 0.2, "hand", seed=4)[0]):
        out = _after(frame, f)
        assert out["change"] is None and not out["cut"], out


def test_a_cut_to_another_scene_or_to_a_dark_one_is_not_an_exposure_change(shared_data):
    """Another photo, a flat texture after another, and a mostly black frame with a little picture
    in it: no one gain explains any, so none is called a change; the stream starts afresh."""
    astro = _frame("astronaut")
    coffee = cv2.resize(_frame("coffee"), astro.shape[1::-1], interpolation=cv2.INTER_AREA)  # one stream, one size
    out = _after(astro, coffee)
    assert out["cut"] and out["change"] is None, out
    # The moon's surface, then a page of dense text: the ratios crowd around one value (×1.6, and
    # 90 % of pixels agree on it), but the pattern does not carry over, so it is a cut.
    moon = R.base_frame(np.dstack([data.moon()] * 3), "skimage/moon", "centre")
    page = R.base_frame(load_image(shared_data / "ocr_demo" / "demo_densetext_det.jpg"), "page", "centre")
    out = _after(E.stream_frame(moon, (480, 270)), E.stream_frame(page, (480, 270)))
    assert out["cut"] and out["change"] is None, out
    night = np.zeros_like(astro)
    night[200:300, 300:420] = coffee[200:300, 300:420]
    out = _after(astro, night)
    assert out["change"] is None, out


def test_a_panning_stream_stays_dark_through_its_spell_and_comes_back_clean():
    """A camera pans across the photo; ten frames in the middle are darkened, then brightened in a
    second stream: every changed frame is called, no clean one, through JSON state."""
    rgb = data.astronaut()
    for change, level in (("dark", 1), ("dark", 5), ("bright", 1), ("bright", 5)):
        rows = E.pan_stream("skimage/astronaut", rgb, change, level)
        called = [r["called"] for r in rows]
        assert called == [change if r["part"] == "changed" else None for r in rows], (change, level, called)


def test_a_stream_that_stays_dark_becomes_its_own_normal_and_black_frames_are_no_change():
    frame = _frame("coffee")
    tr = ExposureTracker(relearn_frames=3)
    tr.update(frame)
    dim = D.exposure(frame, 0.4)
    assert [tr.update(dim)["change"] for _ in range(4)] == ["dark", "dark", None, None]
    # The lights coming back restore an ordinary exposure: brightening an under-exposed picture is
    # no defect (the real-photo set labels it so), and the stream's earlier normal is back.
    back = tr.update(frame)
    assert back["change"] is None and back["gain"] > 2, back
    tr = ExposureTracker()
    tr.update(frame)
    assert tr.update(np.zeros_like(frame))["change"] is None  # black is the frozen/black detectors' job
    back = tr.update(frame)
    assert back["change"] is None and back["gain"] is None, back


def test_bad_frames_and_bad_state_get_typed_errors():
    tr = ExposureTracker()
    with pytest.raises(InvalidImageError):
        tr.update(b"not an image")
    assert tr.update(np.zeros((1, 1, 3), np.uint8))["change"] is None  # a 1x1 probe: no verdict, no error
    assert tr.update(np.full((1, 1, 3), 200, np.uint8))["change"] is None
    good = ExposureTracker()
    good.update(_frame("coffee"))
    state = good.to_dict()
    assert ExposureTracker.from_dict(json.loads(json.dumps(state))).to_dict() == state
    for bad in ({"reference": [[1.0, 2.0]]}, {**state, "white": [10**6]}, {**state, "white": ["x"]}, {"size": 3},
                {"changed_frames": "many"}):
        with pytest.raises(InvalidArgumentError):
            ExposureTracker.from_dict(bad)
    with pytest.raises(InvalidArgumentError):
        ExposureTracker(dark_gain=1.2)


def test_the_evaluation_scores_held_out_photos_and_the_shipped_gains_hold_on_them():
    """The evaluation on a few photos: its per-level rows, the fitted gains between the benign
    changes and the mildest levels, and the tracker's own answers at the shipped gains."""
    result = E.run(seeds=(0,), max_photos=6, classical=False, fresh=False, pans=False)
    s = result["seeds"]["0"]
    assert set(s["test_photos"]).isdisjoint(s["train_photos"])
    for change, benign, mild in (("dark", 0.85, 0.45), ("bright", 1.15, 1.8)):
        fitted = result["all_photos_gain"][change]
        assert min(benign, mild) < fitted < max(benign, mild), (change, fitted)
        shipped = s[change]["shipped"]
        assert shipped["all"]["n"] > 0  # both changes have held-out positives in these six photos
        assert shipped["all"]["recall"] == 1.0 and shipped["negatives"]["false_alarms"] == 0, shipped
    assert result["cuts"]["called"] == 0 and result["cuts"]["n"] == 30
    assert "| 1 |" in E.to_markdown(result)


def test_a_moving_camera_stays_dark_through_its_spell_and_its_recovery_after_a_cut_is_no_change():
    """On a real video (Label Studio's sample clip, through the Streams deployment's code), the
    camera moves so far between snapshots that the last normal frame is soon left behind: the gain
    is chained through the last dark frame. A spell that starts after a cut makes a dark frame the
    stream's normal, and the picture's recovery after it is no bright change."""
    from livelens.quality import video_eval as V
    from livelens.quality.exposure import BRIGHT_FROM_LUMA, DARK_FROM_LUMA, FROM_LUMA_MAX

    # The tracker's ranges hold the set's own (they may only be wider, for the coarser thumbnail).
    assert R.EXPOSURE_RANGE[0] >= DARK_FROM_LUMA and R.BRIGHT_MIN_LUMA >= BRIGHT_FROM_LUMA
    assert R.EXPOSURE_RANGE[1] <= FROM_LUMA_MAX
    rows = V.stream_rows(V.snapshots(5, limit=80), "dark", 1)
    calls = [r["exposure"] for r in rows if r["distorted"]]
    assert len(calls) == 20
    # Snapshots 10-12 and 30-32 are found though the camera has moved on from the last normal
    # frame (13-14 and 33-34 are cuts from the dark frames too: no verdict). Snapshots 50-54 come
    # after the title card: the first is a cut, so the tracker takes it as normal. 70-74 all found.
    assert calls[:3] == calls[5:8] == ["dark"] * 3 and calls[15:] == ["dark"] * 5, calls
    assert calls[10:15] == [None] * 5, calls
    assert not [r for r in rows if not r["spell"] and r["exposure"]]  # 55-69 and the rest: no bright
    scores = V.stream_scores(rows, "dark")
    assert scores == {**scores, "positives": 20, "found": 11, "false_alarms": 0}, scores


def test_state_through_a_dark_spell_and_a_declined_change_survives_json():
    frame = _frame("coffee")
    tr = ExposureTracker()
    tr.update(frame)
    tr.update(D.exposure(frame, 0.4))
    state = json.loads(json.dumps(tr.to_dict()))
    assert state["last"] is not None and 0.35 < state["last_gain"] < 0.45
    again = ExposureTracker.from_dict(state)
    assert again.update(D.exposure(frame, 0.4))["change"] == "dark"
    assert again.update(frame)["change"] is None and "last" not in again.to_dict()  # normal again: no chain
    # A dim stream brightened to an ordinary exposure: declined, and its old normal is kept a while.
    dim = ExposureTracker()
    dim.update(D.exposure(frame, 0.4))
    assert dim.update(frame)["change"] is None
    kept = ExposureTracker.from_dict(json.loads(json.dumps(dim.to_dict())))
    assert kept.previous is not None and kept.update(D.exposure(frame, 0.4))["change"] is None  # a return
    for bad in ({**state, "last_gain": -1}, {**state, "last": [[1.0]]}):
        with pytest.raises(InvalidArgumentError):
            ExposureTracker.from_dict(bad)


def test_thumbnails_are_stored_packed_and_read_back_as_the_list_format_read_them():
    import base64
    import zlib

    frame = _frame("coffee")
    tr = ExposureTracker()
    tr.update(frame)
    tr.update(D.exposure(frame, 0.4))  # a dark spell: the state holds two thumbnails
    state = tr.to_dict()
    listed = {**state, "reference": np.round(tr.reference, 1).tolist(), "last": np.round(tr.last, 1).tolist()}
    # A quarter of the list format's JSON, which the store rewrote after every frame.
    assert len(json.dumps(state)) * 3 < len(json.dumps(listed))
    packed = ExposureTracker.from_dict(json.loads(json.dumps(state)))
    old = ExposureTracker.from_dict(json.loads(json.dumps(listed)))  # a state stored before packing
    for name in ("reference", "last"):
        assert getattr(packed, name).dtype == np.float32
        assert np.array_equal(getattr(packed, name), getattr(old, name))
    nxt = D.exposure(frame, 0.35)
    assert packed.update(nxt) == old.update(nxt) and packed.to_dict() == old.to_dict()
    # Damaged packed thumbnails: not base64, too short, and one that inflates past a thumbnail.
    bomb = base64.b64encode(zlib.compress(bytes(10**7))).decode()
    short = base64.b64encode(zlib.compress(bytes(100))).decode()
    for bad in ("not base64!", short, bomb, base64.b64encode(b"not zlib").decode()):
        with pytest.raises(InvalidArgumentError):
            ExposureTracker.from_dict({**state, "reference": bad})
