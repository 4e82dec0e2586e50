"""Focus lost in a stream (livelens.quality.focus) on real photos, and its evaluation."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from skimage import data

from livelens.errors import InvalidArgumentError, InvalidImageError
from livelens.quality import distort as D
from livelens.quality import focus_eval as E
from livelens.quality import realset as R
from livelens.quality.assess import assess
from livelens.quality.focus import DEFAULT_THRESHOLD, FocusTracker, tilts


def _frame(name: str) -> np.ndarray:
    return R.base_frame(getattr(data, name)(), f"skimage/{name}", "centre")


def _stream(frame: np.ndarray) -> FocusTracker:
    """A tracker that has seen the frame and two benign re-encodes of it."""
    tr = FocusTracker()
    for f in (frame, D.jpeg(frame, 75), D.gaussian_noise(frame, 3.0, seed=1)):
        assert not tr.update(f)["lost"]
    return tr


@pytest.mark.parametrize("name", ["brick", "text"])
def test_a_soft_scene_is_in_focus_for_its_stream_and_its_mild_blur_is_lost(name):
    """brick and text are the photos whose clean frames the per-frame blur flags call blurred."""
    frame = _frame(name)
    px = max(frame.shape[1] / R.FRAME[0], R.MIN_BLUR_SCALE)
    tr = _stream(frame)
    state = json.loads(json.dumps(tr.to_dict()))
    for f in (frame, D.jpeg(frame, 60), D.exposure(frame, 0.85)):
        assert not FocusTracker.from_dict(state).update(f)["lost"]
    mild = FocusTracker.from_dict(state).update(D.gaussian_blur(frame, 2.0 * px))
    motion = FocusTracker.from_dict(state).update(D.motion_blur(frame, max(3, round(9 * px)), angle_deg=30.0))
    assert mild["lost"] and mild["drop"] >= DEFAULT_THRESHOLD, mild
    assert motion["lost"], motion


@pytest.mark.parametrize("distortion", ["gaussian_blur", "motion_blur"])
def test_the_drop_rises_with_the_blur_level(distortion):
    """Every level is lost on four photos, and the mean drop rises with the level until it
    saturates: a long motion kernel puts both bands in its sinc tail, where their ratio no longer
    moves, so from level 3 on the mean stays within 0.1 of the highest before it."""
    means = []
    for lv in range(1, 6):
        drops = []
        for name in ("astronaut", "brick", "coffee", "text"):
            rgb = getattr(data, name)()
            item = R.Item(f"skimage/{name}", "centre", distortion, lv)
            state = _stream(R.base_frame(rgb, item.photo, "centre")).to_dict()
            drops.append(FocusTracker.from_dict(state).update(R.render(item, rgb))["drop"])
        assert min(drops) >= DEFAULT_THRESHOLD, (lv, drops)
        means.append(float(np.mean(drops)))
    assert means[0] < means[1] < means[2] and means[2] > means[0] + 0.2, means
    assert all(means[i] > max(means[:i]) - 0.1 for i in range(3, 5)), means


def test_an_occluder_or_a_pan_is_not_lost_focus():
    rgb = data.astronaut()
    frame = R.base_frame(rgb, "skimage/astronaut", "centre")
    state = _stream(frame).to_dict()
    for share in (0.05, 0.12, 0.20):
        for kind in R.OCCLUDERS:
            out = FocusTracker.from_dict(state).update(D.plant_occluder(frame, share, kind, seed=3)[0])
            assert not out["lost"], (share, kind, out)
    pan = np.roll(frame, frame.shape[1] // 5, axis=1)
    assert not FocusTracker.from_dict(state).update(pan)["lost"]


def test_a_stream_that_stays_blurred_becomes_the_new_reference():
    frame = _frame("astronaut")
    tr = FocusTracker(relearn_frames=3)
    tr.update(frame)
    blurred = D.gaussian_blur(frame, 3.0)
    lost = [tr.update(blurred)["lost"] for _ in range(5)]
    assert lost == [True, True, False, False, False]
    # Back in focus: the sharp picture is now sharper than the reference and is not "lost".
    assert not tr.update(frame)["lost"]


def test_a_resolution_switch_starts_a_new_reference():
    frame = _frame("astronaut")
    tr = _stream(frame)
    small = frame[::2, ::2]  # half the size: less high band by itself
    out = tr.update(small)
    assert out == {"lost": False, "drop": None, "cut": False, "reference_frames": 1, "lost_frames": 0}


def test_bad_frames_and_bad_state_get_typed_answers():
    tr = _stream(_frame("astronaut"))
    before = tr.to_dict()
    tiny = tr.update(np.zeros((1, 1, 3), np.uint8))
    assert tiny["lost"] is False and tiny["drop"] is None and "skipped" in tiny
    h, w = _frame("astronaut").shape[:2]
    for flat in (np.zeros((h, w, 3), np.uint8), np.full((h, w, 3), 200, np.uint8)):
        out = tr.update(flat)  # no texture: no verdict, and not a reference either
        assert out["lost"] is False and out["drop"] is None and out["skipped"] == "no texture to measure"
    assert tr.to_dict() == before
    # So the picture coming back after a black spell is not a loss of focus.
    assert tr.update(_frame("astronaut"))["lost"] is False
    with pytest.raises(InvalidImageError):
        tr.update(b"not an image")
    strip = np.random.default_rng(0).integers(0, 255, (64, 16000, 3), dtype=np.uint8)  # 480x2 as measured
    state = tr.to_dict()
    assert tr.update(strip)["skipped"] and tr.to_dict() == state
    for small in (np.zeros((20, 20, 3), np.uint8), strip):
        with pytest.raises(InvalidArgumentError):
            tilts(small)
    with pytest.raises(InvalidArgumentError):
        FocusTracker.from_dict({"refs": [[1.0, 2.0]]})
    with pytest.raises(InvalidArgumentError):
        FocusTracker.from_dict({"refs": [[1.0, 2.0, "x", 4.0]]})
    with pytest.raises(InvalidArgumentError):
        FocusTracker(threshold=0.0)


def test_the_threshold_fit_takes_the_lowest_one_with_the_precision_asked():
    drops = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    positive = np.array([True, True, False, True, True, False])
    assert E.fit_threshold(drops, positive, 0.8) == 0.5  # 4 of 5 above 0.5 are positives
    assert E.fit_threshold(drops, positive, 1.0) == 0.8


def test_the_evaluation_runs_the_tracker_on_one_photo_stream():
    """The figures of docs/quality.md come from these rows: one stream per photo, every blurred
    frame against the clean centre's state, as the streams deployment rebuilds it."""
    rgb = data.coffee()
    rows = E.photo_rows("skimage/coffee", rgb, windows=2, classical=False)
    pos = [r for r in rows if r["positive"]]
    neg = [r for r in rows if not r["positive"]]
    assert len(pos) == 2 * 2 * 5 and len(neg) > 30
    assert all(r["case"] == "within scene" and not r["cut"] and r["drop"] >= DEFAULT_THRESHOLD for r in pos)
    assert not any(r["drop"] is not None and r["drop"] >= DEFAULT_THRESHOLD for r in neg)
    jumps = [r for r in neg if r["case"] == "jump"]
    assert len(jumps) == 1 + len(R.HARD_NEGATIVES) and any(r["cut"] for r in jumps)
    # The classical per-frame flag, the report's baseline, is the one assess() serves.
    frame = R.base_frame(rgb, "skimage/coffee", "centre")
    assert isinstance(assess(frame)["blur"]["flag"], bool)


