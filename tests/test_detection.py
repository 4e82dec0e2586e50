"""The graph's detection stage: where the detector's boxes go (windows, QR codes), in-process.

The routing is tested with a detector that answers the boxes the frame was drawn with, so each
assertion is about the stage, not about how well a detector was trained (the trained one is
measured by ``make eval-detection``); one test runs a real mmdet detector end to end.
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from livelens import fusion
from livelens.detection import (
    ANSWERED,
    DetectionEngine,
    choose_thresholds,
    decode_qr_box,
    label_score,
    second_pass_boxes,
)
from livelens.errors import ConfigError
from livelens.ocr.mm_configs import OBJECT_CLASSES

QR_PAYLOAD = "https://example.com/live/8812"


class BoxesDetector:
    """Answers given boxes: the stage under test gets known detections."""

    ref, classes, card = "drawn_boxes@1", OBJECT_CLASSES, {}

    def __init__(self, objects: list[dict]):
        self.objects = objects

    def detect(self, rgb: np.ndarray, min_score: float = 0.05) -> list[dict]:
        return [dict(o) for o in self.objects if o["score"] >= min_score]


@pytest.fixture(scope="module")
def scene():
    """A frame without ads holding a game frame as a window, a small QR code, a face-sized box and a logo box."""
    from livelens.data import render
    from livelens.data.frames import FrameConfig, generate_slot
    from livelens.imageio import decode_image

    only = dict(p_negative=0, p_ads=0, p_game=0, p_black=0, p_frozen=0, portrait=0.0)
    host = decode_image(generate_slot(4, 1, FrameConfig(**{**only, "p_negative": 1}))[0]["image_bytes"]).copy()
    game_row = generate_slot(3, 5, FrameConfig(**{**only, "p_game": 1}))[0]
    game = decode_image(game_row["image_bytes"])
    x0, y0, w, h = 650, 30, 270, 152
    host[y0:y0 + h, x0:x0 + w] = cv2.resize(game, (w, h), interpolation=cv2.INTER_AREA)
    qr = np.asarray(render.qr_patch(QR_PAYLOAD, 1).convert("RGB"))
    host[400:400 + qr.shape[0], 100:100 + qr.shape[1]] = qr
    objects = [
        {"class": "pip", "box": [x0, y0, x0 + w, y0 + h], "score": 0.8},
        {"class": "qrcode", "box": [100, 400, 100 + qr.shape[1], 400 + qr.shape[0]], "score": 0.7},
        {"class": "face", "box": [300, 200, 360, 270], "score": 0.9},
        {"class": "logo", "box": [20, 20, 80, 60], "score": 0.6},
        {"class": "text_overlay", "box": [20, 480, 400, 520], "score": 0.1},
    ]
    game_labels = {lab for lab in game_row["labels"] if lab.startswith("game_")}
    assert game_labels, game_row["labels"]
    return host, objects, game_labels


def test_label_score_puts_the_class_threshold_at_review_and_keeps_order():
    assert label_score(0.3, 0.3, 0.4) == pytest.approx(0.4)
    assert label_score(1.0, 0.3, 0.4) == pytest.approx(1.0)
    assert label_score(0.2, 0.3, 0.4) < 0.4
    scores = [label_score(s, 0.35, 0.4) for s in np.linspace(0, 1, 21)]
    assert all(a < b for a, b in itertools.pairwise(scores))


def test_choose_thresholds_picks_the_score_that_separates_the_classes():
    # Positives score 0.62-0.9, negatives 0.1-0.45: any threshold in (0.45, 0.62] separates them.
    pairs = [(s, True) for s in (0.62, 0.7, 0.8, 0.9)] + [(s, False) for s in (0.1, 0.3, 0.45)]
    thr = choose_thresholds({"pip": pairs}, {"pip": 5})  # one positive frame had no box at all
    assert 0.45 < thr["pip"] <= 0.62
    assert choose_thresholds({"hud": []}, {"hud": 0})["hud"] == pytest.approx(0.3)


def test_boxes_are_routed_windows_raise_their_label_qr_boxes_are_read_faces_never_answered(scene):
    frame, objects, _ = scene
    eng = DetectionEngine(BoxesDetector(objects), min_scores={"pip": 0.3, "qrcode": 0.3, "text_overlay": 0.3})
    out = eng.analyze(frame)
    classes = [o["class"] for o in out["objects"]]
    assert classes == ["pip", "qrcode", "logo"]  # the face is personal data, the overlay under its threshold
    assert out["objects"][1]["value"] == QR_PAYLOAD
    labels = {lab["name"]: lab for lab in out["labels"]}
    assert set(labels) == {"ads_picture_in_picture", "ads_qrcode"}  # a logo box alone raises nothing
    pip = labels["ads_picture_in_picture"]
    assert pip["score"] == pytest.approx(label_score(0.8, 0.3, 0.4)) and pip["decision"] == "block"
    assert pip["evidence"][0]["box"] == objects[0]["box"] and pip["model"] == "drawn_boxes@1"
    assert labels["ads_qrcode"]["evidence"][0]["value"] == QR_PAYLOAD
    assert second_pass_boxes(out) == [objects[0]["box"]]
    # Without decoding, a QR box raises nothing: a box is where to look, a payload is the finding.
    quiet = DetectionEngine(BoxesDetector(objects), decode_qr=False).analyze(frame)
    assert [lab["name"] for lab in quiet["labels"]] == ["ads_picture_in_picture"]


def test_the_second_pass_finds_what_a_window_shows_that_the_whole_frame_hides(scene):
    """The shipped safety model on the whole frame misses the inset game; on the window's crop it sees it."""
    from livelens.analyzer import LocalAnalyzer

    frame, objects, game_labels = scene
    plain = LocalAnalyzer(caps=("moderate",), threads=1)
    both = LocalAnalyzer(caps=("moderate", "detect"), threads=1, detector=BoxesDetector(objects), share_from=plain)
    tax = plain.tax
    from livelens.fusion import fired

    assert not game_labels & fired(tax, plain.analyze(frame)["labels"])
    answer = both.analyze(frame)
    from_window = {lab["name"] for lab in answer["labels"] if any(e.get("source") == "pip_window"
                                                                   for e in lab["evidence"])}
    assert answer["detection"]["second_pass"] == {"windows": 1, "labels": sorted(from_window)}
    found = game_labels & fired(tax, answer["labels"])
    assert found == game_labels, answer["labels"]
    lab = next(x for x in answer["labels"] if x["name"] in found)
    assert {"kind": "box", "box": objects[0]["box"], "source": "pip_window"} in lab["evidence"]
    assert "ads_picture_in_picture" in fired(tax, answer["labels"])
    # The inset's scene is not the stream's: scene labels never come from a window.
    assert from_window and not any(name.startswith("scene_") for name in from_window)
    assert "drawn_boxes@1" in answer["models"]


