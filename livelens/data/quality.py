"""Quality distortions in the LIVE/TID style over real photos, with graded reference scores.

Each sample is a crop of a real photo, either untouched (``level`` 0) or distorted by one
type at level 1–5. The reference score (0–100, higher is better, like a MOS) is a fixed
function of type and level: ``100 - 100 * weight[type] * (level / 5) ** 1.2``. Splits are
by *source photo* (``attributes.photo``), so held-out samples come from photos the model
never saw.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from livelens.data import render
from livelens.data.manifest import content_id

#: Distortion → (taxonomy label, weight of the score drop at level 5).
DISTORTIONS: dict[str, tuple[str, float]] = {
    "brightness_up": ("quality_bright", 0.6),
    "brightness_down": ("quality_dark", 0.65),
    "gaussian_blur": ("quality_blur", 0.8),
    "motion_blur": ("quality_blur", 0.8),
    "occlusion_block": ("quality_occluded", 0.55),
    "occlusion_sticker": ("quality_occluded", 0.5),
    "occlusion_hand": ("quality_occluded", 0.6),
    "noise": ("quality_noisy", 0.7),
    "jpeg": ("quality_compression", 0.7),
}
LEVELS = (1, 2, 3, 4, 5)
#: Levels from which the distortion is labelled (level 1 is near-invisible by design).
LABEL_FROM_LEVEL = 2


def reference_score(distortion: str, level: int) -> float:
    """The reference quality score of a distortion type at a level (100 for the untouched photo)."""
    if level == 0 or distortion == "none":
        return 100.0
    weight = DISTORTIONS[distortion][1]
    return round(100.0 - 100.0 * weight * (level / 5) ** 1.2, 2)


def photo_splits(names: list[str]) -> dict[str, str]:
    """Assign whole photos to splits: ~70% train, 15% val, 15% test, by hash rank (deterministic)."""
    ranked = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    n = len(ranked)
    n_test = max(1, round(n * 0.15))
    n_val = max(1, round(n * 0.15))
    out = {}
    for i, name in enumerate(ranked):
        out[name] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def _hand_mask(h: int, w: int, rng: np.random.Generator, scale: float) -> tuple[Image.Image, tuple]:
    """A hand-like blob (palm plus four fingers and a thumb) entering from an edge."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    pw = int(min(w, h) * scale)
    cx = int(rng.uniform(0.2, 0.8) * w)
    cy = h - pw // 3
    d.ellipse([cx - pw // 2, cy - pw // 2, cx + pw // 2, cy + pw // 2 + pw], fill=255)
    fw = pw // 5
    for k in range(4):
        fx = cx - pw // 2 + fw // 2 + k * (pw // 4)
        d.rounded_rectangle([fx, cy - pw // 2 - int(pw * rng.uniform(0.5, 0.8)), fx + fw, cy], radius=fw // 2, fill=255)
    d.rounded_rectangle([cx + pw // 2 - fw // 2, cy - pw // 4, cx + pw // 2 + int(pw * 0.5), cy - pw // 4 + fw],
                        radius=fw // 2, fill=255)
    m = m.filter(ImageFilter.GaussianBlur(2))
    return m, m.getbbox() or (0, 0, w, h)


def distort(rgb: np.ndarray, distortion: str, level: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple]]:
    """Apply one distortion at ``level`` (1–5).

    Returns:
        The distorted image and boxes (x0, y0, x1, y1) of occluders (empty for other types).
    """
    t = level / 5
    h, w = rgb.shape[:2]
    img = rgb.astype(np.float32)
    boxes: list[tuple] = []
    if distortion == "brightness_up":
        out = img * (1 + 0.5 * t) + 120 * t
    elif distortion == "brightness_down":
        out = img * (1 - 0.85 * t) ** 1.3
    elif distortion == "gaussian_blur":
        out = cv2.GaussianBlur(img, (0, 0), sigmaX=0.6 + 4.4 * t)
    elif distortion == "motion_blur":
        k = 3 + 2 * round(10 * t)
        kernel = np.zeros((k, k), np.float32)
        kernel[k // 2, :] = 1.0 / k
        angle = float(rng.uniform(0, 180))
        rot = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), angle, 1.0)
        kernel = cv2.warpAffine(kernel, rot, (k, k))
        kernel /= max(kernel.sum(), 1e-6)
        out = cv2.filter2D(img, -1, kernel)
    elif distortion == "noise":
        out = img + rng.normal(0, 4 + 36 * t, img.shape)
    elif distortion == "jpeg":
        q = round(60 - 56 * t)
        _ok, enc = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
        out = cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(np.float32)
    elif distortion.startswith("occlusion"):
        area = (0.04 + 0.36 * t) * h * w
        pil = Image.fromarray(rgb)
        if distortion == "occlusion_hand":
            mask, box = _hand_mask(h, w, rng, scale=float(np.sqrt(area / (h * w))) * 1.1)
            skin = np.array([rng.uniform(170, 235), rng.uniform(120, 180), rng.uniform(90, 150)], np.float32)
            shade = np.linspace(0.8, 1.05, h, dtype=np.float32)[:, None, None]
            layer = Image.fromarray(np.clip(skin * shade * np.ones((h, w, 3), np.float32), 0, 255).astype(np.uint8))
            pil.paste(layer, (0, 0), mask)
            boxes.append(box)
        else:
            bw = int(np.sqrt(area * rng.uniform(0.6, 1.6)))
            bh = int(area / max(bw, 1))
            bw, bh = min(bw, w - 1), min(bh, h - 1)
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            d = ImageDraw.Draw(pil)
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            if distortion == "occlusion_block":
                d.rectangle([x, y, x + bw, y + bh], fill=colour)
            else:
                d.ellipse([x, y, x + bw, y + bh], fill=colour, outline=(255, 255, 255), width=max(2, bw // 30))
                d.ellipse([x + bw * 0.3, y + bh * 0.3, x + bw * 0.45, y + bh * 0.45], fill=(0, 0, 0))
                d.ellipse([x + bw * 0.55, y + bh * 0.3, x + bw * 0.7, y + bh * 0.45], fill=(0, 0, 0))
                d.arc([x + bw * 0.3, y + bh * 0.45, x + bw * 0.7, y + bh * 0.75], 20, 160, fill=(0, 0, 0), width=3)
            boxes.append((x, y, x + bw + 1, y + bh + 1))
        out = np.asarray(pil, np.float32)
    else:
        raise ValueError(f"unknown distortion {distortion!r}")
    return np.clip(out, 0, 255).astype(np.uint8), boxes


@dataclass(frozen=True)
class QualityConfig:
    """Quality-set settings.

    Attributes:
        size: Square crop side in px.
        p_reference: Share of undistorted (level 0) samples.
        include_shared: Use ../shared/data photos too (≥20 photos in all); bundled ones always.
    """

    size: int = 384
    p_reference: float = 0.1
    include_shared: bool = True


def generate_quality(start: int, count: int, seed: int = 0, cfg: QualityConfig = QualityConfig()) -> list[dict]:
    """Samples for slots ``start .. start + count - 1``; photos are visited round-robin."""
    paths = render.photo_paths(include_shared=cfg.include_shared)
    splits = photo_splits([name for name, _ in paths])
    names = list(DISTORTIONS)
    rows = []
    for slot in range(start, start + count):
        rng = np.random.default_rng([seed, slot, 23])
        photo = render.load_photo(*paths[slot % len(paths)])
        crop = render.cover_crop(photo.rgb, cfg.size, cfg.size, rng)
        if rng.random() < cfg.p_reference:
            distortion, level, out, occ = "none", 0, crop, []
        else:
            distortion = names[int(rng.integers(len(names)))]
            level = int(rng.choice(LEVELS))
            out, occ = distort(crop, distortion, level, rng)
        data = render.encode_jpeg_bytes(out, 95)
        label = DISTORTIONS[distortion][0] if distortion != "none" and level >= LABEL_FROM_LEVEL else None
        rows.append({
            "id": content_id(data), "image_bytes": data, "width": cfg.size, "height": cfg.size,
            "source": "synthetic:quality", "split": splits[photo.name],
            "labels": [label] if label else [],
            "boxes": [{"label": "quality_occluded", "x0": float(b[0]), "y0": float(b[1]),
                       "x1": float(min(b[2], cfg.size)), "y1": float(min(b[3], cfg.size))} for b in occ] if label else [],
            "quality": {"distortion": distortion, "level": level, "score": reference_score(distortion, level)},
            "attributes": {"photo": photo.name},
        })
    return rows