def test_a_pan_stream_loses_focus_only_while_it_is_blurred():
    """One tracker through a moving stream, its state through JSON between frames: the blurred
    middle is lost, the clean pan before and after it is not (the blur never became a reference)."""
    rows = E.pan_stream("skimage/astronaut", data.astronaut(), "gaussian_blur", 1)
    parts = {p: [r["lost"] for r in rows if r["part"] == p] for p in ("before", "blurred", "after")}
    assert [len(v) for v in parts.values()] == list(E.PAN_PARTS)
    assert all(parts["blurred"]) and not any(parts["before"]) and not any(parts["after"]), parts
    score = E.pan_scores(rows)
    assert score["recall"] == 1.0 and score["precision"] == 1.0 and score["found_at_once"] == 1


def test_a_lower_bitrate_is_not_lost_focus():
    """An encoder that lowers the JPEG quality (to 20) keeps the spectrum's tilt: not a loss of focus."""
    for name in ("astronaut", "coffee", "text"):
        frame = _frame(name)
        state = _stream(frame).to_dict()
        for q in (50, 20):
            out = FocusTracker.from_dict(state).update(D.jpeg(frame, q))
            assert not out["lost"] and out["drop"] < DEFAULT_THRESHOLD / 2, (name, q, out)


def test_a_cut_to_a_softer_scene_starts_a_new_reference_and_is_not_lost():
    """coffee (a sharp still life) then brick (a soft wall): without cut detection the wall reads as
    lost focus; with it, the cut starts the wall's own reference, whose blur is then found. (A cut
    between two grey, low-contrast scenes, text to brick, moves the thumbnail too little to be seen.)"""
    coffee, brick = _frame("coffee"), _frame("brick")
    brick = cv2.resize(brick, (coffee.shape[1], coffee.shape[0]), interpolation=cv2.INTER_AREA)
    state = _stream(coffee).to_dict()
    assert FocusTracker.from_dict(state, cut_diff=0).update(brick)["lost"]
    tr = FocusTracker.from_dict(state)
    out = tr.update(brick)
    assert out["cut"] and not out["lost"] and out["drop"] is None and out["reference_frames"] == 1
    assert not tr.update(D.jpeg(brick, 75))["lost"]
    level_1 = 2.0 * max(brick.shape[1] / R.FRAME[0], R.MIN_BLUR_SCALE)  # σ 2 px at 960 wide
    assert tr.update(D.gaussian_blur(brick, level_1))["lost"]
    with pytest.raises(InvalidArgumentError):
        FocusTracker(cut_diff=-1)
    with pytest.raises(InvalidArgumentError):
        FocusTracker.from_dict({**state, "thumb": [[1, 2], [3, 4]]})


