"""Geometry around PP-OCR's detector for images the way users send them: crops, banners, stickers.

PP-OCR's detector scales an image so its *short* side is 736 px. A tight 30 × 300 crop of one
line becomes 736 × 7,360 and its text 700 px tall, far beyond the sizes the detector learned,
and it finds nothing. :func:`pad_for_detection` places a small image on a canvas of its own
border colour, large enough that the scale-up stays under ``max_upscale``; the boxes are mapped
back. :func:`whole_line` is the last resort: an image that is one line and where nothing was
found is read as one line.

Every setting was chosen on the ``val`` split of :mod:`livelens.ocr.userset`. Joining the boxes
of one row into a line was tried and left out: it gained 0.3 points there and cost ICDAR 2015,
whose ground truth is words, 15 points of hmean (docs/ocr.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from livelens.ocr.types import TextBox

#: Detector input short side of PP-OCR (rapidocr's ``Det.limit_side_len`` with ``limit_type: min``).
DET_SIDE = 736
#: Largest scale-up a small image may get before detection.
MAX_UPSCALE = 3.0


def pad_for_detection(rgb: np.ndarray, max_upscale: float = MAX_UPSCALE,
                      side: int = DET_SIDE) -> tuple[np.ndarray, tuple[int, int]]:
    """The image centred on a square canvas filled with its median border colour, and the offset.

    An image whose short side already needs no more than ``max_upscale`` to reach ``side`` is
    returned as it is, with offset (0, 0).
    """
    h, w = rgb.shape[:2]
    if side / min(h, w) <= max_upscale:
        return rgb, (0, 0)
    canvas = int(max(h, w, np.ceil(side / max_upscale)))
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]).reshape(-1, rgb.shape[2])
    colour = [int(v) for v in np.median(border, axis=0)]
    top, left = (canvas - h) // 2, (canvas - w) // 2
    out = cv2.copyMakeBorder(rgb, top, canvas - h - top, left, canvas - w - left, cv2.BORDER_CONSTANT, value=colour)
    return out, (left, top)


def unpad(boxes: Sequence[TextBox], offset: tuple[int, int], shape: tuple[int, ...]) -> list[TextBox]:
    """Boxes found on a padded canvas, in the original image's pixels (clipped to it)."""
    if offset == (0, 0):
        return list(boxes)
    h, w = shape[:2]
    out = []
    for b in boxes:
        pts = np.asarray(b.polygon, np.float64) - offset
        pts[:, 0] = pts[:, 0].clip(0, w)
        pts[:, 1] = pts[:, 1].clip(0, h)
        if np.ptp(pts[:, 0]) >= 1 and np.ptp(pts[:, 1]) >= 1:
            out.append(TextBox.from_polygon(pts, b.score))
    return out


def is_line_shaped(rgb: np.ndarray) -> bool:
    """Whether an image looks like a single cropped text line (short and wide, not a frame)."""
    h, w = rgb.shape[:2]
    return h <= 160 and w >= 1.5 * h and float(rgb.std()) > 8.0


def whole_line(rgb: np.ndarray) -> TextBox:
    """The whole image as one line box (score 0: nothing was detected)."""
    h, w = rgb.shape[:2]
    return TextBox.from_polygon([[0, 0], [w, 0], [w, h], [0, h]], 0.0)
