"""Drawing primitives shared by the generators: fonts, text patches, QR codes, real photos.

Every function takes an explicit ``numpy.random.Generator`` so output is a pure function of
the seed. Overlay patches are RGBA images whose alpha marks exactly the pixels they cover;
generators paste them and take the box from the alpha, so boxes are right by construction.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from livelens.errors import ConfigError

FONT_PATH = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")
REPO = Path(__file__).resolve().parents[2]


@cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """WenQuanYi Micro Hei at ``size`` px: one font that renders Chinese and Latin.

    Raises:
        ConfigError: The font is not installed (Debian package ``fonts-wqy-microhei``).
    """
    if not FONT_PATH.is_file():
        raise ConfigError(
            f"font {FONT_PATH} is missing: install the Debian package fonts-wqy-microhei "
            "(scripts/setup.sh does) to generate text"
        )
    return ImageFont.truetype(str(FONT_PATH), max(6, int(size)))


def text_patch(
    text: str,
    size: int,
    fg: tuple[int, ...],
    bg: tuple[int, ...] | None = None,
    pad: float = 0.3,
    radius: float = 0.0,
    stroke: int = 0,
    stroke_fill: tuple[int, ...] = (0, 0, 0),
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Render one text line as an RGBA patch.

    Returns:
        The patch and the text's own box (x0, y0, x1, y1) inside it (the ink, without padding).
    """
    f = font(size)
    x0, y0, x1, y1 = f.getbbox(text, stroke_width=stroke)
    p = round(size * pad)
    w, h = int(x1 - x0) + 2 * p, int(y1 - y0) + 2 * p
    img = Image.new("RGBA", (max(w, 1), max(h, 1)), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    if bg is not None:
        bg = bg if len(bg) == 4 else (*bg, 255)
        d.rounded_rectangle([0, 0, w - 1, h - 1], radius=int(radius * h), fill=bg)
    fg = fg if len(fg) == 4 else (*fg, 255)
    d.text((p - x0, p - y0), text, font=f, fill=fg, stroke_width=stroke, stroke_fill=stroke_fill)
    return img, (float(p), float(p), float(p + x1 - x0), float(p + y1 - y0))


def qr_patch(payload: str, module_px: int, border: int = 2) -> Image.Image:
    """A real, decodable QR code (black on white, with a quiet zone) as RGBA."""
    import qrcode

    qr = qrcode.QRCode(border=border, error_correction=qrcode.constants.ERROR_CORRECT_M)
    qr.add_data(payload)
    qr.make(fit=True)
    m = np.array(qr.get_matrix(), dtype=bool)
    img = np.where(m, 0, 255).astype(np.uint8)
    img = np.kron(img, np.ones((module_px, module_px), np.uint8))
    rgba = np.dstack([img, img, img, np.full_like(img, 255)])
    return Image.fromarray(rgba, "RGBA")


def alpha_bbox(patch: Image.Image) -> tuple[int, int, int, int]:
    """Box (x0, y0, x1, y1) of the non-transparent pixels of an RGBA patch."""
    box = patch.getchannel("A").getbbox()
    return box if box else (0, 0, patch.width, patch.height)


@dataclass(frozen=True)
class Photo:
    """A real photograph available offline."""

    name: str
    rgb: np.ndarray


SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "camera.png", "rocket.jpg", "coins.png",
                  "hubble_deep_field.jpg", "motorcycle_left.png", "brick.png", "grass.png", "gravel.png", "moon.png")


@cache
def photo_paths(include_shared: bool = True) -> tuple[tuple[str, Path], ...]:
    """Names and files of the real photos: scikit-image's and scikit-learn's bundled images,
    plus ../shared/data's faces and ICDAR photos when present.

    Only paths are listed here; pixels are decoded on first use (:func:`load_photo`), so a
    worker that needs two photos does not pay for decoding forty.
    """
    from importlib.util import find_spec

    # Locate the wheels' data folders without importing skimage/sklearn (seconds of import time).
    items: list[tuple[str, Path]] = []
    folder = Path(find_spec("skimage").origin).parent / "data"
    items += [(f"skimage:{Path(n).stem}", folder / n) for n in SKIMAGE_PHOTOS if (folder / n).is_file()]
    sk_folder = Path(find_spec("sklearn").origin).parent / "datasets" / "images"
    items += [(f"sklearn:{p.stem}", p) for p in sorted(sk_folder.glob("*.jpg"))]
    if include_shared:
        root = shared_data_dir()
        if root is not None:
            for sub in ("faces", "icdar2015_toy/imgs"):
                items += [(f"shared:{sub.split('/')[0]}/{p.name}", p) for p in sorted((root / sub).glob("*.jpg"))]
    return tuple(items)


@cache
def load_photo(name: str, path: Path, max_side: int = 1024) -> Photo:
    """Decode one photo (cached per process), capped at ``max_side`` for a small footprint."""
    from livelens.imageio import load_image

    rgb = load_image(path)
    h, w = rgb.shape[:2]
    s = max_side / max(h, w)
    if s < 1:
        rgb = np.asarray(Image.fromarray(rgb).resize((round(w * s), round(h * s)), Image.BILINEAR))
    return Photo(name, np.ascontiguousarray(rgb))


