"""Milliseconds per 720p frame for the quality measures and the learned score.

Each figure is also given as a ratio against a baseline measured in the same run: the
classical measures against scikit-image's ``blur_effect`` on the same frame (what a naive
implementation of the blur baseline costs), and the IQA features against ``assess``.

    python -m benchmarks.bench_quality [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
from skimage import data
from skimage.measure import blur_effect

from livelens.quality import FrozenDetector, assess
from livelens.quality import measures as m
from livelens.quality.exposure import ExposureTracker
from livelens.quality.focus import FocusTracker, focus_features
from livelens.quality.iqa import IqaArch, IqaModel, IqaNet, features


def _ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (first-call allocations, OpenCV thread pool)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    frame = cv2.resize(data.astronaut(), (1280, 720), interpolation=cv2.INTER_LINEAR)
    gray = m.luminance(frame)
    work = m._resize_long(gray, m.BLUR_SIDE)
    thumb_rgb = m._resize_long(frame, m.THUMB_SIDE)
    thumb = m.luminance(thumb_rgb)
    iqa = IqaModel(IqaNet(IqaArch()))  # timing only: weights do not change the cost
    det = FrozenDetector()
    tracker = FocusTracker()
    for _ in range(8):
        tracker.update(frame)
    state = tracker.to_dict()

    def focus_step(f: np.ndarray) -> dict:
        t = FocusTracker.from_dict(state)
        t.update(f)
        return t.to_dict()

    exposure = ExposureTracker()
    exposure.update(frame)
    exposure_state = json.dumps(exposure.to_dict())
    dimmed = (frame * 0.45).astype(np.uint8)  # a changed frame: the second alignment pass runs

    def exposure_step(f: np.ndarray) -> str:
        # From and back to JSON text, as the stream store holds it (its thumbnails are packed).
        t = ExposureTracker.from_dict(json.loads(exposure_state))
        t.update(f)
        return json.dumps(t.to_dict())

    r = a.repeats
    try:  # the shipped learned flags (boosted trees + occluder head over mobilenet_v2 features)
        from livelens.quality.flags import MODEL_NAME, FlagModel, OccluderMap
        from livelens.store import SHIPPED_STORE, ModelStore

        flag_model = FlagModel.from_store(ModelStore(SHIPPED_STORE), MODEL_NAME)
    except Exception as exc:  # the rest of the bench still runs
        print(f"no shipped quality_flags ({exc}); skipping its rows")
        flag_model = None
    base = _ms(lambda: blur_effect(gray), max(3, r // 4))
    figures = {
        "skimage_blur_effect_720p (baseline)": base,
        "assess_720p": _ms(lambda: assess(frame), r),
        "brightness": _ms(lambda: m.brightness(thumb), r),
        "blur (Crete 4 directions + Laplacian)": _ms(lambda: m.blur(work), r),
        "occlusion": _ms(lambda: m.occlusion(thumb_rgb, thumb), r),
        "black": _ms(lambda: m.black(thumb), r),
        "noise": _ms(lambda: m.noise(work), r),
        "frozen_update": _ms(lambda: det.update(frame), r),
        # A stream's focus check: one frame against the stream's state, as the Streams replica
        # runs it (state from JSON, update, state to JSON).
        "focus_update (state round trip)": _ms(lambda: focus_step(frame), r),
        # The same tilts of one frame on its own: the learned flags' last inputs (a model fitted on
        # them pays this inside assess_with_flags; quality_flags@1 does not read them).
        "focus_features (flag inputs)": _ms(lambda: focus_features(gray), r),
        # A stream's exposure check, the same way (a darkened frame: both alignment passes).
        "exposure_update (state round trip)": _ms(lambda: exposure_step(dimmed), r),
        "iqa_features": _ms(lambda: features(frame), r),
        "iqa_score": _ms(lambda: iqa.score(frame), r),
        "assess_with_iqa_720p": _ms(lambda: assess(frame, iqa=iqa), r),
    }
    if flag_model is not None:
        figures["occluder_map (mobilenet_v2 320x192)"] = _ms(lambda: OccluderMap.features(frame), r)
        figures["assess_with_flags_720p"] = _ms(lambda: assess(frame, flags=flag_model), r)
        figures["assess_with_iqa_and_flags_720p"] = _ms(lambda: assess(frame, iqa=iqa, flags=flag_model), r)
    result = {
        "frame": "1280x720 RGB (astronaut, resized)",
        "ms_per_frame": {k: round(v, 2) for k, v in figures.items()},
        "ratio_vs_skimage_blur_effect": {k: round(v / base, 3) for k, v in figures.items()},
        "cv2_threads": cv2.getNumThreads(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
