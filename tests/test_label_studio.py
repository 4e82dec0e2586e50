"""Label Studio export (tasks with livelens pre-annotations) and import of what labellers return."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from livelens.data.frames import generate_frames
from livelens.data.importers import import_label_studio
from livelens.data.manifest import content_id, read_manifest, write_manifest
from livelens.errors import ConfigError, ManifestError
from livelens.imageio import encode_png
from livelens.loop.label_studio import BOXES, CHOICES, config_labels, export_tasks, label_config, prediction

ANSWER = {"models": ["safety@1", "ads_regions@1"], "labels": [
    {"name": "ads_watermark", "score": 0.8, "decision": "block",
     "evidence": [{"kind": "box", "box": [64, 36, 128, 72], "source": "text_region", "score": 0.7}]},
    {"name": "ads_phone", "score": 0.6, "decision": "review", "evidence": []},
    {"name": "ads_url", "score": 0.3, "decision": "pass", "evidence": [{"kind": "box", "box": [0, 0, 10, 10]}]}]}


def test_a_served_answer_becomes_a_prediction_in_percent():
    p = prediction(ANSWER, 640, 360)
    assert p["model_version"] == "safety@1,ads_regions@1" and p["score"] == 0.6  # the weakest raised label
    choices = [r for r in p["result"] if r["type"] == "choices"]
    boxes = [r for r in p["result"] if r["type"] == "rectanglelabels"]
    assert [c["value"]["choices"] for c in choices] == [["ads_phone", "ads_watermark"]]  # a passed label is not
    assert len(boxes) == 1 and boxes[0]["from_name"] == BOXES and choices[0]["from_name"] == CHOICES
    v = dict(boxes[0]["value"])
    assert v.pop("rectanglelabels") == ["ads_watermark"]
    assert v == pytest.approx({"x": 10.0, "y": 10.0, "width": 10.0, "height": 10.0, "rotation": 0})
    assert boxes[0]["score"] == 0.7 and boxes[0]["original_width"] == 640
    calm = prediction({"labels": [ANSWER["labels"][2]]}, 640, 360)
    assert calm["result"] == [] and calm["score"] == 0.7 and calm["model_version"] == "livelens"
    with pytest.raises(ConfigError):
        prediction(ANSWER, 0, 360)


def test_the_label_config_lists_every_label_once_for_choices_and_boxes():
    root = ET.fromstring(label_config(["b", "a", "a", 'x"y']))
    assert [c.get("value") for c in root.find("Choices")] == ["a", "b", 'x"y']
    assert [c.get("value") for c in root.find("RectangleLabels")] == ["a", "b", 'x"y']
    with pytest.raises(ConfigError):
        label_config([])


@pytest.mark.slow
def test_export_through_the_serving_code_then_import_what_labellers_made(tmp_path):
    """Tasks out with the served answer as pre-annotations; a Label Studio export back into a manifest."""
    from livelens.analyzer import LocalAnalyzer
    from livelens.imageio import decode_image

    rows = generate_frames(0, 6, seed=5)  # the sixth raises ads labels with boxes
    stored = tmp_path / "frame2.bin"  # one frame stored by reference, as an importer of a folder writes it
    stored.write_bytes(rows[2]["image_bytes"])
    by_ref = [{**r, "image_bytes": None, "image_uri": f"file://{stored}"} if i == 2 else r for i, r in enumerate(rows)]
    manifest = write_manifest(by_ref, tmp_path / "queue", {"name": "queue"}, contact_sheet=False)
    analyzer = LocalAnalyzer(caps=("moderate",), use_open_nsfw=False, evidence="boxes", threads=1)
    res = export_tasks(manifest, tmp_path / "ls", analyzer, storage_prefix="livelens/queue")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    ids = read_manifest(manifest, columns=["id"]).column("id").to_pylist()
    assert res["tasks"] == len(tasks) == 6 and [t["data"]["livelens_id"] for t in tasks] == ids
    assert all(t["data"]["image"].startswith("/data/local-files/?d=livelens/queue/images/") for t in tasks)
    assert all(t["data"]["image"].endswith((".png", ".jpg")) for t in tasks)  # the format the header names
    vocab = {c.get("value") for c in ET.parse(tmp_path / "ls" / "label_config.xml").getroot().find("Choices")}
    assert vocab == set(analyzer.tax.labels)
    for t, row in zip(tasks, rows, strict=True):
        (pred,) = t["predictions"]
        answer = analyzer.analyze(decode_image(row["image_bytes"]))  # the same code answers the same
        raised = sorted({lab["name"] for lab in answer["labels"] if lab["decision"] in ("block", "review")})
        assert [r["value"]["choices"] for r in pred["result"] if r["type"] == "choices"] == ([raised] if raised else [])
        assert "safety@" in pred["model_version"]
        for r in pred["result"]:
            if r["type"] == "rectanglelabels":
                v = r["value"]
                assert v["x"] >= 0 and v["x"] + v["width"] <= 100 + 1e-9 and 0 <= v["y"] <= 100
    assert res["raised"] >= 1  # generated ads frames: something is pre-annotated
    # A labeller accepts the pre-annotations of every task, adds a box to the first, and skips a
    # task once before labelling it: Label Studio's JSON export, read by the importer.
    for i, t in enumerate(tasks):
        result = list(t["predictions"][0]["result"])
        if i == 0:
            result.append({"type": "rectanglelabels", "original_width": rows[0]["width"],
                           "original_height": rows[0]["height"],
                           "value": {"x": 50, "y": 50, "width": 25, "height": 25, "rectanglelabels": ["ads_logo"]}})
        t["annotations"] = ([{"was_cancelled": True, "result": []}] if i == 1 else []) + [{"result": result}]
        t["id"] = 100 + i
    (tmp_path / "ls" / "export.json").write_text(json.dumps(tasks))
    back = {content_id(r["image_bytes"]): r for r in import_label_studio(tmp_path / "ls" / "export.json", tmp_path / "ls" / "images")}
    assert set(back) == set(ids)  # the original bytes: each frame keeps its content id
    for t in tasks:
        r = back[t["data"]["livelens_id"]]
        choices = {c for x in t["annotations"][-1]["result"] if x["type"] == "choices" for c in x["value"]["choices"]}
        boxed = {x["value"]["rectanglelabels"][0] for x in t["annotations"][-1]["result"]
                 if x["type"] == "rectanglelabels"}
        assert set(r["labels"]) == choices | boxed
        assert r["attributes"]["ls_id"] == t["id"]
    first = back[ids[0]]
    w, h = rows[0]["width"], rows[0]["height"]
    assert any(b["label"] == "ads_logo" and b["x0"] == pytest.approx(w / 2) and b["y1"] == pytest.approx(h * 0.75)
               for b in first["boxes"])
    # The same through the command line, into a manifest training reads.
    from livelens.loop.__main__ import main as loop_main

    assert loop_main(["ls-import", "--export", str(tmp_path / "ls" / "export.json"), "--images",
                      str(tmp_path / "ls" / "images"), "--out", str(tmp_path / "labelled")]) == 0
    table = read_manifest(tmp_path / "labelled", columns=["id", "labels"])
    assert dict(zip(*(table.column(c).to_pylist() for c in ("id", "labels")), strict=True)) == \
        {i: back[i]["labels"] for i in ids}
    with pytest.raises(ConfigError):
        export_tasks(manifest, tmp_path / "none", analyzer, limit=0)


def test_the_prediction_keeps_only_labels_the_project_offers():
    offered = config_labels(label_config(["ads_phone", "porn"]))
    assert offered == {"ads_phone", "porn"}
    p = prediction(ANSWER, 640, 360, offered)
    assert [r["value"]["choices"] for r in p["result"] if r["type"] == "choices"] == [["ads_phone"]]
    assert not [r for r in p["result"] if r["type"] == "rectanglelabels"]  # the watermark box went with its label
    assert config_labels("<View><broken") is None and config_labels(None) is None


def test_a_task_names_its_image_by_frame_id_inline_bytes_or_url():
    from livelens.errors import InvalidArgumentError
    from livelens.loop.label_studio import data_uri, make_task, server_url, task_image

    png = encode_png(np.zeros((4, 6, 3), np.uint8))
    uri = data_uri(png)
    assert uri.startswith("data:image/png;base64,")
    t = make_task("abc", uri)
    assert task_image(t).frame_id == "abc" and task_image(t).data_uri == uri and "predictions" not in t
    assert task_image({"data": {"image": "https://cdn.example/x.jpg"}}).url == "https://cdn.example/x.jpg"
    assert task_image({"data": {"image": "/data/upload/1/x.jpg", "livelens_id": "abc"}}).frame_id == "abc"
    assert task_image({"data": {"image": "/data/upload/1/x.jpg"}}).path == "/data/upload/1/x.jpg"
    for bad in ({"data": {"image": "//evil.example/x.jpg"}}, {"data": {"livelens_id": "../etc"}}, {"data": 3}, 7):
        with pytest.raises(InvalidArgumentError):
            task_image(bad)
    assert server_url("http://localhost:8080/", "/data/upload/1/x.jpg") == "http://localhost:8080/data/upload/1/x.jpg"
    for host in ("file:///etc", "localhost:8080", "http://h/?q=1", None):
        with pytest.raises(InvalidArgumentError):
            server_url(host, "/x")


def test_webhook_annotations_become_label_store_changes():
    from livelens.errors import InvalidArgumentError
    from livelens.loop.label_studio import annotation_change

    task = {"id": 9, "data": {"image": "x", "livelens_id": "f1"}}
    result = [{"type": "choices", "value": {"choices": ["ads_phone"]}},
              {"type": "rectanglelabels", "original_width": 100, "original_height": 50,
               "value": {"x": 0, "y": 0, "width": 10, "height": 10, "rectanglelabels": ["ads_logo"]}},
              {"type": "choices", "value": "garbage"}]
    made = annotation_change({"action": "ANNOTATION_CREATED", "task": task,
                              "annotation": {"id": 4, "completed_by": 1, "result": result}})
    assert (made.frame_id, made.labels, made.replace) == ("f1", {"ads_phone", "ads_logo"}, True)
    assert "task 9, annotation 4, user 1" in made.note
    gone = annotation_change({"action": "ANNOTATION_DELETED", "task": task, "annotation": {"result": result}})
    assert gone.labels == {"ads_phone", "ads_logo"} and gone.replace is False
    skipped = annotation_change({"action": "ANNOTATION_CREATED", "task": task,
                                 "annotation": {"was_cancelled": True, "result": result}})
    assert skipped.labels == frozenset() and skipped.replace is False  # a skip adds and removes nothing
    assert annotation_change({"action": "START_TRAINING", "project": {}}) is None
    assert annotation_change({"action": "PROJECT_UPDATED"}) is None
    with pytest.raises(InvalidArgumentError):
        annotation_change({"action": "ANNOTATION_CREATED", "task": {"data": {"image": "x"}}, "annotation": {}})
    with pytest.raises(InvalidArgumentError):
        annotation_change({"action": "ANNOTATION_UPDATED", "task": task})


def test_an_export_whose_images_are_inline_imports_with_their_bytes(tmp_path):
    from livelens.loop.label_studio import data_uri, make_task

    png = encode_png(np.full((8, 12, 3), 200, np.uint8))
    task = make_task(content_id(png), data_uri(png))
    task["annotations"] = [{"result": [{"type": "choices", "value": {"choices": ["ads_logo"]}}]}]
    bad = make_task("x", "data:image/png;base64,!!!")
    (tmp_path / "export.json").write_text(json.dumps([task, bad]))
    with pytest.raises(ManifestError):
        import_label_studio(tmp_path / "export.json")
    (row,) = import_label_studio(tmp_path / "export.json", on_error="skip")
    assert content_id(row["image_bytes"]) == content_id(png) and row["labels"] == ["ads_logo"]
    assert (row["width"], row["height"]) == (12, 8)
