"""Crop augmentation that keeps the evidence (the seed's 增强裁剪).

A plain random resized crop can cut away a small violation while its label stays on,
teaching the model to fire on the background. :class:`EvidenceCrop` draws the usual random
scale and aspect ratio, then places (and if needed grows) the window so that it contains
every annotated or heatmap box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from livelens.errors import InvalidArgumentError

BoxLike = Sequence[float]


class EvidenceCrop:
    """A random resized crop constrained to contain given boxes.

    Args:
        size: Output side used by :meth:`resized` (the crop itself is returned unresized by ``__call__``).
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (w / h).
    """

    def __init__(self, size: int = 224, scale: tuple[float, float] = (0.35, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def window(self, width: int, height: int, boxes: Sequence[BoxLike] = (),
               rng: np.random.Generator | None = None) -> tuple[int, int, int, int]:
        """Draw a crop window ``(x0, y0, x1, y1)`` that contains every box."""
        rng = rng or np.random.default_rng()
        if width < 1 or height < 1:
            raise InvalidArgumentError(f"cannot crop an empty {width}x{height} image")
        for b in boxes:
            if len(b) < 4 or not b[0] <= b[2] or not b[1] <= b[3]:
                raise InvalidArgumentError(f"box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, got {tuple(b)}")
        area = width * height
        s = rng.uniform(*self.scale)
        r = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        cw = round(min(width, math.sqrt(area * s * r)))
        ch = round(min(height, math.sqrt(area * s / r)))
        cw, ch = max(cw, 1), max(ch, 1)
        if len(boxes):
            # Boxes partly outside the frame are clipped to it: only the visible evidence can be kept.
            ux0 = min(max(0, math.floor(min(b[0] for b in boxes))), width - 1)
            uy0 = min(max(0, math.floor(min(b[1] for b in boxes))), height - 1)
            ux1 = max(min(width, math.ceil(max(b[2] for b in boxes))), ux0 + 1)
            uy1 = max(min(height, math.ceil(max(b[3] for b in boxes))), uy0 + 1)
            cw, ch = max(cw, ux1 - ux0), max(ch, uy1 - uy0)
            lo_x, hi_x = max(0, ux1 - cw), min(ux0, width - cw)
            lo_y, hi_y = max(0, uy1 - ch), min(uy0, height - ch)
        else:
            lo_x, hi_x, lo_y, hi_y = 0, width - cw, 0, height - ch
        x0 = int(rng.integers(lo_x, hi_x + 1))
        y0 = int(rng.integers(lo_y, hi_y + 1))
        return x0, y0, x0 + cw, y0 + ch

    def crop_with_boxes(self, image: np.ndarray, boxes: Sequence[BoxLike] = (),
                        rng: np.random.Generator | None = None) -> tuple[np.ndarray, list[tuple[float, ...]]]:
        """Crop ``image`` and return the boxes in the crop's coordinates."""
        h, w = image.shape[:2]
        x0, y0, x1, y1 = self.window(w, h, boxes, rng)
        moved = [(b[0] - x0, b[1] - y0, b[2] - x0, b[3] - y0, *b[4:]) for b in boxes]
        return image[y0:y1, x0:x1], moved

    def __call__(self, image: np.ndarray, boxes: Sequence[BoxLike] = (),
                 rng: np.random.Generator | None = None) -> np.ndarray:
        return self.crop_with_boxes(image, boxes, rng)[0]

    def resized(self, image: np.ndarray, boxes: Sequence[BoxLike] = (),
                rng: np.random.Generator | None = None) -> tuple[np.ndarray, list[tuple[float, ...]]]:
        """Crop, resize to ``size``×``size``, and return the boxes in the output's coordinates."""
        import cv2

        crop, moved = self.crop_with_boxes(image, boxes, rng)
        h, w = crop.shape[:2]
        sx, sy = self.size / w, self.size / h
        out = cv2.resize(crop, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return out, [(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy, *b[4:]) for b in moved]
