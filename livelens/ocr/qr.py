"""QR codes in frames: OpenCV's detector on the full frame, then an upscaled pass for small codes.

OpenCV's QR detector needs roughly 3+ pixels per module; a 40 px code in a 1280×720 stream
frame (a corner overlay) has ~1.5, so the second pass cuts the frame into overlapping
tiles and decodes each one upscaled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from livelens.imageio import DEFAULT_LIMITS, ImageLimits
from livelens.ocr.engine import as_rgb
from livelens.ocr.entities import LABELS
from livelens.ocr.types import Entity, TextLine, polygon_to_box


def _decode(detector: cv2.QRCodeDetector, gray: np.ndarray) -> list[tuple[str, np.ndarray]]:
    try:
        ok, texts, points, _ = detector.detectAndDecodeMulti(gray)
    except cv2.error:
        return []
    if not ok or points is None:
        return []
    return [(t, p) for t, p in zip(texts, points, strict=False) if t]


def _decode_small(detector: cv2.QRCodeDetector, patch: np.ndarray, upscale: float) -> list[tuple[str, np.ndarray]]:
    """Decode one tile upscaled; points come back in tile pixels.

    Multi-decode first (several codes per tile), then the single-code decoder, which reads
    ~1.4 px/module codes that the multi one misses, then an adaptive-threshold variant at a
    larger zoom that restores module edges blurred by video compression.
    """
    big = cv2.resize(patch, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_CUBIC)
    hits = _decode(detector, big)
    if not hits:
        hits = _decode_single(detector, big)
    if not hits:
        zoom = upscale + 1
        big = cv2.resize(patch, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_CUBIC)
        block = int(zoom * 8) | 1
        binar = cv2.adaptiveThreshold(big, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, block, 2)
        return [(t, np.asarray(p) / zoom) for t, p in _decode_single(detector, binar)]
    return [(t, np.asarray(p) / upscale) for t, p in hits]


def _decode_single(detector: cv2.QRCodeDetector, gray: np.ndarray) -> list[tuple[str, np.ndarray]]:
    try:
        text, points, _ = detector.detectAndDecode(gray)
    except cv2.error:
        return []
    return [(text, points)] if text and points is not None else []


def _has_edges(patch: np.ndarray, min_fraction: float = 0.004) -> bool:
    """Whether a tile has enough sharp dark/light transitions to hold a QR code."""
    grad = cv2.morphologyEx(patch, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    return float((grad > 80).mean()) >= min_fraction


def _tiles(h: int, w: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Overlapping tiles (half-tile stride) so every code up to tile/2 lies whole in one."""
    stride = max(1, tile // 2)
    ys = [*range(0, max(1, h - tile), stride), max(0, h - tile)]
    xs = [*range(0, max(1, w - tile), stride), max(0, w - tile)]
    return sorted({(x, y, min(w, x + tile), min(h, y + tile)) for y in ys for x in xs})


def decode_qr(image: Any, *, upscale: float = 3.0, tile: int = 256, first_pass: bool = True,
              second_pass: bool = True, limits: ImageLimits = DEFAULT_LIMITS) -> list[Entity]:
    """Find and decode QR codes.

    Args:
        image: Anything :func:`livelens.imageio.load_image` takes.
        upscale: Zoom of the second pass.
        tile: Tile side (px) of the second pass.
        first_pass: Run the whole-frame pass, which reads codes of about 3+ px per module.
        second_pass: Run the tiled, upscaled pass (only for payloads the first pass missed). It
            is the costly one: the gateway defers it while the detection stage reads QR boxes.
        limits: Image limits.

    Returns:
        One ``qrcode`` entity per distinct payload with its box in frame pixels.
    """
    rgb = as_rgb(image, limits)
    if rgb is None:
        return []
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    detector = cv2.QRCodeDetector()
    found: dict[str, Entity] = {}
    for text, pts in _decode(detector, gray) if first_pass else ():
        found.setdefault(text, Entity("qrcode", text, polygon_to_box(pts), LABELS["qrcode"], 1.0, "qr"))
    if second_pass:
        h, w = gray.shape
        for x0, y0, x1, y1 in _tiles(h, w, tile):
            patch = gray[y0:y1, x0:x1]
            if not _has_edges(patch):  # flat or blurry tiles hold no code; skip the costly decode
                continue
            for text, pts in _decode_small(detector, patch, upscale):
                if text not in found:
                    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2) + np.array([x0, y0])
                    found[text] = Entity("qrcode", text, polygon_to_box(pts), LABELS["qrcode"], 0.9, "qr_upscaled")
    return sorted(found.values(), key=lambda e: (e.box[1], e.box[0]))


def frame_entities(image: Any, lines: Sequence[TextLine], *, qr: bool = True, qr_tiles: bool = True) -> list[Entity]:
    """Everything in a frame that raises an ads label: entities in its text lines, then its QR codes.

    The one definition the OCR deployment and the held-out evaluation (``livelens.evaluation``)
    share, so the evaluation measures what the service answers. ``qr_tiles`` False leaves out
    the tiled pass (:func:`decode_qr`'s ``second_pass``), which the caller runs or replaces.
    """
    from livelens.ocr.entities import extract_entities

    found = list(extract_entities(lines))
    return found + decode_qr(image, second_pass=qr_tiles) if qr else found
