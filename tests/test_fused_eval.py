"""The held-out evaluation of the fused moderation path (classifier ∪ OCR entities ∪ QR), as /v1/analyze merges."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from livelens.errors import ManifestError
from livelens.ocr.entities import AUTHORITATIVE_LABELS
from livelens.train.fused_eval import evaluate_fused, format_fused_table, fuse_sigmoid, make_ocr_labeler

CLASSES = ("ads_none", "ads_phone", "ads_qrcode")


def test_fuse_sigmoid_lets_ocr_decide_its_authoritative_labels():
    probs = np.array([[0.2, 0.9, 0.8], [0.1, 0.7, 0.1]])
    classes = ["ads_none", "ads_wechat_id", "ads_watermark"]
    fused = fuse_sigmoid(probs, classes, [set(), {"ads_wechat_id"}], authoritative=["ads_wechat_id", "ads_none"])
    # Row 0: the classifier's unread WeChat id is dropped, its watermark kept; row 1: OCR read one.
    np.testing.assert_allclose(fused, [[0.2, 0.0, 0.8], [0.0, 1.0, 0.1]])


def test_fuse_sigmoid_raises_found_labels_and_clears_none():
    probs = np.array([[0.9, 0.1, 0.2], [0.8, 0.3, 0.1], [0.2, 0.7, 0.1]])
    fused = fuse_sigmoid(probs, CLASSES, [set(), {"ads_phone", "gore_blood"}, {"ads_none"}])
    assert np.array_equal(fused[0], probs[0])  # nothing found: the classifier's answer stands
    assert fused[1].tolist() == [0.0, 1.0, 0.1]  # found: on at 1.0, "none" off, unknown names ignored
    assert np.array_equal(fused[2], probs[2])  # OCR cannot "find" the negative class
    assert np.array_equal(probs[1], [0.8, 0.3, 0.1])  # the input is not modified
    with pytest.raises(ValueError, match="2 label sets for 3 rows"):
        fuse_sigmoid(probs, CLASSES, [set(), set()])


@pytest.fixture(scope="module")
def labeler():
    return make_ocr_labeler()


def _frame_with(text: str | None = None, qr: str | None = None) -> np.ndarray:
    from livelens.ocr.fonts import cjk_font

    img = Image.new("RGB", (960, 540), (40, 90, 60))
    d = ImageDraw.Draw(img)
    d.ellipse([600, 200, 900, 500], fill=(200, 160, 120))  # something that is not text
    if text:
        d.text((60, 60), text, font=cjk_font(36), fill=(255, 255, 255))
    if qr:
        import qrcode

        img.paste(qrcode.make(qr, box_size=4, border=2).convert("RGB"), (60, 300))
    return np.asarray(img)


def test_ocr_labeler_finds_phone_and_qr_and_nothing_on_a_clean_frame(labeler):
    assert "ads_phone" in labeler(_frame_with("加我电话 138 0013 8000"))["entities"]
    assert "ads_qrcode" in labeler(_frame_with(qr="https://example.com/join"))["entities"]
    assert labeler(_frame_with()) == {"entities": set()}


def test_evaluate_fused_on_generated_frames(labeler, tmp_path):
    from livelens.data import write_manifest
    from livelens.data.frames import FrameConfig, frames_card, generate_frames
    from livelens.taxonomy import load_taxonomy
    from livelens.train.classification import build_classifier

    cfg = FrameConfig()
    manifest = write_manifest(generate_frames(0, 10, seed=5, cfg=cfg), tmp_path / "frames", frames_card(5, 10, cfg),
                              contact_sheet=False)
    groups = ["ads", "game"]
    model = build_classifier("mobilenet_v2", "gated", load_taxonomy(), groups, pretrained=False)
    seen = []
    res = evaluate_fused(model, str(manifest), groups=groups, size=64, ocr_labeler=labeler, split="train", limit=5,
                         batch_size=2, progress=lambda d, n: seen.append((d, n)))
    assert res["rows"] == 5 and seen[-1] == (5, 5) and len(seen) == 3
    assert set(res["other_heads"]) == {"game"}
    assert res["authoritative"] == sorted(AUTHORITATIVE_LABELS)
    for lab, c in res["classifier"].items():
        f = res["fused"][lab]
        assert c["support"] == f["support"] == res["ocr"][lab]["support"]
        if lab in AUTHORITATIVE_LABELS:  # OCR decides these alone, as in the gateway
            assert f == res["ocr"][lab]
        elif lab != "ads_none":  # elsewhere a union only adds positives
            assert f["recall"] >= c["recall"]
    table = format_fused_table(res)
    assert table.splitlines()[0].startswith("| label | support |")
    with pytest.raises(ManifestError, match="no rows in split 'nope'"):
        evaluate_fused(model, str(manifest), groups=groups, size=64, ocr_labeler=labeler, split="nope")
    with pytest.raises(ManifestError, match="no sigmoid 'ads' head"):
        evaluate_fused(build_classifier("mobilenet_v2", "avg", load_taxonomy(), ["game"], pretrained=False),
                       str(manifest), groups=["game"], size=64, ocr_labeler=labeler)


def test_evaluate_fused_reports_each_source_left_out(tmp_path):
    from livelens.data import write_manifest
    from livelens.data.frames import FrameConfig, frames_card, generate_frames
    from livelens.taxonomy import load_taxonomy
    from livelens.train.classification import build_classifier

    cfg = FrameConfig()
    manifest = write_manifest(generate_frames(0, 8, seed=5, cfg=cfg), tmp_path / "frames", frames_card(5, 8, cfg),
                              contact_sheet=False)
    model = build_classifier("mobilenet_v2", "avg", load_taxonomy(), ["ads"], pretrained=False)
    # Two sources: "regions" calls every frame a watermark, "entities" finds nothing.
    res = evaluate_fused(model, str(manifest), groups=["ads"], size=64, split="train",
                         ocr_labeler=lambda img: {"entities": set(), "regions": {"ads_watermark"}})
    assert res["sources"] == ["entities", "regions"]
    assert res["fused"]["ads_watermark"]["precision"] == res["ocr"]["ads_watermark"]["precision"]
    assert res["fused"]["ads_none"]["recall"] == 0.0  # every frame got a label from the regions
    without = res["fused_without"]["regions"]
    assert without["ads_watermark"] == res["classifier"]["ads_watermark"]
    assert res["fused_without"]["entities"]["ads_watermark"] == res["fused"]["ads_watermark"]
