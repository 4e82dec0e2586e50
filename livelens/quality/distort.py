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
    """Cover about ``frac`` of the frame with a block, a sticker or a hand.

    Args:
        rgb: The photo.
        frac: Target covered fraction of the frame area.
        kind: ``"block"`` (flat rectangle), ``"sticker"`` (flat disc with a dark outline),
            ``"emoji"`` (a cartoon face sticker), ``"hand"`` (smooth skin-toned blob entering from
            the bottom edge) or ``"palm"`` (a shaded, defocused hand with fingers from any edge).
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
    elif kind == "emoji":
        # A cartoon sticker: filled disc, outline and a face, so it is not texture-free inside.
        r = min(bw, bh) // 2
        centre = (x0 + bw // 2, y0 + bh // 2)
        fill = tuple(int(c) for c in rng.choice([[250, 205, 40], [240, 120, 160], [90, 200, 250], [255, 255, 255]]))
        cv2.circle(out, centre, r, fill, -1, cv2.LINE_AA)
        cv2.circle(out, centre, r, (30, 30, 30), max(2, r // 18), cv2.LINE_AA)
        for dx in (-1, 1):
            cv2.circle(out, (centre[0] + dx * r // 3, centre[1] - r // 4), max(2, r // 8), (30, 30, 30), -1)
        cv2.ellipse(out, (centre[0], centre[1] + r // 6), (r // 2, r // 3), 0, 10, 170, (30, 30, 30),
                    max(2, r // 14), cv2.LINE_AA)
        box = (centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r)
    elif kind == "palm":
        # A hand near the lens: palm and four fingers from a random edge, skin-toned, shaded and
        # defocused (the camera focuses on the scene behind it).
        rot = int(rng.integers(4))  # which edge the hand enters from: bottom, right, top, left
        ch, cw = (h, w) if rot % 2 == 0 else (w, h)  # draw entering from the bottom, then rotate
        ph = int(min(ch - 2, np.sqrt(frac * h * w / aspect) * 1.15))
        pw = int(min(cw - 2, ph * aspect))
        px = int(rng.integers(0, max(1, cw - pw)))
        mask = np.zeros((ch, cw), np.uint8)
        cv2.ellipse(mask, (px + pw // 2, ch), (pw // 2, int(ph * 0.6)), 0, 180, 360, 255, -1)
        fw = max(2, pw // 5)
        for j in range(4):
            fx = px + int(pw * (0.1 + 0.22 * j))
            top = ch - int(ph * rng.uniform(0.85, 1.0))
            cv2.rectangle(mask, (fx, top + fw // 2), (fx + fw, ch), 255, -1)
            cv2.circle(mask, (fx + fw // 2, top + fw // 2), fw // 2, 255, -1)
        mask = np.ascontiguousarray(np.rot90(mask, rot))
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else box
        skin = np.array(rng.choice([[224, 172, 140], [198, 134, 104], [141, 85, 60], [235, 195, 170]]), np.float32)
        shade = cv2.GaussianBlur(rng.uniform(0.75, 1.05, (8, 8)).astype(np.float32), (0, 0), 1.5)
        layer = np.clip(skin[None, None, :] * cv2.resize(shade, (w, h))[:, :, None], 0, 255)
        m = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), max(1.0, min(h, w) / 200))[:, :, None]
        out = (out.astype(np.float32) * (1 - m) + layer * m).astype(np.uint8)
    else:
        raise InvalidArgumentError(f"unknown occluder kind {kind!r}: use block, sticker, emoji, hand or palm")
    return out, box