def test_the_box_decoder_reads_a_code_where_the_detector_points_and_nothing_elsewhere(scene):
    frame, objects, _ = scene
    assert decode_qr_box(frame, objects[1]["box"]) == QR_PAYLOAD
    assert decode_qr_box(frame, objects[3]["box"]) is None
    assert decode_qr_box(frame, [5, 5, 9, 9]) is None  # too small to hold a code
    assert decode_qr_box(frame, [-50, -50, 4000, 4000]) in (None, QR_PAYLOAD)  # clipped to the frame


def test_doubtful_qr_boxes_are_decoded_and_answered_only_when_read(scene):
    """A QR box under its threshold costs a decode; it is answered when a payload is read, else dropped."""
    frame, objects, _ = scene
    qr_box, elsewhere = objects[1]["box"], objects[3]["box"]
    doubtful = [{"class": "qrcode", "box": qr_box, "score": 0.15}, {"class": "qrcode", "box": elsewhere, "score": 0.2}]
    out = DetectionEngine(BoxesDetector(doubtful), min_scores={"qrcode": 0.35}).analyze(frame)
    assert [(o["box"], o.get("value")) for o in out["objects"]] == [(qr_box, QR_PAYLOAD)]
    assert [lab["name"] for lab in out["labels"]] == ["ads_qrcode"] and "probe" not in out["objects"][0]
    # Both boxes under the probe score: neither is looked at.
    assert DetectionEngine(BoxesDetector(doubtful), min_scores={"qrcode": 0.35}, qr_probe=0.3).analyze(
        frame)["objects"] == []
    # A box over the threshold that does not decode is still answered: there the detector is sure.
    sure = DetectionEngine(BoxesDetector([{**doubtful[1], "score": 0.9}]), min_scores={"qrcode": 0.35}).analyze(frame)
    assert [o["box"] for o in sure["objects"]] == [elsewhere] and sure["labels"] == []
    with pytest.raises(ConfigError, match="qr_probe"):
        DetectionEngine(BoxesDetector(doubtful), qr_probe=1.5)


