"""QR codes generated with the ``qrcode`` package, pasted into stream-like 1280×720 frames."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import qrcode

from livelens.ocr.qr import decode_qr


def qr_image(payload: str, size: int) -> np.ndarray:
    q = qrcode.QRCode(border=2)
    q.add_data(payload)
    q.make(fit=True)
    img = np.asarray(q.make_image(fill_color="black", back_color="white").convert("RGB"))
    # INTER_AREA, as a stream encoder's downscale would, so small codes are blurry, not crisp.
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def frame_with(codes: list[tuple[str, int, int, int]], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frame = cv2.GaussianBlur((rng.random((720, 1280, 3)) * 255).astype(np.uint8), (21, 21), 0)
    for payload, size, x, y in codes:
        frame[y:y + size, x:x + size] = qr_image(payload, size)
    return frame


@pytest.mark.parametrize("size", [160, 60, 40])
def test_decodes_codes_of_several_sizes_with_boxes(size: int) -> None:
    codes = [("wx:abc12345", size, 1100, 520), ("https://t.cn/A6x", size, 90, 80)]
    ents = decode_qr(frame_with(codes))
    assert {e.value for e in ents} == {"wx:abc12345", "https://t.cn/A6x"}
    for e in ents:
        _, s, x, y = next(c for c in codes if c[0] == e.value)
        assert e.kind == "qrcode" and e.label == "ads_qrcode"
        # The box sits on the code (within the quiet zone's slack).
        assert abs(e.box[0] - x) < 0.2 * s + 4 and abs(e.box[3] - (y + s)) < 0.2 * s + 4
    # Big codes come from the first pass, small ones need the upscaled second pass.
    assert {e.source for e in ents} == ({"qr"} if size >= 160 else {"qr_upscaled"})


def test_small_codes_are_missed_without_second_pass() -> None:
    frame = frame_with([("wx:abc12345", 40, 700, 300)])
    assert decode_qr(frame, second_pass=False) == []
    assert [e.value for e in decode_qr(frame)] == ["wx:abc12345"]


def test_no_code_and_degenerate_frames_give_nothing() -> None:
    assert decode_qr(frame_with([])) == []
    assert decode_qr(np.zeros((720, 1280, 3), np.uint8)) == []
    assert decode_qr(np.zeros((1, 1, 3), np.uint8)) == []
    assert decode_qr(np.zeros((0, 0, 3), np.uint8)) == []