def real_photos(include_shared: bool = True, max_side: int = 1024) -> tuple[Photo, ...]:
    """All real photos, decoded (see :func:`photo_paths`)."""
    return tuple(load_photo(n, p, max_side) for n, p in photo_paths(include_shared))


def shared_data_dir() -> Path | None:
    """../shared/data next to the repository (or ``$LIVELENS_SHARED/data``), if present."""
    import os

    root = Path(os.environ.get("LIVELENS_SHARED", REPO.parent / "shared")) / "data"
    return root if root.is_dir() else None


def cover_crop(rgb: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop with the target aspect ratio, resized to (height, width)."""
    h, w = rgb.shape[:2]
    target = width / height
    scale = rng.uniform(0.7, 1.0)
    if w / h > target:
        ch = int(h * scale)
        cw = int(ch * target)
    else:
        cw = int(w * scale)
        ch = int(cw / target)
    cw, ch = max(1, min(cw, w)), max(1, min(ch, h))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    crop = rgb[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.BILINEAR))


def procedural_scene(width: int, height: int, rng: np.random.Generator, kind: str | None = None) -> tuple[str, np.ndarray]:
    """A synthetic background: gradient room, bokeh, tiles, or noise terrain.

    Scenes are smooth, so they are drawn at a quarter of the size and upsampled: the full-size
    float maths was most of a frame's generation time.
    """
    kinds = ("gradient_room", "bokeh", "tiles", "terrain")
    kind = kind or kinds[int(rng.integers(len(kinds)))]
    w, h = max(8, width // 4), max(8, height // 4)
    c0, c1 = rng.integers(0, 256, 3).astype(np.float32), rng.integers(0, 256, 3).astype(np.float32)
    resample = Image.BILINEAR
    if kind == "gradient_room":
        t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        img = np.broadcast_to(c0 * (1 - t) + c1 * t, (h, w, 3)).copy()
        # A floor line and a few "furniture" blocks make it read as an indoor streaming room.
        img[int(h * rng.uniform(0.55, 0.8)) :] *= 0.75
        im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            d.rectangle([x0, y0, x0 + int(rng.integers(1, max(2, w // 3))), y0 + int(rng.integers(1, max(2, h // 3)))],
                        fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        img = np.asarray(im)
    elif kind == "bokeh":
        im = Image.new("RGB", (w, h), tuple(int(v) for v in c0 * 0.4))
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(15, 40))):
            r = int(rng.integers(1, max(2, h // 6)))
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(60, 256, 3)))
        img = np.asarray(im.filter(ImageFilter.GaussianBlur(max(1, h // 60))))
    elif kind == "tiles":
        period = int(rng.integers(max(2, min(w, h) // 30), max(4, min(w, h) // 6)))
        yy, xx = np.indices((h, w))
        checker = ((xx // period + yy // period) % 2)[..., None]
        img = (c0 * checker + c1 * (1 - checker)).astype(np.uint8)
        resample = Image.NEAREST
    else:
        # Smooth value noise: an upsampled random grid, the look of a game map / landscape.
        g = rng.random((h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
        big = np.asarray(Image.fromarray((g * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
        base = np.array([70, 110, 50], np.float32) if rng.random() < 0.6 else c0 * 0.6
        img = (base + (big - 128) * 0.5).clip(0, 255).astype(np.uint8)
    out = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((width, height), resample))
    return f"procedural:{kind}", np.ascontiguousarray(out)


#: Photos that show people (faces): a face detector's training frames must not show them unlabelled,
#: and ../shared/data/faces holds the face test set, which no training step may see.
PEOPLE_PHOTOS = frozenset({"skimage:astronaut", "skimage:camera"})
_PEOPLE_FREE: contextvars.ContextVar[bool] = contextvars.ContextVar("people_free", default=False)


def people_free_paths() -> tuple[tuple[str, Path], ...]:
    """:func:`photo_paths` without any photo of people (nor the shared faces and street scenes)."""
    return tuple((n, p) for n, p in photo_paths(include_shared=False) if n not in PEOPLE_PHOTOS)


@contextlib.contextmanager
def people_free() -> Iterator[None]:
    """Within this block, every photo background (PiP windows included) comes from :func:`people_free_paths`."""
    token = _PEOPLE_FREE.set(True)
    try:
        yield
    finally:
        _PEOPLE_FREE.reset(token)


def background(width: int, height: int, rng: np.random.Generator, photo_prob: float = 0.6) -> tuple[str, np.ndarray]:
    """A frame background: a crop of a real photo, or a procedural scene."""
    if rng.random() < photo_prob:
        paths = people_free_paths() if _PEOPLE_FREE.get() else photo_paths()
        p = load_photo(*paths[int(rng.integers(len(paths)))])
        return f"photo:{p.name}", cover_crop(p.rgb, width, height, rng)
    return procedural_scene(width, height, rng)


def encode_jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    """Deterministic JPEG bytes (no optimisation passes that depend on library state)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=2)
    return buf.getvalue()