def test_a_real_mmdet_detector_serves_and_bad_frames_have_defined_answers(tmp_path, window_detector):
    """A stored detector by ref: its card's threshold is served; 1×1 and black frames answer no window labels."""
    ref = window_detector(tmp_path / "store")
    eng = DetectionEngine(ref, [str(tmp_path / "store")], max_objects=3)
    assert eng.ref == ref and eng.min_scores["pip"] == 0.5 and eng.min_scores["hud"] == pytest.approx(0.3)
    out = eng.analyze(np.full((360, 640, 3), 90, np.uint8))
    assert len(out["objects"]) == 3 and {o["class"] for o in out["objects"]} == {"pip"}
    assert out["labels"][0]["name"] == "ads_picture_in_picture" and len(out["labels"][0]["evidence"]) == 3
    assert eng.analyze(np.zeros((1, 1, 3), np.uint8))["objects"] == []
    for bad in ({"pip": 1.5}, {"pip": -0.1}):
        with pytest.raises(ConfigError, match="thresholds"):
            DetectionEngine(ref, [str(tmp_path / "store")], min_scores=bad)


def test_bad_detection_configs_are_refused(tmp_path):
    from pydantic import ValidationError

    from livelens.errors import ModelNotFoundError
    from serve_apps.detection import DetectionConfig

    with pytest.raises(ModelNotFoundError):
        DetectionEngine("persons_det@9", [str(tmp_path)])
    with pytest.raises(ValidationError):
        DetectionConfig(min_scores={"face": 0.5})  # faces are the persons stage's
    with pytest.raises(ValidationError):
        DetectionConfig(model="../x")
    assert DetectionConfig(min_scores={c: 0.4 for c in ANSWERED}).min_scores["pip"] == 0.4

    class FacesOnly(BoxesDetector):
        classes = ("face",)

    with pytest.raises(ConfigError, match="none of"):
        DetectionEngine(FacesOnly([]))


def test_calibrate_publishes_the_same_weights_with_thresholds_chosen_on_held_out_frames(
        tmp_path, window_detector, shared_data):
    """For a detector trained before training chose class thresholds: a copy whose card has them."""
    import torch

    from livelens.detection_eval import calibrate
    from livelens.store import ModelStore

    store = tmp_path / "store"
    ref = window_detector(store)
    out = calibrate(ref, samples=6, store=str(store))
    assert out["ref"] == "persons_det@2" and out["from"] == ref
    new, old = ModelStore(str(store)).load(out["ref"]), ModelStore(str(store)).load(ref)
    assert all(torch.equal(new.state_dict[k], old.state_dict[k]) for k in old.state_dict)
    assert {f"heldout_thr_{c}" for c in ANSWERED} <= set(new.card["metrics"])
    assert new.card["calibrated_from"]["ref"] == ref
    # The served thresholds are the card's.
    eng = DetectionEngine(out["ref"], [str(store)])
    assert eng.min_scores == {c: new.card["metrics"][f"heldout_thr_{c}"] for c in ANSWERED}


def test_the_evaluation_scores_what_the_answers_act_on():
    from livelens.detection_eval import inset_frames, score
    from livelens.taxonomy import load_taxonomy

    tax = load_taxonomy()
    lab = {"name": "ads_picture_in_picture", "score": 0.9, "decision": "block"}
    low = {**lab, "score": 0.1, "decision": "pass"}
    answers = [{"labels": [lab]}, {"labels": [low]}, {"labels": [lab]}, {"labels": []}]
    truths = [{"ads_picture_in_picture"}, {"ads_picture_in_picture"}, set(), set()]
    s = score(tax, answers, truths)["ads_picture_in_picture"]
    assert s == {"support": 2, "predicted": 2, "precision": 0.5, "recall": 0.5}
    frame, truth, box = inset_frames(7, 1)[0]
    assert "ads_picture_in_picture" in truth and any(t.startswith("game_") for t in truth)
    assert 0 <= box[0] < box[2] <= frame.shape[1] and 0 <= box[1] < box[3] <= frame.shape[0]


