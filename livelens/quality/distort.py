"""Small, deterministic distortions of real photos, for tests and for the measures' evaluation.

The LIVE/TID-style training set comes from ``livelens.data`` (the data owner's generator); these
functions only plant one known distortion at a known level so a test can check a measure's
response, or the evaluation can plant occluders with a known box.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from livelens.errors import InvalidArgumentError


def gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Defocus-like blur with standard deviation ``sigma`` pixels (0 returns a copy)."""
    if sigma <= 0:
        return rgb.copy()
    return cv2.GaussianBlur(rgb, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def motion_blur(rgb: np.ndarray, length: int, angle_deg: float = 0.0) -> np.ndarray:
    """Linear motion blur: a ``length``-pixel line kernel at ``angle_deg`` (0 = horizontal)."""
    if length <= 1:
        return rgb.copy()
    k = np.zeros((length, length), np.float32)
    k[length // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((length - 1) / 2.0, (length - 1) / 2.0), angle_deg, 1.0)
    k = cv2.warpAffine(k, rot, (length, length))
    k /= max(k.sum(), 1e-6)
    return cv2.filter2D(rgb, -1, k, borderType=cv2.BORDER_REFLECT)


def exposure(rgb: np.ndarray, gain: float) -> np.ndarray:
    """Scale linear intensity by ``gain`` (<1 darker, >1 brighter), clipped like a sensor."""
    return np.clip(rgb.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def gamma(rgb: np.ndarray, g: float) -> np.ndarray:
    """Gamma curve ``out = in ** g``: g > 1 darkens mid-tones, g < 1 brightens them."""
    lut = np.clip(((np.arange(256) / 255.0) ** g) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.LUT(rgb, lut)


def gaussian_noise(rgb: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Additive white Gaussian noise with standard deviation ``sigma`` (0–255 scale)."""
    rng = np.random.default_rng(seed)
    return np.clip(rgb.astype(np.float32) + rng.normal(0.0, sigma, rgb.shape), 0, 255).astype(np.uint8)


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through JPEG at ``quality`` (1–95)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def plant_occluder(
    rgb: np.ndarray, frac: float, kind: str = "block", seed: int = 0
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Cover about ``frac`` of the frame with a uniform block, a sticker (disc) or a hand-like blob.

    Args:
        rgb: The photo.
        frac: Target covered fraction of the frame area.
        kind: ``"block"`` (flat rectangle), ``"sticker"`` (flat disc with a dark outline) or
            ``"hand"`` (smooth skin-toned blob entering from the bottom edge).
        seed: Position and colour.

    Returns:
        The occluded copy and the occluder's box ``(x0, y0, x1, y1)`` in pixels.
    """
    rng = np.random.default_rng(seed)
    out = rgb.copy()
    h, w = rgb.shape[:2]
    aspect = rng.uniform(0.7, 1.4)
    bh = int(min(h - 2, np.sqrt(frac * h * w / aspect)))
    bw = int(min(w - 2, bh * aspect))
    if kind == "hand":
        x0 = int(rng.integers(0, max(1, w - bw)))
        y0 = h - bh
    else:
        x0 = int(rng.integers(0, max(1, w - bw)))
        y0 = int(rng.integers(0, max(1, h - bh)))
    box = (x0, y0, x0 + bw, y0 + bh)
    if kind == "block":
        out[y0 : y0 + bh, x0 : x0 + bw] = rng.integers(0, 256, 3)
    elif kind == "sticker":
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        centre, axes = (x0 + bw // 2, y0 + bh // 2), (bw // 2, bh // 2)
        cv2.ellipse(out, centre, axes, 0, 0, 360, colour, -1)
        cv2.ellipse(out, centre, axes, 0, 0, 360, (20, 20, 20), 2)
    elif kind == "hand":
        mask = np.zeros((h, w), np.float32)
        cv2.ellipse(mask, (x0 + bw // 2, h), (bw // 2, bh), 0, 180, 360, 1.0, -1)
        skin = np.array([205, 150, 125], np.float32) * rng.uniform(0.8, 1.05)
        # Out-of-focus hand: smooth shading from a vertical gradient, no texture.
        shade = np.linspace(0.85, 1.0, h, dtype=np.float32)[:, None, None]
        layer = np.clip(skin[None, None, :] * shade, 0, 255)
        m = mask[:, :, None]
        out = (out.astype(np.float32) * (1 - m) + layer * m).astype(np.uint8)
    else:
        raise InvalidArgumentError(f"unknown occluder kind {kind!r}: use block, sticker or hand")
    return out, box