def test_the_evaluation_command_writes_its_report(tmp_path):
    """`make eval-focus` on two photos: per-seed tables, the threshold fit and the cuts."""
    result = E.main(["--max-photos", "2", "--seeds", "0", "--no-classical", "--no-fresh", "--no-pans",
                     "--out", str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    assert "## Seed 0: threshold" in report and "| level | n | tracker P |" in report and "| 1 | " in report
    assert "## Cuts between the set's photos" in report and result["cuts"]["with_detection"]["cuts"] == 2
    assert json.loads((tmp_path / "report.json").read_text())["n_rows"] == result["n_rows"] > 0


def test_focus_features_of_one_frame_fall_with_blur_and_are_defined_on_any_frame():
    """The learned blur flag's per-frame inputs (livelens.quality.flags.features)."""
    from livelens.quality.focus import N_FOCUS_FEATURES, focus_features
    frame = _frame("camera")  # grey, 512×288
    assert frame.ndim == 2
    clean = focus_features(frame)
    blurred = focus_features(D.gaussian_blur(frame, 2.0))
    motion = focus_features(D.motion_blur(frame, 9, angle_deg=0.0))
    assert clean.shape == (N_FOCUS_FEATURES,) and clean[-1] == 1.0 and 0 < clean[-2] <= 1
    assert (blurred[:4] < clean[:4] - 0.3).all(), (clean, blurred)  # every direction's median tilt
    assert clean[6] >= np.median(clean[:4]) and clean[7] <= clean[6]  # the sharpest tile
    assert motion[5] > clean[5] + 0.2, (clean, motion)  # motion blur spreads the directions apart
    # Nothing to measure gives zeros, never an error: the flag model still answers.
    for nothing in (np.zeros((540, 960), np.uint8), np.full((540, 960), 128, np.uint8), frame[:40, :40]):
        assert not focus_features(nothing).any()
