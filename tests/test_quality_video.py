"""The stream checks and the per-frame flags on a real video: Label Studio's sample clip, which the
setup installs (``livelens.quality.video_eval``)."""

from __future__ import annotations

from livelens.quality import video_eval as V


def test_the_clip_is_read_in_place_as_the_sets_frames():
    frames = V.snapshots(300)
    assert [i for i, _ in frames] == [0, 300, 600, 900, 1200]
    assert all(f.shape == (540, 960, 3) and f.dtype.name == "uint8" for _, f in frames)
    assert len(V.snapshots(5, limit=7)) == 7


def test_a_moving_camera_raises_no_stream_check_and_its_blur_spells_are_found():
    """Through the Streams deployment's code: the clean clip (a shaking, panning camera, cuts, an
    animal close to the lens) loses no focus and changes no exposure, and a mild blur spell is
    found on about half of its frames (8 of 15 when this was written: the other frames follow cuts,
    where the tracker starts afresh) with no false alarm."""
    frames = V.snapshots(5, limit=60)
    clean = V.clean_scores(V.stream_rows(frames, "none", 0))
    assert clean["n"] == 60
    assert clean["focus"] == clean["dark"] == clean["bright"] == clean["frozen"] == [], clean
    for distortion in ("gaussian_blur", "motion_blur"):
        s = V.stream_scores(V.stream_rows(frames, distortion, 1), distortion)
        assert s["positives"] == 15 and s["false_alarms"] == 0, s
        assert s["found"] >= 7, s


def test_the_per_frame_flags_answer_the_clips_frames_through_the_quality_engine():
    from livelens.quality.engine import QualityEngine
    from livelens.quality.flag_training import table

    learned = QualityEngine(iqa_ref=None)
    assert learned.flags[0] is not None  # the shipped learned flags
    shot = V.snapshots(600)[1:2]  # a snowy slope, mid-clip
    rows = V.frame_rows(shot, learned, QualityEngine(iqa_ref=None, flags_ref=None))
    t = table(rows, "after")
    assert t["dark"]["all"]["n"] == 5 and t["dark"]["all"]["recall"] == 1.0, t["dark"]
    assert t["occlusion"]["all"]["n"] == 10 and t["occlusion"]["5"]["recall"] == 1.0, t["occlusion"]
    clean = [r for r in rows if r["distortion"] == "none" and r["base"] == "centre"]
    assert len(clean) == 1 and clean[0]["after"] == [], clean
