"""Safe image decoding: one entry point for every image that enters livelens.

Everything is normalised to an RGB ``uint8`` array of shape (H, W, 3):
EXIF orientation is applied; grayscale, palette, CMYK, alpha and 16-bit images are
converted; animated formats give their first frame. Byte and pixel limits are checked
*before* pixels are decoded, so a decompression bomb costs a header read, not memory.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from livelens.errors import ImageTooLargeError, InvalidImageError, UnsupportedMediaTypeError

#: Formats we accept, as Pillow names them.
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "MPO"})


@dataclass(frozen=True)
class ImageLimits:
    """Input limits, stated up front as the big vision APIs do.

    Attributes:
        max_bytes: Largest encoded payload.
        max_pixels: Largest width × height; 40 MP covers 8K frames.
        max_side: Largest single side.
        min_side: Smallest single side (1 keeps tiny images legal; callers may raise it).
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 16_384
    min_side: int = 1


DEFAULT_LIMITS = ImageLimits()


def _contrasting_background(rgba: Image.Image) -> tuple[int, int, int, int]:
    """White behind dark content, black behind light content.

    A fixed black background would make black text on a transparent PNG (a common overlay
    and sticker format) vanish; picking the contrasting colour keeps it readable for OCR.
    """
    arr = np.asarray(rgba)
    visible = arr[..., 3] > 127
    if not visible.any():
        return (0, 0, 0, 255)
    luma = arr[..., :3][visible].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return (255, 255, 255, 255) if float(luma.mean()) < 128 else (0, 0, 0, 255)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing alpha onto black."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer: scale the actual range to 8 bits rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0.0
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        arr8 = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = float(arr.min()), float(arr.max())
        arr8 = np.zeros(arr.shape, np.uint8) if hi <= lo else ((arr - lo) / (hi - lo) * 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _contrasting_background(rgba)), rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


