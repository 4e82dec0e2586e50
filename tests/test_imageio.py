"""Safe decoding: every accepted format normalises to RGB uint8, and bad input is typed."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from livelens.errors import ImageTooLargeError, InvalidImageError, UnsupportedMediaTypeError
from livelens.imageio import EncodedImage, ImageLimits, as_rgb, decode_image, load_image, probe_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 48, h: int = 32) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    return Image.fromarray(np.stack([x, x[::-1, ::-1], np.full_like(x, 80)], -1))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_accepted_formats_decode_to_rgb(fmt):
    arr = decode_image(_encode(_gradient(), fmt))
    assert arr.shape == (32, 48, 3) and arr.dtype == np.uint8
    # The left-to-right ramp of the red channel survives every codec.
    assert arr[:, -1, 0].mean() > arr[:, 0, 0].mean() + 150


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16"])
def test_modes_normalise(mode):
    src = _gradient()
    if mode == "I;16":
        gray = (np.asarray(src.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        img = Image.fromarray(gray)  # 16-bit grayscale PNG
    else:
        img = src.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    arr = decode_image(_encode(img, fmt))
    assert arr.shape == (32, 48, 3) and arr.dtype == np.uint8
    assert arr.max() > 150  # not collapsed to black by a bad 16-bit or alpha conversion


def test_exif_orientation_is_applied():
    img = _gradient(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    arr = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert arr.shape == (40, 20, 3)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 0, 250))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    arr = decode_image(buf.getvalue())
    assert arr[8, 8, 0] > 200 and arr[8, 8, 2] < 50


def _png_header_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height but whose data is tiny."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", InvalidImageError),
        (b"this is not an image at all", InvalidImageError),
        (_png_header_bomb(20000, 20000), ImageTooLargeError),
        (b"x" * 2048, InvalidImageError),
    ],
)
def test_bad_payloads_are_typed(payload, error):
    with pytest.raises(error):
        decode_image(payload)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", InvalidImageError),
        (b"this is not an image at all", InvalidImageError),
        (_png_header_bomb(20000, 20000), ImageTooLargeError),
        (b"GIF89a" + b"x" * 10, InvalidImageError),
    ],
)
def test_probe_refuses_from_the_header_what_decode_refuses(payload, error):
    with pytest.raises(error):
        probe_image(payload)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_probe_reports_the_size_decode_will_give(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_gradient(40, 20), "JPEG", exif=exif.tobytes())
    enc = probe_image(data)
    arr = as_rgb(enc)
    assert arr.shape[:2] == (enc.height, enc.width) and enc.format == "JPEG"
    assert np.array_equal(arr, decode_image(data))


def test_probed_truncated_jpeg_fails_typed_when_decoded(shared_data):
    from skimage import data

    # A real photo cut in half keeps its header: the probe passes and the pixels are what is broken.
    whole = _encode(Image.fromarray(data.astronaut()), "JPEG")
    enc = probe_image(whole[: len(whole) // 2])
    assert (enc.width, enc.height) == (512, 512)
    with pytest.raises(InvalidImageError, match=r"truncated|corrupt"):
        enc.decode()
    # ../shared's truncated JPEG is cut inside its header, so the probe already refuses it.
    with pytest.raises(InvalidImageError, match=r"truncated|corrupt"):
        probe_image((shared_data / "broken" / "broken.jpg").read_bytes()).decode()


def test_as_rgb_passes_arrays_through():
    arr = np.zeros((4, 5, 3), np.uint8)
    assert as_rgb(arr) is arr
    assert isinstance(probe_image(_encode(_gradient(), "PNG")), EncodedImage)


def test_byte_limit_is_checked_before_decoding():
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode_image(_encode(_gradient(), "PNG"), ImageLimits(max_bytes=100))


def test_truncated_real_jpeg_is_rejected(shared_data):
    with pytest.raises(InvalidImageError, match=r"truncated|corrupt"):
        load_image(shared_data / "broken" / "broken.jpg")


def test_unsupported_format_is_415():
    with pytest.raises(UnsupportedMediaTypeError) as err:
        decode_image(_encode(_gradient(), "TIFF"))
    assert err.value.http_status == 415


def test_load_image_accepts_arrays_and_rejects_other_types():
    assert load_image(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    assert load_image(np.ones((4, 5, 4), np.float32)).max() == 255
    assert load_image(np.full((2, 2, 3), 65535, np.uint16)).max() == 255
    with pytest.raises(InvalidImageError):
        load_image(np.zeros((4, 5, 7), np.uint8))
    with pytest.raises(InvalidImageError):
        load_image(12345)  # type: ignore[arg-type]


@pytest.mark.parametrize("ink", [0, 255])
def test_transparent_background_contrasts_with_the_content(ink):
    """Black (or white) text on a transparent PNG stays visible after normalisation."""
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[5:15, 5:35, :3] = ink
    rgba[5:15, 5:35, 3] = 255
    arr = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert abs(int(arr[10, 20, 0]) - int(arr[1, 1, 0])) == 255


def test_real_black_text_on_transparent_png_is_visible(shared_data):
    arr = load_image(shared_data / "zh_text" / "black_font_color_transparent.png")
    assert arr.min() < 60 and arr.max() > 200  # dark glyphs on a light background
