"""Classical quality measures on real photos (scikit-image's bundled images) with planted distortions."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image
from skimage import data
from skimage.measure import blur_effect

from livelens.errors import InvalidImageError
from livelens.imageio import decode_image, encode_png
from livelens.quality import LABELS, Thresholds, assess
from livelens.quality import distort as D
from livelens.quality.measures import crete_blur, luminance
from livelens.taxonomy import load_taxonomy

PHOTOS = ("camera", "astronaut", "coffee", "chelsea")


def _photo(name: str) -> np.ndarray:
    img = getattr(data, name)()
    return img if img.ndim == 3 else np.repeat(img[:, :, None], 3, axis=2)


@pytest.fixture(scope="module", params=PHOTOS)
def photo(request) -> np.ndarray:
    return _photo(request.param)


def _strictly_increasing(values: list[float]) -> bool:
    return all(b > a for a, b in itertools.pairwise(values))


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_crete_axes_match_scikit_image_blur_effect():
    gray = data.camera()
    ours = crete_blur(gray, angles=(0, 90))
    ref = blur_effect(gray, reduce_func=None)  # per numpy axis: [y, x]
    np.testing.assert_allclose([ours[90], ours[0]], ref, atol=1e-5)


def test_brightness_monotonic_in_exposure_and_gamma(photo):
    by_gain = [assess(D.exposure(photo, g))["brightness"]["score"] for g in (0.2, 0.5, 1.0, 1.6, 2.5)]
    by_gamma = [assess(D.gamma(photo, g))["brightness"]["score"] for g in (3.0, 1.8, 1.0, 0.6, 0.35)]
    assert _strictly_increasing(by_gain), by_gain
    assert _strictly_increasing(by_gamma), by_gamma
    dark, bright = assess(D.exposure(photo, 0.2))["brightness"], assess(D.exposure(photo, 4.0))["brightness"]
    assert dark["dark"] and not dark["bright"] and "quality_dark" in assess(D.exposure(photo, 0.2))["labels"]
    assert bright["bright"] and not bright["dark"]


def test_blur_monotonic_in_defocus_and_motion(photo):
    by_sigma = [assess(D.gaussian_blur(photo, s))["blur"]["score"] for s in (0, 0.5, 1.0, 2.0, 3.0)]
    by_length = [assess(D.motion_blur(photo, n, angle_deg=30))["blur"]["score"] for n in (1, 5, 9, 15)]
    assert _strictly_increasing(by_sigma), by_sigma
    assert _strictly_increasing(by_length), by_length
    assert not assess(photo)["blur"]["flag"]
    assert assess(D.gaussian_blur(photo, 3.0))["blur"]["flag"]


def test_real_motion_blur_clock_flagged_sharp_camera_not():
    clock, camera = assess(data.clock())["blur"], assess(data.camera())["blur"]
    assert clock["flag"] and clock["motion"], clock
    assert not camera["flag"], camera
    assert clock["score"] > camera["score"] + 0.3


@pytest.mark.parametrize("kind", ["block", "sticker", "hand"])
def test_occlusion_box_overlaps_planted_occluder(photo, kind):
    for seed in (1, 2):
        img, box = D.plant_occluder(photo, 0.15, kind, seed=seed)
        occ = assess(img)["occlusion"]
        assert occ["flag"], (kind, seed, occ)
        assert _iou(occ["box"], box) >= 0.5, (kind, seed, occ["box"], box)


def test_clean_photos_not_occluded_and_letterbox_is_not_occlusion(photo):
    assert not assess(photo)["occlusion"]["flag"]
    letterboxed = np.zeros((photo.shape[0] + 120, photo.shape[1], 3), np.uint8)
    letterboxed[60:-60] = photo
    assert not assess(letterboxed)["occlusion"]["flag"]


def test_brightness_ignores_black_ui_frame_around_bright_video():
    video = D.gamma(_photo("coffee"), 0.5)  # a bright picture
    frame = np.zeros((720, 1280, 3), np.uint8)
    frame[200:520, 400:880] = np.asarray(Image.fromarray(video).resize((480, 320)))
    frame[20:40, 20:300] = 200  # UI text bar on the black frame
    framed, alone = assess(frame)["brightness"], assess(video)["brightness"]
    assert not framed["dark"]
    assert abs(framed["score"] - alone["score"]) < 0.08, (framed, alone)


def test_black_screen_and_dark_scene_are_told_apart():
    black = assess(np.full((360, 640, 3), 3, np.uint8))
    assert black["black"]["flag"] and black["labels"] == ["quality_black"]
    night = assess(D.exposure(_photo("astronaut"), 0.3))
    assert not night["black"]["flag"]
    # A noisy encoder-black frame is black; a real scene at 10 % exposure is dark, not black.
    noisy = np.clip(np.random.default_rng(0).normal(8, 1.5, (540, 960, 3)), 0, 255).astype(np.uint8)
    assert assess(noisy)["labels"] == ["quality_black"]
    for name in ("coffee", "camera"):
        very_dark = assess(D.exposure(_photo(name), 0.1))
        assert not very_dark["black"]["flag"] and "quality_dark" in very_dark["labels"], name


def test_noise_and_compression_respond_to_their_level():
    img = _photo("astronaut")
    sigmas = [assess(D.gaussian_noise(img, s))["noise"]["sigma"] for s in (0, 5, 10, 20)]
    blocks = [assess(D.jpeg(img, q))["compression"]["ratio"] for q in (90, 40, 15, 5)]
    assert _strictly_increasing(sigmas), sigmas
    assert _strictly_increasing(blocks), blocks
    assert assess(D.gaussian_noise(img, 20))["noise"]["flag"] and not assess(img)["noise"]["flag"]
    assert assess(D.jpeg(img, 5))["compression"]["flag"] and not assess(img)["compression"]["flag"]


def test_labels_are_taxonomy_leaves_and_thresholds_are_tunable():
    tax = load_taxonomy()
    assert set(LABELS.values()) <= set(tax.groups["quality"].positives)
    img = D.gaussian_blur(_photo("camera"), 1.0)
    assert not assess(img)["blur"]["flag"]
    assert assess(img, thresholds=Thresholds(blur=0.1))["blur"]["flag"]


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((1, 1, 3), np.uint8),
        np.full((1, 1), 255, np.uint8),
        np.full((240, 320, 3), 128, np.uint8),
        np.full((2, 500, 3), 255, np.uint8),
        (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16),
        np.random.default_rng(0).random((50, 70, 4)),
    ],
    ids=["1x1", "1x1-gray", "constant", "2-rows", "uint16", "float-rgba"],
)
def test_degenerate_images_give_defined_json_results(image):
    out = assess(image)
    json.dumps(out)  # JSON-friendly: plain floats/bools/lists only
    for key in ("brightness", "blur", "occlusion", "black", "noise", "compression"):
        assert 0.0 <= out[key]["score"] <= 1.0 or key == "noise", (key, out[key])
        assert np.isfinite(out[key]["score"])
        assert isinstance(out[key]["flag"], bool)


def test_sixteen_bit_png_decodes_and_is_assessed():
    ramp = (np.linspace(0, 60000, 128 * 96).reshape(96, 128)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    rgb = decode_image(buf.getvalue())
    out = assess(buf.getvalue())
    assert out["size"] == [128, 96] and rgb.dtype == np.uint8
    assert 0.2 < out["brightness"]["score"] < 0.8
    # The same frame through bytes or through an array gives the same answer.
    assert assess(rgb)["brightness"] == out["brightness"]


def test_constant_grey_is_not_black_but_uniform_white_is_bright():
    grey = assess(np.full((200, 300, 3), 128, np.uint8))
    white = assess(np.full((200, 300, 3), 255, np.uint8))
    assert not grey["black"]["flag"] and not grey["brightness"]["flag"]
    assert white["brightness"]["bright"]
    assert luminance(np.full((2, 2, 3), 255, np.uint8)).max() == 255


@pytest.mark.parametrize("bad", [b"", b"not an image", "no/such/file.png", np.zeros((0, 5, 3), np.uint8), 42])
def test_bad_input_raises_typed_error(bad):
    with pytest.raises(InvalidImageError):
        assess(bad)


def test_png_bytes_round_trip_matches_array():
    img = _photo("chelsea")
    assert assess(encode_png(img))["blur"] == assess(img)["blur"]
