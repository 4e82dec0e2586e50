"""Scene-text generators: line crops for recognition, full images with polygons for detection.

Strings come from :mod:`livelens.data.charset` (GB2312 level 1 + ASCII) mixed with the
strings the OCR engineer must read in the wild: phone numbers, URLs, WeChat/QQ IDs, HUD
fields. Detection images carry straight, rotated, curved, low-contrast and blurred
instances; each polygon follows the rendered ink (curved text gets a 2×(n+1)-point polygon).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from livelens.data import frames, render
from livelens.data.charset import ascii_chars, gb2312_level1
from livelens.data.manifest import content_id, split_for_key

_EN_WORDS = ["live", "stream", "hello", "world", "game", "super", "vip", "sale", "open", "music", "dance", "coffee",
             "GRAND", "HOTEL", "PACIFIC", "SHOP", "NEW", "FREE", "Happy", "Lucky", "Star", "Win"]


@dataclass(frozen=True)
class TextConfig:
    """Text-line generator settings.

    Attributes:
        height: Crop height in px (PP-OCR recognizers take 48).
        p_hard: Share of lines made hard on purpose (low contrast, blur, noise); marked
            ``attributes.hard``.
        min_len, max_len: String length range for random-character strings.
    """

    height: int = 48
    p_hard: float = 0.15
    min_len: int = 2
    max_len: int = 14


def random_string(rng: np.random.Generator, cfg: TextConfig = TextConfig()) -> tuple[str, str]:
    """A string to render and its kind (zh, en, mixed, phone, url, wechat_id, qq_id, number)."""
    kind = str(rng.choice(["zh", "zh", "zh", "mixed", "en", "phone", "url", "wechat_id", "qq_id", "number"]))
    zh = gb2312_level1()
    n = int(rng.integers(cfg.min_len, cfg.max_len + 1))
    if kind == "zh":
        return "".join(rng.choice(zh, size=n)), kind
    if kind == "mixed":
        parts = []
        for _ in range(int(rng.integers(2, 4))):
            if rng.random() < 0.5:
                parts.append("".join(rng.choice(zh, size=int(rng.integers(1, 5)))))
            else:
                parts.append("".join(rng.choice(list(ascii_chars()), size=int(rng.integers(1, 5)))))
        return "".join(parts), kind
    if kind == "en":
        words = rng.choice(_EN_WORDS, size=int(rng.integers(1, 3)))
        return " ".join(words), kind
    if kind == "phone":
        return frames.obfuscate_phone(frames.phone_number(rng), rng)[1], kind
    if kind == "url":
        return frames.url_string(rng), kind
    if kind == "wechat_id":
        return "微信" + frames.wechat_id(rng), kind
    if kind == "qq_id":
        return "QQ" + frames.qq_id(rng), kind
    return "".join(rng.choice(list(string.digits), size=n)), kind


def _colours(rng: np.random.Generator, bg_mean: np.ndarray, hard: bool) -> tuple[int, int, int]:
    """Text colour against the local background: strong contrast, or weak when ``hard``."""
    lum = float(bg_mean.mean())
    delta = rng.uniform(35, 60) if hard else rng.uniform(130, 200)
    sign = -1 if lum > 128 else 1
    base = np.clip(bg_mean + sign * delta, 0, 255)
    return tuple(int(v) for v in base)


def render_line(text: str, rng: np.random.Generator, cfg: TextConfig, hard: bool) -> np.ndarray:
    """One text line crop of height ``cfg.height`` on a real or procedural background."""
    size = int(cfg.height * rng.uniform(0.6, 0.78))
    f = render.font(size)
    x0, _y0, x1, _y1 = f.getbbox(text)
    pad_x = int(rng.integers(4, 14))
    w = int(x1 - x0) + 2 * pad_x
    _, bg = render.background(w, cfg.height, rng, photo_prob=0.5)
    if rng.random() < 0.5:
        # Plain or lightly textured card backgrounds, as overlays and signs often are.
        bg = np.clip(np.full_like(bg, rng.integers(0, 256, 3, dtype=np.uint8)) * 0.85 + bg * 0.15, 0, 255).astype(np.uint8)
    fg = _colours(rng, bg.reshape(-1, 3).mean(0), hard)
    img = Image.fromarray(bg)
    patch, _ = render.text_patch(text, size, fg, None, pad=0.0)
    y = (cfg.height - patch.height) // 2 + int(rng.integers(-2, 3))
    img.paste(patch, (pad_x, max(0, y)), patch)
    if hard:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.3)))
    arr = np.asarray(img).astype(np.int16)
    if hard:
        arr = arr + rng.normal(0, 6, arr.shape).astype(np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)


def generate_text_lines(start: int, count: int, seed: int = 0, cfg: TextConfig = TextConfig()) -> list[dict]:
    """Recognition crops for slots ``start .. start + count - 1``; the label is in ``texts[0].text``."""
    rows = []
    for slot in range(start, start + count):
        rng = np.random.default_rng([seed, slot, 7])
        text, kind = random_string(rng, cfg)
        hard = bool(rng.random() < cfg.p_hard)
        rgb = render_line(text, rng, cfg, hard)
        data = render.encode_jpeg_bytes(rgb, 95)
        rid = content_id(data)
        h, w = rgb.shape[:2]
        rows.append({
            "id": rid, "image_bytes": data, "width": w, "height": h, "source": "synthetic:text_lines",
            "split": split_for_key(rid), "labels": [],
            "texts": [{"polygon": [0.0, 0.0, float(w), 0.0, float(w), float(h), 0.0, float(h)], "text": text}],
            "attributes": {"kind": kind, "hard": hard},
        })
    return rows


# ---------------------------------------------------------------- detection images
def _rotated_instance(text: str, size: int, fg, angle: float) -> tuple[Image.Image, list[float]]:
    patch, ink = render.text_patch(text, size, fg, None, pad=0.15)
    w, h = patch.size
    rot = patch.rotate(angle, resample=Image.BICUBIC, expand=True)
    # Rotate the ink corners with the same transform PIL applies (about the centre, CCW).
    a = np.deg2rad(angle)
    cx, cy = w / 2, h / 2
    corners = np.array([[ink[0], ink[1]], [ink[2], ink[1]], [ink[2], ink[3]], [ink[0], ink[3]]], np.float64)
    dx, dy = corners[:, 0] - cx, corners[:, 1] - cy
    xr = cx + dx * np.cos(a) + dy * np.sin(a) + (rot.width - w) / 2
    yr = cy - dx * np.sin(a) + dy * np.cos(a) + (rot.height - h) / 2
    return rot, [float(v) for pair in zip(xr, yr, strict=True) for v in pair]


def _curved_instance(text: str, size: int, fg, rng: np.random.Generator) -> tuple[Image.Image, list[float]]:
    """Characters along a circular arc; polygon = outer arc then inner arc (2×(n+1) points)."""
    f = render.font(size)
    adv = [max(1.0, f.getlength(c)) for c in text]
    total = sum(adv)
    span = np.deg2rad(rng.uniform(50, 110))
    radius = total / span
    h = size * 1.15
    side = int(2 * (radius + h)) + 4
    img = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    c = side / 2
    theta = -np.pi / 2 - span / 2  # centred at the top of the circle
    edges = [theta]
    for ch, a in zip(text, adv, strict=True):
        mid = theta + (a / total) * span / 2
        cp, _ = render.text_patch(ch, size, fg, None, pad=0.1)
        cp = cp.rotate(-np.degrees(mid + np.pi / 2), resample=Image.BICUBIC, expand=True)
        px, py = c + radius * np.cos(mid), c + radius * np.sin(mid)
        img.alpha_composite(cp, (int(px - cp.width / 2), int(py - cp.height / 2)))
        theta += (a / total) * span
        edges.append(theta)
    outer = [(c + (radius + h / 2) * np.cos(t), c + (radius + h / 2) * np.sin(t)) for t in edges]
    inner = [(c + (radius - h / 2) * np.cos(t), c + (radius - h / 2) * np.sin(t)) for t in reversed(edges)]
    box = img.getchannel("A").getbbox() or (0, 0, side, side)
    pts = [(x, y) for x, y in outer + inner]
    x0 = min(box[0], min(p[0] for p in pts))
    y0 = min(box[1], min(p[1] for p in pts))
    x1 = max(box[2], max(p[0] for p in pts))
    y1 = max(box[3], max(p[1] for p in pts))
    crop = img.crop((int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1))))
    return crop, [float(v) for p in pts for v in (p[0] - int(x0), p[1] - int(y0))]


def generate_text_det(start: int, count: int, seed: int = 0, width: int = 960, height: int = 540) -> list[dict]:
    """Detection images with 3–8 text instances each (straight, rotated, curved, low contrast, blurred)."""
    rows = []
    for slot in range(start, start + count):
        rng = np.random.default_rng([seed, slot, 11])
        fw, fh = (width, height) if rng.random() < 0.75 else (height, width)
        bg_name, bg = render.background(fw, fh, rng, photo_prob=0.7)
        img = Image.fromarray(bg).convert("RGBA")
        texts, styles, taken = [], [], []
        bg_mean = bg.reshape(-1, 3).mean(0)
        for _ in range(int(rng.integers(3, 9))):
            text, _ = random_string(rng, TextConfig(max_len=10))
            style = str(rng.choice(["straight", "straight", "rotated", "curved", "low_contrast", "blurred"]))
            size = int(min(fw, fh) * rng.uniform(0.045, 0.09))
            fg = _colours(rng, bg_mean, hard=style == "low_contrast")
            if style == "curved" and len(text) >= 3:
                patch, poly = _curved_instance(text, size, fg, rng)
            else:
                style = "straight" if style == "curved" else style
                angle = float(rng.uniform(-45, 45)) if style == "rotated" else float(rng.uniform(-3, 3))
                patch, poly = _rotated_instance(text, size, fg, angle)
            if style == "blurred":
                patch = patch.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.0)))
            if patch.width >= fw or patch.height >= fh:
                continue
            placed = False
            for _ in range(30):
                x, y = int(rng.integers(0, fw - patch.width)), int(rng.integers(0, fh - patch.height))
                b = (x, y, x + patch.width, y + patch.height)
                if all(b[2] <= t[0] or b[0] >= t[2] or b[3] <= t[1] or b[1] >= t[3] for t in taken):
                    placed = True
                    break
            if not placed:
                continue
            img.alpha_composite(patch, (x, y))
            taken.append(b)
            poly = [float(np.clip(v + (x if i % 2 == 0 else y), 0, fw if i % 2 == 0 else fh)) for i, v in enumerate(poly)]
            texts.append({"polygon": poly, "text": text})
            styles.append(style)
        rgb = np.asarray(img.convert("RGB"))
        data = render.encode_jpeg_bytes(rgb, 92)
        rid = content_id(data)
        rows.append({
            "id": rid, "image_bytes": data, "width": fw, "height": fh, "source": "synthetic:text_det",
            "split": split_for_key(rid), "labels": [], "texts": texts,
            "attributes": {"background": bg_name, "styles": styles},
        })
    return rows
