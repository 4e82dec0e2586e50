"""Exposure changed: a stream's frame that is darker or brighter than the stream's own recent frames.

One frame cannot tell a dim scene from a darkened one: a low-key portrait and a well-lit room at
45 % exposure have about the same trimmed luminance, so the per-frame dark flag misses the second
or fires on the first (docs/quality.md). A stream has history, and an exposure change has a
signature a scene change does not: every pixel is the reference's pixel times one gain. So the
tracker keeps the stream's last normal frame as a coarse luminance thumbnail, aligns it to each new
frame (a pan moves the picture), and measures the gain that maps one onto the other (the median
per-pixel ratio) and the *agreement*: the share of pixels that the one gain explains. A blur, an
occluder or noise leaves the gain at 1; a cut to another scene leaves no gain that most pixels agree
on, and starts afresh from it. A frame whose exposure did not change becomes the reference, so a
slow drift (a camera adapting) is followed and never called a change.

Clipping is found at full resolution: a thumbnail pixel that averages any clipped or crushed pixels
of the frame does not set the gain (its ratio understates it) and counts only as a bound: one near
white agrees with any gain at least its ratio, one near black with any gain at most its ratio. The
unclipped pixels must agree among themselves too, or a cut to a black frame would "agree" with any
darkening. Clipped white pixels of the reference are not compared at all.

A moving camera soon leaves the last normal frame behind during a dark spell, so the tracker also
keeps the last dark frame and chains the gain through it. And a change is called only from an
ordinary exposure (the range the real-photo set labels changes from): a spell that starts at a cut
makes a changed frame the stream's normal, and the picture's recovery from it is no defect.

The state is one 64×36 thumbnail, the frame size and a counter (during a dark spell, the last dark
frame as well; for a while after a declined change, the old reference), so the stream store keeps
it as JSON next to the focus tracker's, each thumbnail packed (:func:`_thumb_json`, about 4 KB).
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from livelens.errors import InvalidArgumentError
from livelens.quality.measures import luminance, to_rgb

#: The thumbnail compared (columns, rows): coarse enough that blur, noise and JPEG leave it as it
#: was, fine enough that an occluder covering 5 % of the frame is ~115 of its pixels.
THUMB = (64, 36)
_THUMB_BYTES = THUMB[0] * THUMB[1] * 2  # packed as uint16 (_thumb_json)
#: Reference pixels outside this range (0–255) say little about a gain: under it, 8-bit rounding is
#: a large share of the value; over it, the reference itself may be clipped.
REF_RANGE = (8.0, 247.0)
#: A frame pixel is clipped at white when any of its channels is at or over :data:`WHITE`, and
#: crushed when its luminance is at or under :data:`BLACK` (8-bit rounding is then a large share of
#: its value). A thumbnail pixel is a bound, not a measurement, when more than :data:`CLIP_SHARE`
#: of the frame pixels it averages are clipped or crushed.
WHITE = 250
BLACK = 4
CLIP_SHARE = 0.05
#: A pixel agrees with the frame's gain when its own log ratio is within this of the median
#: (natural log: ×0.82–×1.22). A pure gain leaves every pixel on it; JPEG and noise on a 64×36
#: area average move a pixel by far less.
AGREE_TOL = 0.2
#: The share of usable pixels that must agree on one gain for the frame to be the reference's
#: scene; fewer, and the frame is a cut (another scene, or the camera moved far) with no verdict.
DEFAULT_MIN_AGREEMENT = 0.6
#: Gains at or beyond which the exposure changed. Fitted by ``python -m livelens.quality.exposure_eval``
#: on all photos of the real-photo set: the geometric middle of the gap between the strongest
#: negative (the set's benign ×0.85 and ×1.15) and the weakest positive (its mildest darkening,
#: ×0.45; a brightening clipped so much that only a bound on its gain is left, ×1.40), 0.6105 and
#: 1.2683. docs/quality.md has the held-out figures of the same fit per split.
DEFAULT_DARK_GAIN = 0.61
DEFAULT_BRIGHT_GAIN = 1.27
#: A change is a defect only from an ordinary exposure, as the real-photo set labels it
#: (``realset.EXPOSURE_RANGE`` and ``realset.BRIGHT_MIN_LUMA``): darkening starts from a trimmed
#: luminance of 0.18 to 0.72, brightening from 0.6 / 1.8 to 0.72. Brightening an under-exposed frame
#: or darkening an over-exposed one restores it, which is what a stream does when its camera
#: recovers from a spell whose first frame came after a cut (the tracker had to take that frame as
#: normal). The reference's trimmed luminance (0–1) must lie in these ranges, which are the set's
#: widened by a margin for the coarser thumbnail they are measured on here.
DARK_FROM_LUMA = 0.16
BRIGHT_FROM_LUMA = 0.30
FROM_LUMA_MAX = 0.75
#: The smallest share of the thumbnail with a usable reference pixel: a frame that was nearly all
#: black or all white gives no gain to measure against.
MIN_USABLE = 0.1
#: The smallest share of the thumbnail with an unclipped pixel that has a reference, without which
#: no pixel measures the gain (:func:`gain_against` then falls back on the clipped pixels' bounds).
MIN_EXACT = 0.02
#: The smallest spread (standard deviation of the natural log) of the compared reference pixels
#: for the frame's pattern to be compared with the reference's: under it the reference is flat.
MIN_LOG_STD = 0.05
#: The largest camera shift between the reference and the frame that :func:`align` follows, as a
#: share of each side.
MAX_SHIFT = 0.4


def thumbnail(frame: Any) -> tuple[np.ndarray, np.ndarray]:
    """The frame's luminance at :data:`THUMB` (float32 0–255, area averaged), and per thumbnail
    pixel whether it averages clipped white (1), crushed black (−1) or neither (0).

    Raises:
        InvalidImageError: The frame cannot be read.
    """
    rgb = to_rgb(frame)
    grey = luminance(rgb)
    thumb = cv2.resize(grey, THUMB, interpolation=cv2.INTER_AREA).astype(np.float32)
    # The per-channel maximum through OpenCV: NumPy's reduction over the channel axis is an order
    # of magnitude slower on a full frame. The shares are averaged as float (a uint8 mask would
    # round them to 0 or 1).
    r, g, b = cv2.split(rgb)
    brightest = cv2.max(cv2.max(r, g), b)
    white = cv2.resize((brightest >= WHITE).astype(np.float32), THUMB, interpolation=cv2.INTER_AREA)
    black = cv2.resize((grey <= BLACK).astype(np.float32), THUMB, interpolation=cv2.INTER_AREA)
    clip = np.where((white > CLIP_SHARE) & (white >= black), 1, np.where(black > CLIP_SHARE, -1, 0)).astype(np.int8)
    return thumb, clip


def trimmed_luma(thumb: np.ndarray) -> float:
    """A :func:`thumbnail`'s mean luminance (0–1) between its 10th and 90th percentile."""
    lo, hi = np.percentile(thumb, [10, 90])
    sel = thumb[(thumb >= lo) & (thumb <= hi)]
    return float((sel if sel.size else thumb).mean()) / 255.0


