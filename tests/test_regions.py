"""Text-region recognition: OCR boxes → crops → a frozen-backbone head (livelens.evidence.regions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livelens.errors import ConfigError, ManifestError
from livelens.evidence.regions import (
    GEOMETRY_DIM,
    REGION_CLASSES,
    RegionClassifier,
    box_decisions,
    contact_flags,
    crop_regions,
    frame_labels,
    geometry_features,
    load_region_model,
    region_hits,
    region_window,
    save_region_model,
)
from livelens.store import ModelStore
from livelens.train.regions import (
    IGNORE,
    BoxCache,
    RegionSet,
    RegionTrainConfig,
    box_targets,
    build_region_set,
    choose_thresholds,
    fit_head,
    frame_metrics,
    frame_scores,
    plateau_threshold,
    region_accuracy,
    run,
)


@pytest.fixture(scope="module")
def imagenet_regions() -> RegionClassifier:
    return RegionClassifier(pretrained=True)


def test_region_window_takes_context_and_stays_in_frame():
    # A 20 px tall name: two heights each side (room for a logo's icon), one above and below.
    assert region_window((100, 50, 140, 70), 960, 540) == (60, 30, 180, 90)
    x0, y0, x1, y1 = region_window((0, 0, 30, 10), 50, 40)
    assert (x0, y0) == (0, 0) and x1 <= 50 and y1 <= 40
    # A degenerate box still gives a non-empty crop.
    x0, y0, x1, y1 = region_window((10, 10, 10, 10), 50, 40)
    assert x1 > x0 and y1 > y0


def test_geometry_features_say_where_the_box_is():
    g = geometry_features([(0, 0, 96, 27), (300, 250, 660, 290), (860, 500, 960, 540)], 960, 540)
    assert g.shape == (3, GEOMETRY_DIM) and g.dtype == np.float32
    corner = g[:, 6]
    assert corner[0] < 0.1 and corner[2] < 0.1 and corner[1] > 0.4  # corners vs the centre
    assert g[1, 7] > g[0, 7] - 1e-6  # a wider box has the larger aspect
    assert np.all(g[:, 8] == 1.0)  # landscape
    with pytest.raises(ConfigError):
        geometry_features([(0, 0, 1, 1)], 0, 10)


def test_crop_regions_shapes_and_empty():
    frame = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    x = crop_regions(frame, [(10, 10, 50, 30), (150, 90, 199, 119)], (32, 96))
    assert x.shape == (2, 3, 32, 96) and x.dtype == torch.float32
    assert crop_regions(frame, []).shape[0] == 0


def test_box_targets_from_overlays():
    overlays = [{"label": "ads_text_banner", "x0": 0, "y0": 400, "x1": 900, "y1": 460},
                {"label": "ads_phone", "x0": 100, "y0": 405, "x1": 300, "y1": 455},
                {"label": "ads_qrcode", "x0": 700, "y0": 50, "x1": 800, "y1": 150},
                {"label": "game_battle_royale", "x0": 0, "y0": 0, "x1": 300, "y1": 100}]
    boxes = [(500, 410, 700, 450), (120, 410, 280, 450), (720, 80, 780, 120), (10, 10, 100, 40), (400, 200, 500, 230)]
    t = box_targets(boxes, overlays, REGION_CLASSES)
    assert t == [REGION_CLASSES.index("ads_text_banner"), REGION_CLASSES.index("ads_phone"), IGNORE, 0, 0]


def _separable_set(n_per: int = 40, seed: int = 0) -> RegionSet:
    """Features where each class has its own direction; frames hold one box each."""
    rng = np.random.default_rng(seed)
    k, c = len(REGION_CLASSES), 1280
    centres = rng.normal(0, 1, (k, c)).astype(np.float32)
    y = np.repeat(np.arange(k), n_per)
    feats = centres[y] + rng.normal(0, 0.3, (len(y), c)).astype(np.float32)
    frames = [({REGION_CLASSES[j]} if j else set()) for j in y]
    return RegionSet(feats=feats, geometry=rng.random((len(y), GEOMETRY_DIM)).astype(np.float32),
                     targets=y.astype(np.int64), frame=np.arange(len(y)), boxes=np.zeros((len(y), 4), np.float32),
                     frame_labels=frames)


def test_plateau_threshold_takes_the_middle_of_the_best_range():
    # Positives score 0.74 and 0.99, negatives 0.1 and 0.2: every threshold in (0.2, 0.74] is perfect.
    scores, truth = np.array([0.74, 0.99, 0.1, 0.2]), np.array([True, True, False, False])
    grid = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert plateau_threshold(scores, truth, grid) == 0.5
    # A lone best threshold is taken as it is.
    assert plateau_threshold(np.array([0.35, 0.45]), np.array([False, True]), grid) == 0.4


def test_fit_head_thresholds_metrics_and_store_roundtrip(imagenet_regions, tmp_path):
    model = imagenet_regions
    train, val = _separable_set(seed=0), _separable_set(n_per=15, seed=0)
    history = fit_head(model, train, epochs=15)
    assert history[-1] < history[0] * 0.5
    assert region_accuracy(model, val) > 0.95
    model.thresholds = choose_thresholds(model, val)
    assert set(model.thresholds) == {"ads_watermark", "ads_logo", "ads_text_banner"}
    m = frame_metrics(model, val)
    assert all(v["accuracy"] > 0.95 and v["support"] == 15 for v in m.values())
    scores = frame_scores(model, val)
    assert scores.shape == (len(val.frame_labels), len(REGION_CLASSES))
    # Published head-only; loading rebuilds the ImageNet backbone and gives the same outputs.
    store = ModelStore(tmp_path / "store")
    ref = save_region_model(store, "ads_regions", model, {"task": "ads_regions"})
    assert (tmp_path / "store" / "ads_regions" / "1" / "model.pt").stat().st_size < 2_000_000
    again = load_region_model(store, ref)
    assert again.thresholds == model.thresholds
    frame = np.random.default_rng(1).integers(0, 255, (270, 480, 3), dtype=np.uint8)
    boxes = [(10, 10, 120, 40), (200, 200, 400, 240)]
    np.testing.assert_allclose(again.classify(frame, boxes), model.classify(frame, boxes), atol=1e-5)
    assert again.classify(frame, []).shape == (0, len(REGION_CLASSES))


def test_load_region_model_refuses_other_models(tmp_path):
    store = ModelStore(tmp_path)
    ref = store.save("safety", {"w": torch.zeros(1)}, {"arch": {"name": "mobilenet_v2"}})
    with pytest.raises(ConfigError, match="not a region classifier"):
        load_region_model(store, ref)
    bad = store.save("ads_regions", {"head.net.0.weight": torch.zeros(2, 2)},
                     {"arch": {"kind": "region_classifier", "backbone": "mobilenet_v2",
                               "classes": list(REGION_CLASSES), "crop_hw": [96, 288]}})
    with pytest.raises(ConfigError, match="do not match"):
        load_region_model(store, bad)
    with pytest.raises(ConfigError, match="region_none"):
        RegionClassifier(classes=("ads_logo", "region_none"), pretrained=False)


def test_contact_flags_put_entities_in_their_text_boxes():
    boxes = [(0, 0, 100, 20), (0, 40, 100, 60), (200, 0, 300, 20)]
    # One entity inside box 0, one split across boxes 0 and 1 (centre in the gap: neither), none in box 2.
    assert contact_flags(boxes, [(10, 2, 60, 18)]) == [True, False, False]
    assert contact_flags(boxes, [(10, 2, 60, 18), (10, 30, 90, 50)]) == [True, True, False]
    assert contact_flags(boxes, []) == [False, False, False]


def test_box_decisions_let_the_reading_refute_a_contact():
    classes = list(REGION_CLASSES)
    phone, banner, logo = classes.index("ads_phone"), classes.index("ads_text_banner"), classes.index("ads_logo")
    p = np.zeros((3, len(classes)), np.float32)
    p[0, [0, phone, banner, logo]] = (0.1, 0.8, 0.04, 0.06)  # a pill: phone by appearance
    p[1, [0, phone]] = (0.3, 0.7)
    p[2, [0, logo]] = (0.2, 0.8)
    # Appearance alone: the best class.
    assert [n for n, _ in box_decisions(classes, p)] == ["ads_phone", "ads_phone", "ads_logo"]
    got = box_decisions(classes, p, contacts=[False, True, False])
    # Box 0: no contact was read, so it is a banner (not the likelier logo), scored by the whole ad mass.
    assert got[0] == ("ads_text_banner", pytest.approx(0.9))
    assert got[1] == ("ads_phone", pytest.approx(0.7))  # a contact was read: appearance stands
    assert got[2] == ("ads_logo", pytest.approx(0.8))  # not a contact class: untouched


def test_region_hits_keep_argmax_labels_above_threshold():
    model = RegionClassifier(pretrained=False)
    # Steer the head: a constant bias towards ads_logo, every weight zero.
    with torch.no_grad():
        for p in model.head.parameters():
            p.zero_()
        model.head.net[-1].bias[REGION_CLASSES.index("ads_logo")] = 5.0
    frame = np.zeros((100, 200, 3), np.uint8)
    hits = region_hits(model, frame, [(10, 10, 60, 30), (100, 50, 180, 80)])
    assert [h.label for h in hits] == ["ads_logo", "ads_logo"] and hits[0].score > 0.9
    assert frame_labels(hits) == {"ads_logo": pytest.approx(hits[0].score)}
    model.thresholds = {"ads_logo": 0.999}
    assert region_hits(model, frame, [(10, 10, 60, 30)]) == []
    assert region_hits(model, frame, [(10, 10, 60, 30)], labels=("ads_watermark",)) == []


def test_run_on_generated_frames_with_the_real_detector(tmp_path):
    from livelens.data import write_manifest
    from livelens.data.frames import FrameConfig, frames_card, generate_frames

    cfg = FrameConfig(p_negative=0.2, p_ads=0.8, p_game=0.0, p_black=0.0, p_frozen=0.0)
    manifest = write_manifest(generate_frames(0, 16, seed=11, cfg=cfg), tmp_path / "frames",
                              frames_card(11, 16, cfg), contact_sheet=False)
    summary = run(RegionTrainConfig(manifest=str(manifest), train_limit=None, val_limit=None, test_limit=0,
                                    epochs=5, model_store=str(tmp_path / "store")))
    assert summary["proposals"]["train"] > 0 and summary["positives"]["train"] > 0
    assert "test" not in summary and set(summary["thresholds"]) == {"ads_watermark", "ads_logo", "ads_text_banner"}
    card = ModelStore(tmp_path / "store").card(summary["ref"])
    assert card["datasets"] == ["frames@1#seed=11"] and card["proposals"] == "PP-OCR text detection"
    # The OCR deployment's loader, on the default chain, finds exactly this model in the user store.
    import os

    from livelens.evidence.regions import open_region_model

    os.environ["LIVELENS_MODEL_STORE"] = str(tmp_path / "store")
    try:
        _, ref, root = open_region_model("ads_regions")
    finally:
        del os.environ["LIVELENS_MODEL_STORE"]
    assert (ref, root) == (summary["ref"], str(tmp_path / "store"))
    # Seed 3's 16 slots fall in train and test only: no validation split to choose thresholds on.
    no_val = write_manifest(generate_frames(0, 16, seed=3, cfg=cfg), tmp_path / "no_val", frames_card(3, 16, cfg),
                            contact_sheet=False)
    with pytest.raises(ManifestError, match="no rows in split 'val'"):
        run(RegionTrainConfig(manifest=str(no_val), train_limit=2, epochs=1, register=False),
            detector=lambda frame: [(0.0, 0.0, 40.0, 12.0)])
    with pytest.raises(ConfigError):
        RegionTrainConfig(epochs=0).validate()


def _fresh_frames(label: str, n: int, seed: int = 99) -> list[np.ndarray]:
    """Generated frames (a seed never trained on) whose only ad is ``label``."""
    import io

    from PIL import Image

    from livelens.data.frames import FrameConfig, generate_frames

    cfg = FrameConfig(p_negative=0.0, p_ads=1.0, p_game=0.0, p_black=0.0, p_frozen=0.0, p_small=0.0)
    out = []
    for slot in range(400):
        row = generate_frames(slot, 1, seed=seed, cfg=cfg)[0]
        if {lab for lab in row["labels"] if lab.startswith("ads_")} == {label}:
            out.append(np.asarray(Image.open(io.BytesIO(row["image_bytes"])).convert("RGB")))
            if len(out) == n:
                return out
    raise AssertionError(f"fewer than {n} frames with only {label}")


def test_shipped_region_model_finds_text_overlays_on_unseen_frames():
    """The shipped ads_regions on PP-OCR boxes, read as serving reads them: most overlays are caught."""
    from pathlib import Path

    from livelens.ocr import create_engine
    from livelens.train.regions import ppocr_reader

    store = ModelStore(Path(__file__).resolve().parents[1] / "livelens" / "resources" / "default_models")
    model = load_region_model(store, "ads_regions")
    engine = create_engine("ppocr")
    read = ppocr_reader(engine)
    for label in ("ads_watermark", "ads_logo", "ads_text_banner"):
        found = []
        for f in _fresh_frames(label, 4):
            boxes = [b.box for b in engine.detect([f])[0]]
            found.append(label in frame_labels(region_hits(model, f, boxes, contacts=read(f, boxes))))
        # Held-out frame recall is 0.83 / 0.92 / 0.95 (card): 3 of 4 unseen frames at least.
        assert sum(found) >= 3, (label, found)


def test_box_cache_skips_the_detector_on_a_rerun(tmp_path):
    from livelens.data import write_manifest
    from livelens.data.frames import FrameConfig, frames_card, generate_frames

    cfg = FrameConfig()
    manifest = write_manifest(generate_frames(0, 6, seed=5, cfg=cfg), tmp_path / "frames", frames_card(5, 6, cfg),
                              contact_sheet=False)
    calls = []

    def detector(frame):
        calls.append(frame.shape)
        return [(1.0, 2.0, 60.0, 20.0)]

    model = RegionClassifier(pretrained=False)
    path = tmp_path / "cache" / "boxes.json"
    first = build_region_set(model, str(manifest), "train", detector, cache=BoxCache(path))
    n = len(calls)
    assert n == len(first.frame_labels) and path.is_file()
    again = build_region_set(model, str(manifest), "train", detector, cache=BoxCache(path))
    assert len(calls) == n  # every frame's boxes came from the file
    np.testing.assert_array_equal(again.boxes, first.boxes)
    np.testing.assert_allclose(again.feats, first.feats, atol=1e-5)
    path.write_text("{not json")
    assert BoxCache(path).boxes == {}  # a torn file only costs a re-detection
