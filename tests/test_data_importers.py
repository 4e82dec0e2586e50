"""Importers: the real sets in ../shared/data with the right counts, and the user formats
(class folders, COCO, MMOCR, Label Studio) on small generated files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from livelens.data import importers as im
from livelens.data.manifest import read_manifest, write_manifest
from livelens.errors import ManifestError
from livelens.imageio import encode_jpeg


def _img(path, w=64, h=48, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    path.write_bytes(encode_jpeg(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
    return path


@pytest.mark.shared
def test_icdar_toy_detection(shared_data, tmp_path):
    rows = im.import_mmocr_textdet(shared_data / "icdar2015_toy" / "textdet_test.json")
    truth = json.loads((shared_data / "icdar2015_toy" / "textdet_test.json").read_text())["data_list"]
    assert len(rows) == 10 == len(truth)
    assert im.count_texts(rows) == sum(len(d["instances"]) for d in truth)
    assert im.count_texts(rows, include_ignored=False) == sum(
        not i["ignore"] for d in truth for i in d["instances"])
    out = write_manifest(rows, tmp_path / "icdar", {"name": "icdar2015_toy"})
    assert read_manifest(out).num_rows == 10


@pytest.mark.shared
def test_word_crops_zh_text_faces_and_bundled(shared_data):
    words = im.import_mmocr_textrecog(shared_data / "word_crops" / "labels.json")
    assert len(words) == 10
    assert {r["texts"][0]["text"] for r in words} >= {"GRAND", "HOTEL", "PACIFIC"}
    zh = im.import_zh_text(shared_data / "zh_text")
    # 11 files, two of them byte-identical (text_det.jpg == ch_en_num.jpg): one row, one alias.
    assert len(zh) == 10
    by_file = {r["attributes"]["file"]: r for r in zh}
    assert by_file["text_rec.jpg"]["texts"][0]["text"] == "韩国小馆"
    assert by_file["empty_black.jpg"]["labels"] == ["quality_black"]
    faces = im.import_dlib_xml(shared_data / "faces" / "training.xml") + im.import_dlib_xml(
        shared_data / "faces" / "testing.xml")
    assert sum(len(r["attributes"]["faces"]) for r in faces) == 43
    bundled = im.import_bundled()
    assert len(bundled) == 14 and {r["source"] for r in bundled} == {"skimage", "sklearn"}


@pytest.mark.shared
def test_broken_image_is_a_clear_error_or_a_counted_skip(shared_data, tmp_path):
    root = tmp_path / "folders"
    (root / "ads_qrcode").mkdir(parents=True)
    (root / "ads_qrcode" / "broken.jpg").write_bytes((shared_data / "broken" / "broken.jpg").read_bytes())
    _img(root / "ads_qrcode" / "ok.jpg")
    with pytest.raises(ManifestError, match=r"broken\.jpg"):
        im.import_class_folders(root)
    rows = im.import_class_folders(root, on_error="skip")
    assert len(rows) == 1


def test_class_folders(tmp_path):
    _img(tmp_path / "ads_qrcode" / "a.jpg", value=1)
    _img(tmp_path / "ads_qrcode" / "b.jpg", value=2)
    _img(tmp_path / "ads_none" / "c.jpg", value=3)
    rows = im.import_class_folders(tmp_path)
    assert sorted(tuple(r["labels"]) for r in rows) == [(), ("ads_qrcode",), ("ads_qrcode",)]
    (tmp_path / "cats").mkdir()
    with pytest.raises(ManifestError, match="cats"):
        im.import_class_folders(tmp_path)


def test_coco(tmp_path):
    _img(tmp_path / "f1.jpg", 100, 80)
    _img(tmp_path / "f2.jpg", 100, 80, value=7)
    coco = {
        "images": [{"id": 1, "file_name": "f1.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "f2.jpg", "width": 100, "height": 80}],
        "categories": [{"id": 5, "name": "qr"}, {"id": 6, "name": "ads_logo"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 30, 20]},
                        {"id": 2, "image_id": 1, "category_id": 6, "bbox": [60, 50, 50, 40]}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    rows = im.import_coco(tmp_path / "ann.json", category_map={"qr": "ads_qrcode"})
    assert len(rows) == 2
    assert rows[0]["labels"] == ["ads_logo", "ads_qrcode"] and rows[1]["labels"] == []
    assert rows[0]["boxes"][0] == {"label": "ads_qrcode", "x0": 10.0, "y0": 10.0, "x1": 40.0, "y1": 30.0}
    assert rows[0]["boxes"][1]["x1"] == 100  # clipped to the image
    write_manifest(rows, tmp_path / "m", {"name": "coco"}, contact_sheet=False)
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ManifestError, match="COCO"):
        im.import_coco(tmp_path / "bad.json")


def test_label_studio(tmp_path):
    _img(tmp_path / "shot.jpg", 200, 100)
    export = [{
        "id": 9,
        "data": {"image": "/data/upload/3/1a2b3c-shot.jpg"},
        "annotations": [{"result": [
            {"type": "rectanglelabels", "original_width": 200, "original_height": 100,
             "value": {"x": 10, "y": 20, "width": 25, "height": 50, "rectanglelabels": ["ads_qrcode"]}},
            {"type": "choices", "value": {"choices": ["game_battle_royale"]}},
            {"type": "textarea", "value": {"text": ["微信 abc123"]}},
        ]}],
    }]
    (tmp_path / "export.json").write_text(json.dumps(export, ensure_ascii=False))
    (row,) = im.import_label_studio(tmp_path / "export.json")
    assert row["labels"] == ["ads_qrcode", "game_battle_royale"]
    assert row["boxes"] == [{"label": "ads_qrcode", "x0": 20.0, "y0": 20.0, "x1": 70.0, "y1": 70.0}]
    assert row["texts"][0]["text"] == "微信 abc123"
    (tmp_path / "notls.json").write_text("{}")
    with pytest.raises(ManifestError, match="Label Studio"):
        im.import_label_studio(tmp_path / "notls.json")


def test_mmocr_formats_reject_wrong_json(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"data_list": [{"img_path": "a.jpg"}]}))
    with pytest.raises(ManifestError, match="MMOCR"):
        im.import_mmocr_textdet(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        im.import_mmocr_textrecog(tmp_path / "y.json")