def align(thumb: np.ndarray, reference: np.ndarray, ref_clip: np.ndarray,
          gain: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``reference`` moved onto ``thumb`` by the camera's shift between them, and the mask of
    pixels where the moved reference is usable (covered, and not clipped in the reference).

    The shift is found by phase correlation of the two log images less their means, on which a gain
    is a constant and drops out, so a pan that darkens is still aligned. Clipping does not drop out:
    a brightened frame is flat where it clipped, so the reference is correlated as it would look
    with ``gain`` applied and clipped like the frame (:func:`gain_against` passes its first
    estimate). A shift over :data:`MAX_SHIFT` of the frame is not trusted (no overlap worth
    comparing): the reference is then compared where it is.
    """
    ref = reference.astype(np.float32)
    # A reference pixel that averages clipped white hides its true value; crushed black does not
    # matter there (its average is what the frame will be compared with), bar the floor of REF_RANGE.
    valid = ((ref_clip != 1) & (ref >= REF_RANGE[0]) & (ref <= REF_RANGE[1])).astype(np.float32)
    a = np.log1p(np.minimum(ref * np.float32(gain), 255.0))
    b = np.log1p(thumb.astype(np.float32))
    (dx, dy), _ = cv2.phaseCorrelate(a - a.mean(), b - b.mean(), _hann())
    if abs(dx) > MAX_SHIFT * THUMB[0] or abs(dy) > MAX_SHIFT * THUMB[1] or (abs(dx) < 0.25 and abs(dy) < 0.25):
        return ref, valid > 0
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(ref, m, THUMB, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    usable = cv2.warpAffine(valid, m, THUMB, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return moved, usable >= 0.999


@lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    return cv2.createHanningWindow(THUMB, cv2.CV_32F)


def gain_against(thumb: np.ndarray, clip: np.ndarray, reference: np.ndarray,
                 ref_clip: np.ndarray) -> tuple[float, float] | None:
    """The gain that maps the reference (a :func:`thumbnail`: ``reference``, ``ref_clip``) onto
    the frame's ``thumb`` and ``clip`` after :func:`align`, and how well that one gain explains the
    frame. Reference pixels that average clipped white are not compared.

    Returns:
        ``(gain, agreement)``; the agreement is the lowest of the share of usable pixels the gain
        explains, the same share among the unclipped ones, and the rank correlation of frame and
        reference (:func:`_pattern`). ``None`` when under :data:`MIN_USABLE` of the thumbnail has a
        usable reference pixel (the reference was black or white nearly everywhere).
    """
    first = _measure(thumb, clip, *align(thumb, reference, ref_clip))
    if first is None or abs(np.log(first[0])) < AGREE_TOL:
        return first
    # A large change: align again with the reference made to look as the frame does (clipping
    # included), and keep whichever alignment more pixels agree with.
    second = _measure(thumb, clip, *align(thumb, reference, ref_clip, first[0]))
    return second if second is not None and second[1] > first[1] else first


def _measure(thumb: np.ndarray, clip: np.ndarray, moved: np.ndarray,
             usable: np.ndarray) -> tuple[float, float] | None:
    """:func:`gain_against` for one alignment."""
    usable = usable.ravel()
    if usable.mean() < MIN_USABLE:
        return None
    r = moved.astype(np.float64).ravel()[usable]
    f = thumb.astype(np.float64).ravel()[usable]
    c = clip.ravel()[usable]
    exact, high = c == 0, c == 1
    logs = np.log(np.maximum(f, 0.5) / r)
    if exact.sum() < MIN_EXACT * THUMB[0] * THUMB[1]:
        if high.mean() >= 0.5:
            # Brightened until nearly everything clipped: no pixel measures the gain, but each one
            # bounds it from below. The median bound is a lower bound on the gain itself (for most
            # of the frame), and the agreement is the share of pixels clipped.
            return float(np.exp(np.median(logs[high]))), float(high.mean())
        return 1.0, 0.0
    m = float(np.median(logs[exact]))
    agree = np.where(exact, np.abs(logs - m) <= AGREE_TOL,
                     np.where(high, logs <= m + AGREE_TOL, logs >= m - AGREE_TOL))
    return float(np.exp(m)), float(min(agree.mean(), agree[exact].mean(), _pattern(r, f)))


def _pattern(r: np.ndarray, f: np.ndarray) -> float:
    """How well the frame keeps the reference's pattern: the rank correlation of their pixels.

    A gain, clipped or not, keeps the order of the pixels (the brightest clip first), so the ranks
    rise and fall together; two flat textures of different brightness (a wall, then a page) have
    ratios near one value without that. A reference too flat to show a pattern
    (:data:`MIN_LOG_STD`) cannot tell them apart, and gives 0.
    """
    from scipy.stats import spearmanr

    if np.log(r).std() < MIN_LOG_STD or f.max() == f.min():
        return 0.0
    rho = spearmanr(r, f).statistic
    return float(rho) if np.isfinite(rho) else 0.0


@dataclass
class ExposureTracker:
    """Flags frames of one stream whose exposure changed against its last normal frame.

    Args:
        dark_gain: Gain at or under which the frame is darker than its stream (``dark``).
        bright_gain: Gain at or over which it is brighter (``bright``).
        min_agreement: Share of pixels that must agree on the gain; under it the frame is a cut.
        relearn_frames: After this many changed frames in a row the new exposure becomes the
            stream's reference: "exposure changed" is an event, and a stream that stays dark is what
            the per-frame dark flag reports.
    """

    dark_gain: float = DEFAULT_DARK_GAIN
    bright_gain: float = DEFAULT_BRIGHT_GAIN
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    relearn_frames: int = 20
    reference: np.ndarray | None = field(default=None, repr=False)
    ref_clip: np.ndarray | None = field(default=None, repr=False)
    size: tuple[int, int] | None = None
    changed_frames: int = 0
    #: During a dark change: the last frame (thumbnail and white-clip mask) and its gain against
    #: the reference, so that a moving camera's next frame is measured against a frame it still
    #: overlaps and the gains are chained (:meth:`update`). ``None`` otherwise.
    last: np.ndarray | None = field(default=None, repr=False)
    last_clip: np.ndarray | None = field(default=None, repr=False)
    last_gain: float = 1.0
    #: The reference before a change that was declined because the reference's own exposure was
    #: not ordinary, kept for ``relearn_frames`` frames (:meth:`update`); ``None`` otherwise.
    previous: np.ndarray | None = field(default=None, repr=False)
    previous_clip: np.ndarray | None = field(default=None, repr=False)
    previous_age: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.dark_gain < 1 < self.bright_gain and 0 < self.min_agreement <= 1
                and self.relearn_frames >= 1):
            raise InvalidArgumentError("ExposureTracker needs 0 < dark_gain < 1 < bright_gain, "
                                       "0 < min_agreement <= 1 and relearn_frames >= 1")

    def update(self, frame: Any) -> dict[str, Any]:
        """Feed the next frame of the stream.

        Returns:
            ``change`` (``"dark"``, ``"bright"`` or ``None``), ``gain`` against the stream's last
            normal frame and ``agreement`` (``None`` on the first frame, after a size change, on a
            cut and against a black or white reference, each of which starts afresh), ``cut``
            (bool) and ``changed_frames`` (consecutive changed frames, this one included).

        Raises:
            InvalidImageError: The frame cannot be read.
        """
        rgb = to_rgb(frame)
        size = (int(rgb.shape[1]), int(rgb.shape[0]))
        thumb, clip = thumbnail(rgb)
        if self.reference is None or size != self.size:
            self.size, self.previous, self.previous_clip = size, None, None
            self._normal(thumb, clip)
            return self._out(None, None)
        measured = gain_against(thumb, clip, self.reference, self.ref_clip)
        if measured is None:
            # The reference was black or white: the picture's return is not a change of exposure.
            self._normal(thumb, clip)
            return self._out(None, None)
        gain, agreement = measured
        if self.previous is not None:
            self.previous_age += 1
            if self.previous_age > self.relearn_frames:
                self.previous = self.previous_clip = None
        if agreement < self.min_agreement and self.changed_frames and self.last is not None:
            # In the middle of a change, a moving camera soon leaves the last normal frame behind,
            # and every frame would then read as a cut until the change is relearned. The last
            # (changed) frame still overlaps it: chain the gain through it.
            chained = gain_against(thumb, clip, self.last, self.last_clip)
            if chained is not None and chained[1] >= self.min_agreement:
                gain, agreement = self.last_gain * chained[0], chained[1]
        if agreement < self.min_agreement:
            if self.changed_frames and self.changed_frames + 1 < self.relearn_frames:
                # A frame no gain explains, in the middle of a change: another scene as likely as
                # the changed picture moving on. No verdict, and the last normal frame stays, so
                # the return to it is not called a change the other way. Nothing is chained
                # through this frame: whether the change outlasted the cut is unknown, and
                # assuming it did calls a spell that ended at a cut on every later frame. It
                # counts towards relearning.
                self.changed_frames += 1
                self.last, self.last_clip, self.last_gain = None, None, 1.0
                return self._out(None, None, agreement=agreement, cut=True)
            # Another scene: no one gain explains it, and it is the stream's new normal.
            self._normal(thumb, clip)
            return self._out(None, None, agreement=agreement, cut=True)
        luma = trimmed_luma(self.reference)
        change = None
        if luma <= FROM_LUMA_MAX:
            change = ("dark" if gain <= self.dark_gain and luma >= DARK_FROM_LUMA
                      else "bright" if gain >= self.bright_gain and luma >= BRIGHT_FROM_LUMA else None)
        if self.previous is not None and change is not None:
            back = gain_against(thumb, clip, self.previous, self.previous_clip)
            if back is not None and back[1] >= self.min_agreement and self.dark_gain < back[0] < self.bright_gain:
                # The picture is back at the exposure it had before a declined change (below): the
                # declined frames were the changed ones, and this is no change.
                self._normal(thumb, clip)
                self.previous = self.previous_clip = None
                return self._out(None, back[0], back[1])
        if change is None and self.changed_frames == 0 and not self.dark_gain < gain < self.bright_gain:
            # A gain beyond a threshold from a reference outside the ordinary range: either the
            # frame restores an exposure that was wrong from the reference's first frame (a spell
            # that began at a cut), or it is itself the changed one (a dim part of the picture
            # brightened). The frame becomes the normal, as the first is likelier to last; the old
            # reference is kept a while, so that a return to it is not called a change either.
            previous, previous_clip = self.reference, self.ref_clip
            self._normal(thumb, clip)
            self.previous, self.previous_clip, self.previous_age = previous, previous_clip, 0
            return self._out(None, gain, agreement)
        if change is not None:
            self.changed_frames += 1
            if self.changed_frames >= self.relearn_frames:
                change = None
        if change is None:
            # The newest normal frame is the reference: a slow drift follows it.
            self._normal(thumb, clip)
        elif change == "dark":
            self.last, self.last_clip, self.last_gain = thumb, clip, gain
        # (A brightened frame is not chained through: its clipped pixels only bound the gain, so a
        # gain chained through it would be a bound as well.)
        return self._out(change, gain, agreement)

    def _normal(self, thumb: np.ndarray, clip: np.ndarray) -> None:
        """Make the frame the stream's reference, outside any change."""
        self.reference, self.ref_clip, self.changed_frames = thumb, clip, 0
        self.last, self.last_clip, self.last_gain = None, None, 1.0

    def _out(self, change: str | None, gain: float | None, agreement: float | None = None,
             cut: bool = False) -> dict[str, Any]:
        return {"change": change, "gain": None if gain is None else round(gain, 4),
                "agreement": None if agreement is None else round(agreement, 4), "cut": cut,
                "changed_frames": int(self.changed_frames)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (the settings are not in it: they come from the caller)."""
        state: dict[str, Any] = {"reference": _thumb_json(self.reference), "white": _white_json(self.ref_clip),
                                 "size": list(self.size) if self.size else None,
                                 "changed_frames": self.changed_frames}
        if self.last is not None:  # only during a change
            state |= {"last": _thumb_json(self.last), "last_white": _white_json(self.last_clip),
                      "last_gain": round(self.last_gain, 4)}
        if self.previous is not None:  # only for a while after a declined change
            state |= {"previous": _thumb_json(self.previous), "previous_white": _white_json(self.previous_clip),
                      "previous_age": self.previous_age}
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any], **settings: Any) -> ExposureTracker:
        """Rebuild a tracker from :meth:`to_dict` output with ``settings`` (the constructor's).

        Raises:
            InvalidArgumentError: The state is malformed.
        """
        try:
            ref, clip = _thumb_from(state.get("reference"), state.get("white", []))
            last, last_clip = _thumb_from(state.get("last"), state.get("last_white", []))
            previous, previous_clip = _thumb_from(state.get("previous"), state.get("previous_white", []))
            last_gain = float(state.get("last_gain", 1.0))
            if not (np.isfinite(last_gain) and last_gain > 0):
                raise ValueError(f"last_gain {last_gain} is not a positive number")
            size = state.get("size")
            return cls(**settings, reference=ref, ref_clip=clip, size=(int(size[0]), int(size[1])) if size else None,
                       changed_frames=int(state.get("changed_frames", 0)), last=last, last_clip=last_clip,
                       last_gain=last_gain, previous=previous, previous_clip=previous_clip,
                       previous_age=int(state.get("previous_age", 0)))
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, zlib.error) as exc:
            raise InvalidArgumentError(f"bad ExposureTracker state: {exc}") from exc


def _thumb_json(thumb: np.ndarray | None) -> str | None:
    """A thumbnail packed for the stream store: its values in tenths (``np.round(thumb, 1)``, as a
    list of numbers held them before), little-endian uint16, zlib, base64.

    The store rewrites a stream's state after every frame, and as a JSON list one thumbnail was
    about 15 KB, most of the stream's record; packed it is about a quarter of that, and
    :func:`_thumb_from` gives back the same float32 values the list did.
    """
    if thumb is None:
        return None
    # The same float32 steps as np.round(thumb, 1): times ten, rint; the division is _thumb_from's.
    tenths = np.rint(np.asarray(thumb, np.float32) * np.float32(10))
    packed = np.clip(tenths, 0, np.iinfo(np.uint16).max).astype("<u2").tobytes()
    return base64.b64encode(zlib.compress(packed, 1)).decode("ascii")


def _white_json(clip: np.ndarray | None) -> list[int]:
    # Of a thumbnail's clip classes only white is ever read (align): its flat indices, few.
    return [] if clip is None else np.flatnonzero(clip.ravel() == 1).tolist()


def _thumb_from(values: Any, white: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A thumbnail and its clip mask from :func:`_thumb_json` and :func:`_white_json` output."""
    if values is None:
        return None, None
    if isinstance(values, str):
        # At most one byte past a thumbnail is inflated: a damaged state cannot grow without bound.
        raw = zlib.decompressobj().decompress(base64.b64decode(values.encode("ascii"), validate=True),
                                              _THUMB_BYTES + 1)
        if len(raw) != _THUMB_BYTES:
            raise ValueError(f"a packed thumbnail holds {len(raw)} bytes, not {_THUMB_BYTES}")
        thumb = (np.frombuffer(raw, "<u2").astype(np.float32) / np.float32(10)).reshape(THUMB[1], THUMB[0])
    else:  # a state stored before thumbnails were packed: a list of numbers
        thumb = np.asarray(values, np.float32)
    if thumb.shape != (THUMB[1], THUMB[0]) or not np.isfinite(thumb).all():
        raise ValueError(f"a thumbnail is not {THUMB[0]}x{THUMB[1]} finite numbers")
    clip = np.zeros(thumb.size, np.int8)
    clip[np.asarray(white, np.int64)] = 1
    return thumb, clip.reshape(thumb.shape)
