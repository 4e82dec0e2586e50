"""Graded distortions of every real photo available offline, for the quality flags.

The flags must hold on photos no training step saw, and down to the mild end that a viewer still
notices. This module builds such a set: frames the size of a stream snapshot
(:data:`FRAME`) cut from each real photo (:func:`livelens.evaluation.real_photos`), each with one
known distortion at one of five levels, plus clean frames and *hard negatives* (the darkest and the
flattest window of each photo: dark clothing, night sky, walls). Splits are by photo
(:func:`photo_splits`), so a test photo's frames never reach training.

Every item is a pure function of ``(photo, base, variant, seed)``, so the set is rebuilt the same
way in every process and never stored.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from livelens.quality import distort as D
from livelens.quality.measures import luminance

#: The largest frame cut from a photo: a 960×540 stream snapshot. Blur levels are pixels at this
#: size; smaller windows get them scaled to their width, down to :data:`MIN_BLUR_SCALE`.
FRAME = (960, 540)
#: The smallest factor blur levels are scaled by: windows narrower than half of FRAME get the blur
#: of a 480 px window. Scaled further, level 1 falls under a pixel (σ 0.64 px on a 305 px window),
#: a blur no viewer sees in the frame at its own size, and the frame's "blur" label would be false.
MIN_BLUR_SCALE = 0.5
#: Bumped whenever :func:`render` gives an existing item new pixels: cached features of another
#: version are not reused (version 2: :data:`MIN_BLUR_SCALE`).
RENDER_VERSION = 2
#: Narrowest window cut from a photo (where the photo is that wide).
MIN_WIDTH = 480

#: Distortion → its five levels, level 1 (the mild end a viewer still notices) first.
LEVELS: dict[str, tuple[float, ...]] = {
    "dark": (0.45, 0.40, 0.35, 0.30, 0.25),          # exposure gain
    "bright": (1.8, 2.0, 2.2, 2.4, 2.6),             # exposure gain, clipped like a sensor
    "gaussian_blur": (2.0, 2.5, 3.0, 4.0, 6.0),      # σ in pixels at 960×540
    "motion_blur": (9, 12, 16, 22, 30),              # kernel length in pixels at 960×540
    "occlusion": (0.05, 0.08, 0.12, 0.16, 0.20),     # covered share of the frame
}
#: The flag each distortion must raise.
FLAG_OF = {"dark": "dark", "bright": "bright", "gaussian_blur": "blur", "motion_blur": "blur",
           "occlusion": "occlusion"}
#: Changes a viewer does not call a defect: they must not raise any flag.
BENIGN = ("jpeg_q75", "gain_0.85", "gain_1.15", "noise_3")
OCCLUDERS = ("block", "sticker", "emoji", "hand", "palm")
#: Clean windows a flag must not fire on: the darkest and the flattest window of each photo at
#: three sizes (dark clothing, night sky, black surrounds, walls, uniform sky).
HARD_NEGATIVES = ("dark_35", "dark_50", "dark_70", "flat_35", "flat_50", "flat_70")
#: Exposure distortions are applied only where the clean exposure is ordinary (trimmed mean
#: luminance in this range): darkening a night sky or brightening a white page changes little that
#: a viewer would call a defect, so such frames would carry a label their pixels cannot support.
EXPOSURE_RANGE = (0.18, 0.72)
#: Brightening also needs a clean frame at least this bright (trimmed mean luminance), so that its
#: mildest gain (×1.8) lifts the frame to 0.6 or more. ×1.8 of an under-exposed frame (a dusk
#: launch pad, a dim station hall at 0.2) gives an ordinary exposure of about 0.37, a correction
#: rather than a defect, and a "bright" label on it is one its pixels cannot support.
BRIGHT_MIN_LUMA = 0.6 / 1.8
#: Photos whose 16:9 window is narrower than this are thumbnails, not stream snapshots, and are left
#: out of the set: a blur level cannot mean on them what it means on a frame. Scaled to a 128 px
#: window, level 1 is σ 0.27 px, which no viewer sees; at :data:`MIN_BLUR_SCALE` it is σ 1 px, as
#: strong for that frame as σ 7.5 at 960 px, beyond level 5.
MIN_FRAME_WIDTH = 256
#: Defects a photo already has, from its source's own ground truth: every frame cut from it carries
#: them. scikit-image documents ``clock`` as taken "while moving the camera" (real motion blur, as
#: ../shared/data/README.md also says), so its clean frames are blurred, not clean.
INTRINSIC_FLAGS: dict[str, frozenset[str]] = {"skimage/clock": frozenset({"blur"})}


@dataclass(frozen=True)
class Item:
    """One frame of the set, before its pixels are made.

    Attributes:
        photo: Source photo name (the split unit).
        base: ``centre``, ``zoom`` or ``zoom_<k>`` (random windows), or a :data:`HARD_NEGATIVES` window.
        distortion: A key of :data:`LEVELS`, a :data:`BENIGN` change, or ``none``.
        level: 1–5 for distortions, 0 otherwise.
        kind: The occluder kind, for occlusion items.
    """

    photo: str
    base: str
    distortion: str
    level: int
    kind: str = ""

    @property
    def flags(self) -> frozenset[str]:
        """The flags the frame must raise: its distortion's, and its photo's own defects."""
        f = FLAG_OF.get(self.distortion)
        return (frozenset({f}) if f else frozenset()) | INTRINSIC_FLAGS.get(self.photo, frozenset())

    @property
    def key(self) -> str:
        return f"{self.photo}|{self.base}|{self.distortion}|{self.level}|{self.kind}"


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _window(rgb: np.ndarray, scale: float, pick: str, rng: np.random.Generator) -> np.ndarray:
    """A FRAME-aspect window of ``scale`` × the largest one: centred, random, darkest or flattest.

    The window is never upscaled (an upscaled crop is itself blurred, so its "clean" label would be
    false): it is shrunk to FRAME when larger and kept at its own size otherwise, and the blur levels
    are scaled to its width (:func:`render`). ``scale`` is raised so the window keeps at least
    :data:`MIN_WIDTH` pixels where the photo has them.
    """
    h, w = rgb.shape[:2]
    aspect = FRAME[0] / FRAME[1]
    cw, ch = (int(h * aspect), h) if w / h > aspect else (w, int(w / aspect))
    scale = min(1.0, max(scale, MIN_WIDTH / cw))
    cw, ch = min(w, max(16, int(cw * scale))), min(h, max(9, int(ch * scale)))
    if pick == "centre":
        x, y = (w - cw) // 2, (h - ch) // 2
    elif pick == "random":
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    else:
        g = luminance(rgb).astype(np.float32)
        if pick == "flat":
            mean = cv2.blur(g, (7, 7))
            g = np.sqrt(np.maximum(cv2.blur(g * g, (7, 7)) - mean * mean, 0))
        # Score windows on a coarse grid by their mean darkness / local std.
        best, best_v = (0, 0), np.inf
        for y in np.linspace(0, h - ch, 6).astype(int):
            for x in np.linspace(0, w - cw, 6).astype(int):
                v = float(g[y : y + ch, x : x + cw].mean())
                if v < best_v:
                    best, best_v = (int(x), int(y)), v
        x, y = best
    crop = np.ascontiguousarray(rgb[y : y + ch, x : x + cw])
    if cw > FRAME[0]:
        crop = cv2.resize(crop, (FRAME[0], round(ch * FRAME[0] / cw)), interpolation=cv2.INTER_AREA)
    return crop


def base_frame(rgb: np.ndarray, photo: str, base: str) -> np.ndarray:
    """The frame ``base`` of a photo (16:9, at most 960×540)."""
    rng = np.random.default_rng(_seed(photo, base))
    if base == "centre":
        return _window(rgb, 1.0, "centre", rng)
    if base == "zoom" or base.startswith("zoom_"):
        return _window(rgb, float(rng.uniform(0.55, 0.75)), "random", rng)
    if base in HARD_NEGATIVES:
        pick, scale = base.split("_")
        return _window(rgb, int(scale) / 100, pick, rng)
    raise ValueError(f"unknown base {base!r}")


def trimmed_luma(rgb: np.ndarray) -> float:
    """Mean luminance (0–1) between the 10th and 90th percentile."""
    g = luminance(cv2.resize(rgb, (192, 108), interpolation=cv2.INTER_AREA)).astype(np.float32) / 255.0
    lo, hi = np.percentile(g, [10, 90])
    sel = g[(g >= lo) & (g <= hi)]
    return float(sel.mean()) if sel.size else float(g.mean())


def usable(rgb: np.ndarray) -> bool:
    """Whether a photo is large enough for the set: its 16:9 window is :data:`MIN_FRAME_WIDTH` wide."""
    h, w = rgb.shape[:2]
    return min(w, int(h * FRAME[0] / FRAME[1])) >= MIN_FRAME_WIDTH


def distortable(distortion: str, frame: np.ndarray) -> bool:
    """Whether ``distortion`` is applied to a clean ``frame``: exposure changes only where the
    clean exposure is ordinary (:data:`EXPOSURE_RANGE`), brightening only where its mildest level
    over-exposes (:data:`BRIGHT_MIN_LUMA`); every other distortion everywhere."""
    if distortion not in ("dark", "bright"):
        return True
    luma = trimmed_luma(frame)
    low = max(EXPOSURE_RANGE[0], BRIGHT_MIN_LUMA) if distortion == "bright" else EXPOSURE_RANGE[0]
    return low <= luma <= EXPOSURE_RANGE[1]


def bases(windows: int = 2) -> tuple[str, ...]:
    """The distorted windows of a photo: the centre, then ``windows - 1`` random ones (``zoom``,
    ``zoom_2``, …). The first two are the same for every ``windows``, so sets of different sizes
    share their frames."""
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    return ("centre", "zoom", *(f"zoom_{k}" for k in range(2, windows)))[:windows]


def items_for(photo: str, rgb: np.ndarray, windows: int = 2) -> list[Item]:
    """Every item of one photo: clean, benign and distorted frames of each of :func:`bases`, and the
    hard negatives.

    Each distortion has its five levels (occlusion: two occluder kinds per level); dark and bright
    only where :func:`distortable` allows them.
    """
    out: list[Item] = []
    for base in bases(windows):
        frame = base_frame(rgb, photo, base)
        out.append(Item(photo, base, "none", 0))
        out.append(Item(photo, base, BENIGN[_seed(photo, base) % len(BENIGN)], 0))
        for dist in LEVELS:
            if not distortable(dist, frame):
                continue
            for lv in range(1, 6):
                if dist != "occlusion":
                    out.append(Item(photo, base, dist, lv))
                    continue
                # Two occluder kinds per level: occluders vary more than any other distortion.
                first = _seed(photo, base, lv) % len(OCCLUDERS)
                for k in (first, (first + 2) % len(OCCLUDERS)):
                    out.append(Item(photo, base, dist, lv, OCCLUDERS[k]))
    for base in HARD_NEGATIVES:
        out.append(Item(photo, base, "none", 0))
    return out


def render(item: Item, rgb: np.ndarray) -> np.ndarray:
    """The pixels of ``item`` from its photo's RGB array."""
    frame = base_frame(rgb, item.photo, item.base)
    d, s = item.distortion, _seed(item.key)
    if d == "none":
        return frame
    if d == "jpeg_q75":
        return D.jpeg(frame, 75)
    if d.startswith("gain_"):
        return D.exposure(frame, float(d.split("_")[1]))
    if d == "noise_3":
        return D.gaussian_noise(frame, 3.0, seed=s)
    v = LEVELS[d][item.level - 1]
    px = max(frame.shape[1] / FRAME[0], MIN_BLUR_SCALE)  # blur levels are pixels of a 960-wide frame
    if d in ("dark", "bright"):
        return D.exposure(frame, v)
    if d == "gaussian_blur":
        return D.gaussian_blur(frame, v * px)
    if d == "motion_blur":
        return D.motion_blur(frame, max(3, round(v * px)), angle_deg=float(s % 180))
    if d == "occlusion":
        return D.plant_occluder(frame, v, item.kind, seed=s)[0]
    raise ValueError(f"unknown distortion {d!r}")


def photo_splits(photos: Sequence[str], seed: int, test_share: float = 0.3) -> tuple[list[str], list[str]]:
    """A photo-disjoint ``(train, test)`` split of ``photos`` for ``seed``.

    Photos of one scene (the stereo pair ``motorcycle_left``/``right``) stay together.
    """
    groups: dict[str, list[str]] = {}
    for p in sorted(photos):
        groups.setdefault(p.replace("_right", "_left"), []).append(p)
    keys = sorted(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(keys)
    n_test = max(1, round(len(keys) * test_share))
    test = sorted(p for k in keys[:n_test] for p in groups[k])
    train = sorted(p for k in keys[n_test:] for p in groups[k])
    return train, test