def test_the_overlay_route_counts_a_frame_once_whichever_source_raised_its_label():
    from livelens.detection_eval import route_scores

    rows = [
        {"truth": ["ads_logo"], "ocr": ["ads_logo"], "routed": {"logo": ["ads_logo"]}},  # both found it
        {"truth": ["ads_logo"], "ocr": [], "routed": {"logo": ["ads_logo"]}},  # only the route
        {"truth": [], "ocr": [], "routed": {"hud": ["ads_logo"]}},  # a false logo on a HUD box
        {"truth": ["ads_logo"], "ocr": [], "routed": {}},  # missed by both
    ]
    s = route_scores(rows, labels=("ads_logo",))["ads_logo"]
    assert s["ocr"] == {"support": 3, "predicted": 1, "precision": 1.0, "recall": 0.3333}
    assert s["ocr+logo"] == {"support": 3, "predicted": 2, "precision": 1.0, "recall": 0.6667}
    assert s["ocr+hud"] == {"support": 3, "predicted": 2, "precision": 0.5, "recall": 0.3333}
    assert s["ocr+all"] == {"support": 3, "predicted": 3, "precision": 0.6667, "recall": 0.6667}
    assert s["ocr+text_overlay"] == s["ocr"]


def test_once_the_detector_looked_the_classifiers_window_guess_it_did_not_share_is_overruled():
    from livelens import fusion
    from livelens.taxonomy import load_taxonomy

    tax = load_taxonomy()
    guess = fusion.make_label(tax, "ads_picture_in_picture", 0.8, "safety@1")
    found = fusion.make_label(tax, "ads_picture_in_picture", 0.7, "persons_det@3")
    phone = fusion.make_label(tax, "ads_phone", 0.9, "ppocr@1")
    # An idle stage (no detector stored) overrules nothing.
    labels, _ = fusion.fuse(tax, {"moderate": [guess], "detect": []}, detected=False)
    assert fusion.fired(tax, labels) == {"ads_picture_in_picture"}
    labels, decision = fusion.fuse(tax, {"moderate": [guess, phone], "detect": []}, detected=True)
    pip = next(lab for lab in labels if lab["name"] == "ads_picture_in_picture")
    assert pip["decision"] == "pass" and "detector" in pip["overruled"] and pip["score"] == 0.8
    assert fusion.fired(tax, labels) == {"ads_phone"} and decision == "block"
    labels, _ = fusion.fuse(tax, {"moderate": [guess], "detect": [found]}, detected=True)
    assert fusion.fired(tax, labels) == {"ads_picture_in_picture"}
    assert fusion.detector_ran({"models": ["persons_det@3", "qr_decoder@1"]})
    assert not fusion.detector_ran({"models": []}) and not fusion.detector_ran(None)


def test_calibrating_on_the_serving_distribution_records_where_it_chose(tmp_path, window_detector):
    from livelens.detection_eval import calibrate
    from livelens.store import ModelStore

    store = tmp_path / "store"
    ref = window_detector(store)
    out = calibrate(ref, samples=4, store=str(store), frames_seed=12)
    card = ModelStore(str(store)).card(out["ref"])
    assert card["calibrated_from"] == {"ref": ref, "serving_frames": 4, "seed": 12,
                                       "generator": "livelens.data.frames (make data's config)"}


def test_the_evaluation_compares_one_moderation_pass_fused_with_and_without_the_stage(tmp_path, window_detector):
    """A detector that calls every place a window: every inset is found with it, the arm without it is unchanged."""
    from livelens.detection_eval import evaluate
    from livelens.ocr.mmocr_adapter import ObjectDetector

    ref = window_detector(tmp_path / "store")
    report = evaluate(ObjectDetector(ref, str(tmp_path / "store")), frames=3, insets=2, out=str(tmp_path / "out"))
    inset = report["insets"]["by_arm"]
    assert inset["with_detection"]["ads_picture_in_picture"]["recall"] == 1.0
    assert report["fresh"]["second_pass_frames"] == 3  # every frame has windows
    fresh = report["fresh"]["by_arm"]
    assert fresh["with_detection"]["ads_picture_in_picture"]["predicted"] == 3
    assert fresh["classifier"]["ads_picture_in_picture"]["predicted"] <= 1
    assert (tmp_path / "out" / "report.md").read_text().startswith(f"# Detection stage ({ref}")