_EXIF_ORIENTATION = 0x0112


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels or max(width, height) > limits.max_side:
        raise ImageTooLargeError(
            f"image is {width}x{height} ({width * height} px); the limit is {limits.max_pixels} px "
            f"and {limits.max_side} px per side"
        )
    if min(width, height) < limits.min_side:
        raise InvalidImageError(f"image is {width}x{height}; the smallest side must be ≥{limits.min_side} px")


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """Open (not decode) encoded bytes, checking bytes, format and pixel limits."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidImageError(f"expected encoded image bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidImageError("empty payload: zero bytes")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"payload is {len(data)} bytes; the limit is {limits.max_bytes}")
    with warnings.catch_warnings():
        # Pillow's own bomb warning is replaced by our explicit limit check below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    fmt = img.format
    if fmt not in ACCEPTED_FORMATS:
        raise UnsupportedMediaTypeError(
            f"image format {fmt} is not accepted; use one of {sorted(ACCEPTED_FORMATS - {'MPO'})}"
        )
    _check_size(*img.size, limits)
    return img


def _guarded(fn, data: bytes, limits: ImageLimits):
    """Run ``fn(data, limits)`` turning Pillow's many failure types into our typed errors."""
    try:
        return fn(data, limits)
    except (UnsupportedMediaTypeError, ImageTooLargeError, InvalidImageError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError("not an image: the bytes match no known image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise InvalidImageError(f"corrupt or truncated image: {exc}") from exc


def _decode(data: bytes, limits: ImageLimits) -> np.ndarray:
    img = _open(data, limits)
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img.load()
    # exif_transpose copies the whole image even when there is nothing to turn (a fifth of
    # the gateway's decode time for 640x360 frames), so it runs only for a real orientation.
    if img.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1):
        img = ImageOps.exif_transpose(img) or img
    return np.asarray(_to_rgb(img), dtype=np.uint8)


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode encoded image bytes into an RGB uint8 array.

    Args:
        data: The encoded image (JPEG, PNG, WebP, BMP or GIF).
        limits: Byte and pixel limits checked before decoding pixels.

    Returns:
        An array of shape (H, W, 3), dtype uint8, with EXIF orientation applied.

    Raises:
        InvalidImageError: Empty, truncated, corrupt or not an image.
        UnsupportedMediaTypeError: A real image in a format we do not accept (e.g. TIFF).
        ImageTooLargeError: Over the byte or pixel limits.
    """
    arr = _guarded(_decode, data, limits)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidImageError(f"decoded to an unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


@dataclass(frozen=True)
class EncodedImage:
    """Image bytes whose header passed the checks; decoded only where the pixels are needed.

    The gateway hands these to the capability deployments instead of decoded arrays: a 640x360
    frame is about 20 KB encoded against 691 KB decoded, and a Serve handle call carrying the array
    took 3.3 ms against 1.3 ms for the bytes (measured here), on both sides of the hop.

    Attributes:
        data: The encoded bytes.
        width: Width after EXIF orientation.
        height: Height after EXIF orientation.
        format: Pillow's format name.
        limits: The limits the header was checked against (decoding re-checks them).
    """

    data: bytes
    width: int
    height: int
    format: str
    limits: ImageLimits = DEFAULT_LIMITS

    def decode(self) -> np.ndarray:
        """The RGB array; raises :class:`InvalidImageError` for a truncated or corrupt body."""
        return decode_image(self.data, self.limits)


def _probe(data: bytes, limits: ImageLimits) -> EncodedImage:
    img = _open(data, limits)
    w, h = img.size
    # Orientations 5-8 turn the picture by 90 degrees: the decoded array is h x w.
    if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
        w, h = h, w
    return EncodedImage(bytes(data), w, h, str(img.format), limits)


def probe_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> EncodedImage:
    """Check bytes, format and size from the header alone, without decoding pixels.

    Raises the same typed errors as :func:`decode_image` for everything a header shows; a body
    that is truncated or corrupt past the header fails later, in :meth:`EncodedImage.decode`.
    """
    return _guarded(_probe, data, limits)


def as_rgb(image: np.ndarray | EncodedImage) -> np.ndarray:
    """Pixels of a frame handed between deployments: decoded arrays pass through, bytes are decoded."""
    return image.decode() if isinstance(image, EncodedImage) else image


def read_image_file(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """An image file's bytes, checked to exist and to be within ``limits.max_bytes`` before reading.

    Raises:
        InvalidImageError: No such file.
        ImageTooLargeError: The file is over the byte limit.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidImageError(f"no such image file: {path}")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ImageTooLargeError(f"{path} is {size} bytes; the limit is {limits.max_bytes}")
    return path.read_bytes()


def load_image(src: bytes | str | Path | np.ndarray | Image.Image, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Load an image from bytes, a path, a Pillow image or an array; see :func:`decode_image`.

    Arrays may be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), uint8 or uint16 or float in [0, 1].
    """
    if isinstance(src, bytes | bytearray | memoryview):
        return decode_image(bytes(src), limits)
    if isinstance(src, str | Path):
        return decode_image(read_image_file(src, limits), limits)
    if isinstance(src, Image.Image):
        _check_size(*src.size, limits)
        return np.ascontiguousarray(np.asarray(_to_rgb(src), dtype=np.uint8))
    if isinstance(src, np.ndarray):
        return array_to_rgb(src, limits)
    raise InvalidImageError(f"cannot load an image from {type(src).__name__}")


def array_to_rgb(arr: np.ndarray, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Normalise an in-memory array to RGB uint8 (H, W, 3)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.size == 0:
        raise InvalidImageError(f"array of shape {arr.shape} is not an image")
    _check_size(arr.shape[1], arr.shape[0], limits)
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        arr = (arr[:, :, :3].astype(np.float32) * alpha).round().astype(np.uint8)
    return np.ascontiguousarray(arr)


def thumbnail_jpeg(rgb: np.ndarray, side: int, quality: int = 80) -> bytes:
    """``rgb`` shrunk (never enlarged) to at most ``side`` pixels on its long side, as JPEG bytes."""
    import cv2

    h, w = rgb.shape[:2]
    s = min(1.0, side / max(h, w))
    if s < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return encode_jpeg(rgb, quality=quality)


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """Encode an RGB uint8 array as JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an RGB (or L) uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()
