"""Focus lost: a stream's frame that is blurrier than the stream's own recent frames.

A single frame cannot always tell a soft scene from a blurred one: a low-texture brick wall, or
handwriting shot with a shallow depth of field, measures like a sharp photo with mild blur
(docs/quality.md). A stream has history, and blur changes a scene's spectrum in a way a scene change
mostly does not: it takes power away from the high spatial frequencies and leaves the mid ones
nearly as they were, while the camera turning to a flatter part of the scene lowers both. So the
tracker keeps the recent frames' *tilt* (high-band over mid-band power, per direction, the median
over a grid of tiles) and measures, per frame, how far the tilt fell against them, averaged over
four directions (motion blur smears one). A cut to another scene (the frame's coarse thumbnail
far from the previous frame's) starts a new reference, since the new scene may just be softer.

The state is the reference tilts (4 floats a frame), the previous frame's 16×9 thumbnail and two
counters, so the stream store keeps it as JSON next to
:class:`~livelens.quality.frozen.FrozenDetector`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from livelens.errors import InvalidArgumentError
from livelens.quality.measures import luminance, to_rgb

#: Frames are measured at this width (narrower ones as they are): one scale for every stream size.
SPECTRUM_WIDTH = 480
#: The frame is measured in this grid of tiles (columns, rows), and each direction's tilt is the
#: median over the textured tiles: an occluder covers at most a few tiles, while blur changes them
#: all. (Measured over the whole frame, a sticker's sharp edges add mid-band power and read as blur.)
GRID = (4, 3)
#: Radial bands in cycles per pixel at :data:`SPECTRUM_WIDTH`: mid and high. Blur at the set's
#: mildest level (σ 2 px at 960 wide, so σ 1 px here) takes about one decade from the high band and
#: a tenth of one from the mid band.
MID_BAND = (0.04, 0.08)
HIGH_BAND = (0.16, 0.32)
DIRECTIONS = (0, 45, 90, 135)
#: Tiles whose mid-band power is more than this many decades under the strongest tile's are flat
#: (sky, a wall, an occluder) and have no tilt worth measuring.
FLAT_DECADES = 2.0
#: A frame whose most textured tile has less mid-band power than this many decades over the 8-bit
#: rounding floor has nothing to measure (a black or flat frame, or one with noise alone): no verdict.
TEXTURE_DECADES = 2.0
#: The smallest frame side measured: each tile needs a few cycles of the mid band.
MIN_SIDE = 64
#: A frame whose 16×9 grey thumbnail differs from the previous frame's by more than this (mean
#: absolute difference, 0–255) is a cut to another scene, and starts a new reference: a new scene
#: may simply be softer. Blur barely moves so coarse a thumbnail (under 4 at the set's strongest
#: level); a pan moves it by the camera's step (up to 25 in the set's pans); cuts between the set's
#: photos moved it by 60 (median), and by more than 34 in 95 % of them.
CUT_THUMB = (16, 9)
DEFAULT_CUT_DIFF = 30.0
#: The default drop (decades of high-band power relative to the mid band) that calls focus lost.
#: Fitted by ``python -m livelens.quality.focus_eval`` on all photos of the real-photo set (the
#: lowest threshold with precision ≥ 0.97 there) before cuts were detected, when every jump to
#: another window of a photo still reached the tracker: 0.435. With cut detection the same fit gives
#: 0.26, but a cut between two similar scenes is not seen as one, and the higher threshold keeps
#: precision there. docs/quality.md has the figures, also on photos no step of the design looked at.
DEFAULT_THRESHOLD = 0.43


@lru_cache(maxsize=16)
def _bins(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For an h×w tile: a (h*w, 8) matrix that sums the shifted power spectrum into (direction,
    band) cells (mid band first, then high), each cell's bin count, and the Hann window."""
    fy = (np.arange(h) - h // 2)[:, None] / h
    fx = (np.arange(w) - w // 2)[None, :] / w
    r = np.hypot(fx, fy)
    ang = np.degrees(np.arctan2(np.broadcast_to(fy, r.shape), np.broadcast_to(fx, r.shape))) % 180
    cells = np.zeros((h * w, 2 * len(DIRECTIONS)), np.float32)
    for i, a0 in enumerate(DIRECTIONS):
        da = np.abs(ang - a0)
        sector = np.minimum(da, 180 - da) < 22.5
        for j, (lo, hi) in enumerate((MID_BAND, HIGH_BAND)):
            cells[:, j * len(DIRECTIONS) + i] = (sector & (r >= lo) & (r < hi)).ravel()
    counts = np.maximum(cells.sum(axis=0), 1.0)
    window = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    return cells, counts, window


def measured_size(width: int, height: int) -> tuple[int, int]:
    """``(height, width)`` at which a frame is measured: no wider than :data:`SPECTRUM_WIDTH`."""
    if width <= SPECTRUM_WIDTH:
        return height, width
    return max(1, round(height * SPECTRUM_WIDTH / width)), SPECTRUM_WIDTH


def tilts(frame: Any) -> np.ndarray | None:
    """Per direction, the median over textured tiles of log10(high-band / mid-band power), shape (4,);
    ``None`` for a frame with no texture to measure (black, one flat colour).

    Args:
        frame: The frame (anything :func:`livelens.quality.measures.to_rgb` accepts).

    Raises:
        InvalidImageError: The frame cannot be read (from ``to_rgb``).
        InvalidArgumentError: The frame is under :data:`MIN_SIDE` pixels a side as measured
            (a 16000×64 strip is 480×2 at the measuring width).
    """
    return _tilts(luminance(to_rgb(frame)))


def _tile_tilts(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per textured tile and direction, log10(high-band / mid-band power) ``(tiles, 4)``, and the
    share of the grid's tiles that are textured; ``None`` where nothing is textured."""
    g = grey.astype(np.float32) / 255.0
    h, w = measured_size(g.shape[1], g.shape[0])
    if min(h, w) < MIN_SIDE:
        raise InvalidArgumentError(f"a {g.shape[1]}x{g.shape[0]} frame is too small to measure focus: measured at "
                                   f"{w}x{h}, under {MIN_SIDE} px a side")
    if (h, w) != g.shape:
        g = cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA)
    cols, rows = GRID
    th, tw = h // rows, w // cols
    tiles = g[: th * rows, : tw * cols].reshape(rows, th, cols, tw).transpose(0, 2, 1, 3).reshape(-1, th, tw)
    cells, counts, window = _bins(th, tw)
    tiles = (tiles - tiles.mean(axis=(1, 2), keepdims=True)) * window
    power = np.abs(np.fft.fftshift(np.fft.fft2(tiles), axes=(1, 2))) ** 2
    # 8-bit rounding alone leaves a flat floor of power (variance 1/12 of a level per pixel): a
    # strong blur pushes the high band down onto it, and without taking it off the tilt would
    # rise again past a point and the drop would fall with more blur.
    floor = (1.0 / 255.0) ** 2 / 12.0 * float((window**2).sum())
    mean_power = power.reshape(len(tiles), -1) @ cells / counts
    logp = np.log10(np.maximum(mean_power - floor, 0.1 * floor))  # (tiles, 8)
    mid, high = logp[:, : len(DIRECTIONS)], logp[:, len(DIRECTIONS):]
    level = mid.mean(axis=1)
    if level.max() < np.log10(floor) + TEXTURE_DECADES:
        return None
    textured = level >= level.max() - FLAT_DECADES
    return (high - mid)[textured], np.array(textured.mean(), np.float32)


def _tilts(grey: np.ndarray) -> np.ndarray | None:
    tiles = _tile_tilts(grey)
    return None if tiles is None else np.median(tiles[0], axis=0).astype(np.float32)


#: Length of :func:`focus_features`.
N_FOCUS_FEATURES = 10


def focus_features(grey: np.ndarray) -> np.ndarray:
    """The tilt of one frame on its own, as inputs of the learned blur flag (``N_FOCUS_FEATURES``).

    The tracker compares a frame with its stream; a single frame has only its absolute tilt, which
    also depends on the scene. It still adds what the 384-px NR-IQA features lack: the spectrum at
    :data:`SPECTRUM_WIDTH`, tile by tile, so a shallow depth of field (one sharp tile) differs from a
    blurred frame (none), and per direction, for motion blur.

    Returns:
        The median tilt per direction (4), their minimum and spread, the sharpest tile's mean and
        minimum-over-directions tilt, the textured share of the grid, and 1; all zeros for a frame
        with nothing to measure (flat, black, or under :data:`MIN_SIDE` as measured).
    """
    try:
        tiles = _tile_tilts(grey)
    except InvalidArgumentError:
        tiles = None
    if tiles is None:
        return np.zeros(N_FOCUS_FEATURES, np.float32)
    t, share = tiles
    med = np.median(t, axis=0)
    return np.array([*med, med.min(), med.max() - med.min(), t.mean(axis=1).max(), t.min(axis=1).max(), share, 1.0],
                    np.float32)


def focus_drop(tilt: np.ndarray, reference: np.ndarray) -> float:
    """How far the high band fell relative to the mid band against ``reference`` (decades, mean
    over the four directions; motion blur lowers one or two of them a lot)."""
    return float(np.mean(np.asarray(reference, np.float64) - np.asarray(tilt, np.float64)))


@dataclass
class FocusTracker:
    """Flags frames of one stream that are blurrier than its recent frames.

    Args:
        threshold: :func:`focus_drop` at or above which focus is lost.
        history: Recent in-focus frames whose median tilt is the reference.
        relearn_frames: After this many lost frames in a row the blurred picture becomes the
            stream's new reference: "focus lost" is an event, and a stream that stays soft is what
            the per-frame blur flag reports.
        cut_diff: Thumbnail change from the previous frame that makes a cut (:data:`DEFAULT_CUT_DIFF`);
            0 turns cut detection off.
    """

    threshold: float = DEFAULT_THRESHOLD
    history: int = 8
    relearn_frames: int = 20
    cut_diff: float = DEFAULT_CUT_DIFF
    refs: list[np.ndarray] = field(default_factory=list, repr=False)
    size: tuple[int, int] | None = None
    lost_frames: int = 0
    last_thumb: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not (self.threshold > 0 and self.history >= 1 and self.relearn_frames >= 1 and self.cut_diff >= 0):
            raise InvalidArgumentError("FocusTracker needs threshold > 0, history >= 1, relearn_frames >= 1 "
                                       "and cut_diff >= 0")

    def update(self, frame: Any) -> dict[str, Any]:
        """Feed the next frame of the stream.

        Returns:
            ``lost`` (bool), ``drop`` (:func:`focus_drop` against the reference; ``None`` on the
            first frame, after a size change and on a cut, which start a new reference), ``cut``
            (bool), ``reference_frames`` and ``lost_frames`` (consecutive lost frames, this one
            included). A frame under
            :data:`MIN_SIDE` px a side or with no texture (black, flat) gets ``lost`` False,
            ``drop`` None and ``skipped``, and leaves the state as it was.

        Raises:
            InvalidImageError: The frame cannot be read.
        """
        rgb = to_rgb(frame)
        size = (int(rgb.shape[1]), int(rgb.shape[0]))
        if min(measured_size(*size)) < MIN_SIDE:
            # Too small to have a spectrum (a thumbnail, a 1x1 probe, a long thin strip): no
            # verdict, state kept.
            return {**self._out(False, None), "skipped": f"frame under {MIN_SIDE} px a side as measured"}
        grey = luminance(rgb)
        tilt = _tilts(grey)
        if tilt is None:
            # Black or flat: it says nothing about focus, and as a reference it would make the
            # picture's return look like a loss of focus.
            return {**self._out(False, None), "skipped": "no texture to measure"}
        thumb = cv2.resize(grey, CUT_THUMB, interpolation=cv2.INTER_AREA).astype(np.float32)
        previous, self.last_thumb = self.last_thumb, thumb
        if not self.refs or size != self.size:
            # A new stream, or a resolution switch: a smaller picture has less high band by
            # itself, so the old reference no longer applies.
            self.refs, self.size, self.lost_frames = [tilt], size, 0
            return self._out(False, None)
        if self.cut_diff and previous is not None and float(np.abs(thumb - previous).mean()) > self.cut_diff:
            # Another scene: it may be softer than the last one without anything going out of focus.
            self.refs, self.lost_frames = [tilt], 0
            return self._out(False, None, cut=True)
        drop = focus_drop(tilt, np.median(np.stack(self.refs), axis=0))
        lost = drop >= self.threshold
        if lost:
            self.lost_frames += 1
            if self.lost_frames >= self.relearn_frames:
                self.refs, self.lost_frames = [tilt], 0
                return self._out(False, drop)
        else:
            self.lost_frames = 0
            self.refs = [*self.refs, tilt][-self.history:]
        return self._out(lost, drop)

    def _out(self, lost: bool, drop: float | None, cut: bool = False) -> dict[str, Any]:
        return {"lost": bool(lost), "drop": None if drop is None else round(drop, 4), "cut": cut,
                "reference_frames": len(self.refs), "lost_frames": int(self.lost_frames)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (the settings are not in it: they come from the caller)."""
        thumb = None if self.last_thumb is None else np.clip(np.round(self.last_thumb), 0, 255).astype(int).tolist()
        return {"refs": [np.round(r, 4).tolist() for r in self.refs], "size": list(self.size) if self.size else None,
                "lost_frames": self.lost_frames, "thumb": thumb}

    @classmethod
    def from_dict(cls, state: dict[str, Any], **settings: Any) -> FocusTracker:
        """Rebuild a tracker from :meth:`to_dict` output with ``settings`` (the constructor's).

        Raises:
            InvalidArgumentError: The state is malformed.
        """
        try:
            refs = [np.asarray(r, np.float32) for r in state.get("refs") or []]
            if any(r.shape != (len(DIRECTIONS),) or not np.isfinite(r).all() for r in refs):
                raise ValueError("a reference is not 4 finite numbers")
            size = state.get("size")
            thumb = state.get("thumb")
            if thumb is not None:
                thumb = np.asarray(thumb, np.float32)
                if thumb.shape != (CUT_THUMB[1], CUT_THUMB[0]) or not np.isfinite(thumb).all():
                    raise ValueError(f"the thumbnail is not {CUT_THUMB[0]}x{CUT_THUMB[1]} finite numbers")
            tracker = cls(**settings, refs=refs[-settings.get("history", cls.history):],
                          size=(int(size[0]), int(size[1])) if size else None,
                          lost_frames=int(state.get("lost_frames", 0)), last_thumb=thumb)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise InvalidArgumentError(f"bad FocusTracker state: {exc}") from exc
        return tracker
