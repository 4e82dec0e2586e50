"""Quality datasets: read the data owner's LIVE/TID-style manifest, or generate a small one here.

The contract (docs/contracts.md) is a manifest whose rows carry ``quality`` =
``{distortion, level, score}`` and ``attributes.photo`` (the source photo, so splits are
photo-disjoint). :func:`quality_rows` reads its metadata (training featurises the pixels in Ray tasks). Until ``runs/data/quality`` exists,
:func:`generate_quality_set` builds the same kind of rows from real photos bundled with
scikit-image, scikit-learn and ../shared/data, scoring each distortion by SSIM against its
pristine photo (a full-reference stand-in for LIVE's DMOS).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from livelens.errors import ManifestError
from livelens.quality import distort as D
from livelens.quality.measures import luminance

#: Distortion → level (1 = mild … 5 = strong) → function of the photo.
DISTORTIONS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "gaussian_blur": lambda im, lv: D.gaussian_blur(im, [0.6, 1.2, 2.0, 3.2, 5.0][lv - 1]),
    "motion_blur": lambda im, lv: D.motion_blur(im, [3, 6, 10, 16, 24][lv - 1], angle_deg=15.0 * lv),
    "gaussian_noise": lambda im, lv: D.gaussian_noise(im, [4, 8, 14, 22, 35][lv - 1], seed=lv),
    "jpeg": lambda im, lv: D.jpeg(im, [40, 20, 10, 6, 3][lv - 1]),
    "dark": lambda im, lv: D.exposure(im, [0.7, 0.5, 0.35, 0.22, 0.12][lv - 1]),
    "bright": lambda im, lv: D.exposure(im, [1.3, 1.6, 2.0, 2.6, 3.5][lv - 1]),
}


@dataclass
class QualitySample:
    """One (possibly distorted) image with its reference quality."""

    image: np.ndarray
    photo: str
    distortion: str
    level: int
    score: float
    split: str


def real_photos(shared: Path | None = None, side: int = 512) -> dict[str, np.ndarray]:
    """Real photos available offline, resized to long side ``side``: scikit-image, scikit-learn, ../shared/data."""
    from skimage import data as skd
    from sklearn.datasets import load_sample_images

    photos: dict[str, np.ndarray] = {}
    for name in ("astronaut", "coffee", "chelsea", "camera", "rocket", "immunohistochemistry", "coins", "page",
                 "brick", "grass", "gravel", "moon"):
        img = getattr(skd, name)()
        photos[name] = img if img.ndim == 3 else np.repeat(img[:, :, None], 3, axis=2)
    for fname, img in zip(load_sample_images().filenames, load_sample_images().images, strict=True):
        photos[Path(fname).stem] = img
    if shared is not None:
        for sub in ("faces", "icdar2015_toy", "ocr_demo"):
            for p in sorted((shared / sub).rglob("*.jpg")):
                img = cv2.imread(str(p), cv2.IMREAD_COLOR)
                if img is not None:
                    photos[f"{sub}/{p.stem}"] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    out = {}
    for k, img in photos.items():
        h, w = img.shape[:2]
        s = min(1.0, side / max(h, w))
        out[k] = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA) if s < 1 else img
    return out


def photo_split(photo: str, test_percent: int = 30) -> str:
    """Deterministic photo-level split, so held-out photos are never seen in training."""
    return "test" if zlib.crc32(photo.encode()) % 100 < test_percent else "train"


def ssim_score(ref: np.ndarray, img: np.ndarray) -> float:
    """Full-reference quality 0–100: SSIM of the luminance, as a stand-in for a subjective score."""
    from skimage.metrics import structural_similarity

    return float(100.0 * max(0.0, structural_similarity(luminance(ref), luminance(img), data_range=255,
                                                        gaussian_weights=True, sigma=1.5)))


def generate_quality_set(photos: dict[str, np.ndarray], levels: tuple[int, ...] = (1, 2, 3, 4, 5),
                         distortions: tuple[str, ...] | None = None) -> list[QualitySample]:
    """Every photo × distortion × level, plus the pristine photo (score 100)."""
    out = []
    for name, ref in photos.items():
        split = photo_split(name)
        out.append(QualitySample(ref, name, "none", 0, 100.0, split))
        for dist in distortions or tuple(DISTORTIONS):
            for lv in levels:
                img = DISTORTIONS[dist](ref, lv)
                out.append(QualitySample(img, name, dist, lv, ssim_score(ref, img), split))
    return out


def quality_rows(path: str | Path) -> list[dict]:
    """Metadata of the quality rows of a manifest, without pixels.

    Each dict has ``index`` (row number in the manifest), ``photo``, ``distortion``, ``level``,
    ``score`` and ``split``. The split is recomputed from ``attributes.photo`` (falling back to the
    row's ``split``) so that train and test never share a source photo.

    Raises:
        ManifestError: Missing/corrupt manifest or no quality rows.
    """
    from livelens.data.manifest import read_manifest

    table = read_manifest(path, columns=["id", "split", "quality", "attributes"])
    out = []
    for i, r in enumerate(table.to_pylist()):
        q = r.get("quality")
        if not q:
            continue
        try:
            attrs = json.loads(r.get("attributes") or "{}")
        except json.JSONDecodeError:
            attrs = {}
        photo = str(attrs.get("photo") or r["id"])
        split = photo_split(photo) if attrs.get("photo") else (r.get("split") or "train")
        out.append({"index": i, "photo": photo, "distortion": str(q["distortion"]), "level": int(q["level"]),
                    "score": float(q["score"]), "split": "test" if split in ("test", "val") else "train"})
    if not out:
        raise ManifestError(f"manifest {path} has no rows with a quality struct")
    return out
