"""The PP-OCR backend on real images: exact reads, detect/recognise split, batching, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from livelens.errors import InvalidArgumentError, InvalidImageError
from livelens.imageio import load_image
from livelens.ocr import OcrEngine, PpOcrEngine, create_engine, crop_lines


@pytest.fixture(scope="module")
def engine() -> PpOcrEngine:
    # Model load is a few seconds: one engine for the module.
    return create_engine("ppocr")


def test_engine_satisfies_protocol(engine: PpOcrEngine) -> None:
    assert isinstance(engine, OcrEngine) and engine.name == "ppocr"


def test_reads_text_rec_exactly(engine: PpOcrEngine, shared_data) -> None:
    img = load_image(shared_data / "zh_text" / "text_rec.jpg")
    assert engine.recognize([img])[0][0] == "韩国小馆"


def test_upside_down_line_is_turned_by_classifier(engine: PpOcrEngine, shared_data) -> None:
    img = load_image(shared_data / "zh_text" / "text_cls.jpg")
    assert engine.recognize([img])[0][0] == "怪我咯"
    assert engine.recognize([img], use_cls=False)[0][0] != "怪我咯"


def test_detect_crop_recognize_equals_read(engine: PpOcrEngine, shared_data) -> None:
    path = shared_data / "zh_text" / "ch_en_num.jpg"
    img = load_image(path)
    (boxes,) = engine.detect([img])
    assert 17 <= len(boxes) <= 19
    for b in boxes:
        assert len(b.polygon) == 4 and b.box[0] <= b.box[2] and b.box[1] <= b.box[3]
        assert b.box[0] >= 0 and b.box[2] <= img.shape[1] and b.box[3] <= img.shape[0]
    rec = engine.recognize(crop_lines(img, boxes))
    (lines,) = engine.read([path])
    assert lines[0].text == "正品促销"
    assert 17 <= len(lines) <= 18
    assert [ln.text for ln in lines] == [t for t, s in rec if t.strip() and s >= engine.text_score]


def test_batch_keeps_order_and_bad_frames_are_empty(engine: PpOcrEngine, shared_data) -> None:
    text = shared_data / "zh_text" / "text_rec.jpg"
    empty, one_px, black = np.zeros((0, 0, 3), np.uint8), np.zeros((1, 1, 3), np.uint8), np.zeros((360, 640, 3), np.uint8)
    out = engine.read([empty, text, one_px, black])
    assert [[ln.text for ln in r] for r in out] == [[], ["韩国小馆"], [], []]
    # PP-OCR's detector alone misses the tight text_rec crop; on a padded canvas it finds it.
    assert out[1][0].box[2] - out[1][0].box[0] >= 300 and out[1][0].box[2] <= 362
    assert PpOcrEngine.plain().detect([text]) == [[]]
    # Without the padding, the line fallback recognises the line-shaped image whole.
    (lines,) = PpOcrEngine(max_upscale=None).read([text])
    assert [(ln.text, ln.box) for ln in lines] == [("韩国小馆", [0.0, 0.0, 362.0, 78.0])]
    assert engine.detect([one_px, black]) == [[], []]
    assert engine.recognize([]) == []
    assert engine.recognize([np.zeros((1, 1, 3), np.uint8)]) == [("", 0.0)]


def test_corrupt_input_raises_typed_error(engine: PpOcrEngine, shared_data) -> None:
    with pytest.raises(InvalidImageError):
        engine.read([shared_data / "broken" / "broken.jpg"])
    with pytest.raises(InvalidImageError):
        engine.read([b"not an image"])
    with pytest.raises(InvalidArgumentError):
        create_engine("tesseract")


def test_onnx_sessions_do_not_spin_and_keep_their_models(engine: PpOcrEngine) -> None:
    """Every stage's ONNX Runtime session was rebuilt without spinning workers, from the same model file."""
    from livelens.ocr.engine import PPOCR_MODEL_FILES

    stages = {"det": engine._det_ocr.text_det, "cls": engine._cls, "rec": engine._rec}
    for name, stage in stages.items():
        sess = stage.session.session
        assert sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0", name
        assert sess._model_path.endswith(PPOCR_MODEL_FILES[name]), name
