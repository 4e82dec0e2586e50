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
        area = width * height
        s = rng.uniform(*self.scale)
        r = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        cw = round(min(width, math.sqrt(area * s * r)))
        ch = round(min(height, math.sqrt(area * s / r)))
        cw, ch = max(cw, 1), max(ch, 1)
        if boxes:
            ux0 = max(0, math.floor(min(b[0] for b in boxes)))
            uy0 = max(0, math.floor(min(b[1] for b in boxes)))
            ux1 = min(width, math.ceil(max(b[2] for b in boxes)))
            uy1 = min(height, math.ceil(max(b[3] for b in boxes)))
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
                rng: np.random.Generator | None = None) -> np.ndarray:
        """Crop, then resize to ``size``×``size``."""
        import cv2

        return cv2.resize(self(image, boxes, rng), (self.size, self.size), interpolation=cv2.INTER_AREA)