class NoTextEngine:
    """An OCR engine that finds no text: the QR decoder is what these tests watch."""

    ref = "no_text@1"

    def detect(self, images: list[np.ndarray]) -> list[list]:
        return [[] for _ in images]

    def recognize(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        return [("", 0.0) for _ in crops]


SMALL_CODE = "wx:abc12345"


def _small_code_frame() -> np.ndarray:
    """A 40 px code in a 1280×720 frame: only the tiled pass or a box decoder reads it."""
    from test_ocr_qr import frame_with

    return frame_with([(SMALL_CODE, 40, 700, 300)])


def test_ocr_leaves_the_tiled_qr_pass_to_the_stage_and_runs_it_when_the_stage_cannot():
    """With detection, OCR defers its costly tiled pass; the code is read all the same, whichever way."""
    from livelens.analyzer import LocalAnalyzer

    frame = _small_code_frame()
    box = [694.0, 294.0, 746.0, 346.0]
    alone = LocalAnalyzer(caps=("ocr",), ocr_engine=NoTextEngine(), regions_ref=None, threads=1)
    reading = LocalAnalyzer(caps=("ocr", "detect"), share_from=alone,
                            detector=BoxesDetector([{"class": "qrcode", "box": box, "score": 0.9}]))
    blind = LocalAnalyzer(caps=("ocr", "detect"), share_from=alone, detector=BoxesDetector([]),
                          detection={"decode_qr": False})
    idle = LocalAnalyzer(caps=("ocr", "detect"), share_from=alone, detector="no_such_detector",
                         detection={"stores": []})
    assert idle.detection is None and idle.detection_missing

    def read(analyzer: LocalAnalyzer) -> tuple[set[str], set[str], str | None]:
        parts = analyzer.parts(frame)
        ocr = {e["value"] for e in parts["ocr"]["entities"] if e["kind"] == "qrcode"}
        boxes = {o["value"] for o in parts.get("detect", {}).get("objects", []) if o.get("value")}
        assert detection_keys_are_public(parts)
        return ocr, boxes, parts["ocr"].get("qr_tiles")

    assert read(alone) == ({SMALL_CODE}, set(), None)  # OCR alone: its tiled pass, as before
    # The detector boxed the code and its decoder read it; OCR's whole-frame pass could not.
    assert read(reading) == (set(), {SMALL_CODE}, "detection")
    # A stage that reads no QR boxes (switched off, or no detector stored): the pass ran after all.
    assert read(blind) == ({SMALL_CODE}, set(), "ran")
    assert read(idle) == ({SMALL_CODE}, set(), "ran")
    labels = {lab["name"] for lab in idle.analyze(frame)["labels"]}
    assert "ads_qrcode" in labels


def detection_keys_are_public(parts: dict) -> bool:
    from livelens.detection import QR_TILES

    return QR_TILES not in parts.get("detect", {})


def test_a_deferred_pass_adds_only_new_codes_and_their_labels():
    from livelens.detection import QR_TILES, complete_qr
    from livelens.ocr.pipeline import OcrPipeline
    from livelens.taxonomy import load_taxonomy

    tax = load_taxonomy()
    pipe = OcrPipeline("no_text@1", tax=tax)
    frame = _small_code_frame()
    found = pipe.tiled_qr(frame)
    assert [e["value"] for e in found] == [SMALL_CODE]
    ocr = {"entities": [], "labels": [], "models": ["no_text@1", "qr_decoder@1"], "qr_tiles": "deferred"}
    parts = {"ocr": ocr, "detect": {"objects": [], "labels": [], "models": [], "missing": "none", QR_TILES: found}}
    complete_qr(tax, parts)
    assert QR_TILES not in parts["detect"] and ocr["qr_tiles"] == "ran"
    assert [lab["name"] for lab in ocr["labels"]] == ["ads_qrcode"]
    assert ocr["labels"][0]["evidence"][0]["value"] == SMALL_CODE and ocr["labels"][0]["model"] == "qr_decoder@1"
    # The same code again adds nothing.
    parts["detect"][QR_TILES] = found
    ocr["qr_tiles"] = "deferred"
    complete_qr(tax, parts)
    assert len(ocr["entities"]) == 1 and len(ocr["labels"][0]["evidence"]) == 1


def _window_check(store, bias: float, threshold: float = 0.5, floor: float = 0.25) -> str:
    """Store a window check whose head says ``sigmoid(bias)`` of every box (random backbone, full state)."""
    import torch

    from livelens.detection_eval import WINDOW_HEAD
    from livelens.models.factory import create_model
    from livelens.models.io import save_to_store
    from livelens.store import ModelStore

    model = create_model("mobilenet_v2", "avgmax", heads=WINDOW_HEAD).eval()
    with torch.no_grad():
        model.head.fc["window"].weight.zero_()
        model.head.fc["window"].bias.fill_(bias)
    return save_to_store(ModelStore(str(store)), "window_check", model, {"threshold": threshold, "floor": floor})


def test_a_window_check_decides_the_detectors_picture_in_picture_boxes(scene, tmp_path):
    from livelens.errors import ModelNotFoundError
    from livelens.store import ModelStore
    from serve_apps.detection import DetectionConfig

    frame, objects, _ = scene
    doubtful = [{**objects[0], "score": 0.3}, {"class": "pip", "box": [10, 300, 200, 420], "score": 0.2}]
    stores = [str(tmp_path)]
    yes, no = _window_check(tmp_path, 4.0), _window_check(tmp_path, -4.0)
    # Without a check, the class threshold alone: a 0.3 window is under 0.5.
    assert DetectionEngine(BoxesDetector(doubtful), min_scores={"pip": 0.5}).analyze(frame)["objects"] == []
    eng = DetectionEngine(BoxesDetector(doubtful), stores, min_scores={"pip": 0.5}, window_check=yes)
    out = eng.analyze(frame)
    # From the check's floor (0.25) up, the check decides; the 0.2 box is never shown to it.
    assert [o["box"] for o in out["objects"]] == [objects[0]["box"]]
    check = out["objects"][0]["check"]
    assert check == pytest.approx(0.982, abs=1e-3) and out["objects"][0]["score"] == 0.3
    pip = out["labels"][0]
    assert pip["model"] == yes and pip["score"] == pytest.approx(label_score(check, 0.5, 0.4), abs=1e-3)
    assert pip["evidence"][0]["check"] == check and yes in eng.models()
    assert fusion.source_of(pip) == "detector"  # the stage's label, whichever of its models decided
    # A check that says no drops even a window the detector is sure of.
    sure = [{**objects[0], "score": 0.95}]
    assert DetectionEngine(BoxesDetector(sure), stores, window_check=no).analyze(frame)["labels"] == []
    # By default the detector's card names its check; False switches it off.
    named = BoxesDetector(sure)
    named.card = {"window_check": no}
    assert DetectionEngine(named, stores).window_check.ref == no
    assert DetectionEngine(named, stores, window_check=False).analyze(frame)["labels"][0]["model"] == "drawn_boxes@1"
    assert DetectionEngine(BoxesDetector(sure), stores).window_check is None  # a card without one
    with pytest.raises(ModelNotFoundError):
        DetectionEngine(BoxesDetector(sure), stores, window_check="window_check@9")
    not_a_check = ModelStore(str(tmp_path)).save("window_check", {}, {"task": "something else"})
    with pytest.raises(ConfigError, match="no 'arch'"):
        DetectionEngine(BoxesDetector(sure), stores, window_check=not_a_check)
    assert DetectionConfig(window_check=False).window_check is False
    assert DetectionConfig(window_check="window_check@2").window_check == "window_check@2"
    with pytest.raises(ValueError):
        DetectionConfig(window_check="../x")


def test_window_crops_keep_a_margin_and_clip_to_the_frame():
    from livelens.detection import WINDOW_SIZE, window_crops

    rgb = np.zeros((100, 200, 3), np.uint8)
    rgb[40:60, 90:110] = 255  # a white box with a black margin around it
    x = window_crops(rgb, [[90, 40, 110, 60], [190, 90, 200, 100], [50, 50, 50, 50]])
    assert x.shape == (3, 3, WINDOW_SIZE, WINDOW_SIZE) and x.dtype == np.float32
    mid, edge = x[0, :, WINDOW_SIZE // 2, WINDOW_SIZE // 2], x[0, :, 2, 2]
    assert (mid > 2).all() and (edge < -1.5).all()  # white inside, black in the margin (ImageNet-normalised)
    assert np.isfinite(x[1]).all() and (x[2] == 0).all()  # clipped at the corner; an empty box stays zero


def test_a_scaled_logistic_regression_folds_into_one_linear_layer():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from livelens.detection_eval import fold_scaler

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, [1.0, 5.0, 0.1], (200, 3))
    y = (x[:, 0] + 0.2 * x[:, 1] > 4).astype(int)
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    sc, lr = pipe.steps[0][1], pipe.steps[1][1]
    w, b = fold_scaler(lr.coef_[0], lr.intercept_[0], sc.mean_, sc.scale_)
    np.testing.assert_allclose(x @ w + b, pipe.decision_function(x), rtol=1e-9, atol=1e-9)


def test_the_window_check_is_fitted_on_proposals_and_its_threshold_chosen_through_the_engine(tmp_path):
    """A detector that answers each frame's true window and a decoy: the check learns which is which."""
    from livelens.detection import DetectionEngine as Engine
    from livelens.detection_eval import _frames, fit_window_check
    from livelens.imageio import decode_image
    from livelens.store import ModelStore

    seed, n = 20, 40
    truth = []
    for sd, count in ((seed, n), (12, n)):
        for r in _frames(sd, count):
            wins = [[b["x0"], b["y0"], b["x1"], b["y1"]] for b in r["boxes"] or [] if b["label"] == "ads_picture_in_picture"]
            truth.append(wins)
    assert sum(map(bool, truth[:n])) >= 2 and sum(map(bool, truth[n:])) >= 1

    class InOrder(BoxesDetector):
        """The true windows at 0.9 and a decoy at 0.5, frame by frame in the order they are asked."""

        def __init__(self):
            super().__init__([])
            self.calls = itertools.count()

        def detect(self, rgb, min_score=0.05):
            i = next(self.calls)
            # Fitting walks the fitting frames, then the choosing frames: one call each.
            wins = truth[i] if i < len(truth) else []
            return ([{"class": "pip", "box": list(b), "score": 0.9} for b in wins]
                    + [{"class": "pip", "box": [20, 20, 220, 140], "score": 0.5}])

    out = fit_window_check(InOrder(), seeds=[seed], frames=n, choose_seeds=[12], choose_frames=n, c=1.0,
                           store=str(tmp_path), cache=str(tmp_path / "cache"))
    assert out["ref"] == "window_check@1" and out["detector"] is None
    assert out["fitted_on"]["windows"] == sum(len(t) for t in truth[:n])
    assert out["fitted_on"]["proposals"] == n + out["fitted_on"]["windows"]
    card = ModelStore(str(tmp_path)).card(out["ref"])
    assert card["threshold"] == out["threshold"] and card["floor"] == 0.25 and card["state"] == "head_only"
    assert out["chosen_on"]["windows"] == sum(map(bool, truth[n:])) and 0.05 <= out["threshold"] <= 0.95
    # The stored check, through the engine, keeps the true windows of a frame it fitted on and drops the decoy.
    k = next(i for i, t in enumerate(truth[:n]) if t)
    frame = decode_image(_frames(seed, k + 1)[k]["image_bytes"])
    eng = Engine(BoxesDetector([{"class": "pip", "box": truth[k][0], "score": 0.9},
                                {"class": "pip", "box": [20, 20, 220, 140], "score": 0.5}]),
                 [str(tmp_path)], window_check=out["ref"])
    assert [o["box"] for o in eng.analyze(frame)["objects"]] == [[float(v) for v in truth[k][0]]]
    # The fitting frames' proposals were cached: a refit reads them without running the detector.
    from livelens.detection_eval import window_proposals

    class Refuses(BoxesDetector):
        def detect(self, rgb, min_score=0.05):
            raise AssertionError("the cache was not used")

    refuses = Refuses([])
    cached = window_proposals(Engine(refuses, decode_qr=False, window_check=False), eng.window_check, seed, n,
                              str(tmp_path / "cache"))
    assert int(cached["window"].sum()) == out["fitted_on"]["windows"] and len(cached["slot"]) == out["fitted_on"]["proposals"]
    assert cached["has_window"].shape == (n,) and cached["features"].shape[1] == 2 * 1280
