"""Learned quality flags: packed trees, the fit, and the shipped model on photos it never saw."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from livelens.errors import ConfigError
from livelens.evaluation import real_photos
from livelens.quality import flags as fl
from livelens.quality import realset as R
from livelens.quality.engine import QualityEngine
from livelens.quality.flag_training import FlagTrainConfig, _best_threshold, fit_model, table
from livelens.store import SHIPPED_STORE, ModelStore


def test_packed_trees_give_scikit_learns_probabilities():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] ** 2 > 0.4).astype(int)
    x[::17, 2] = np.nan  # missing values take the side the trees learnt
    clf = fl.fit_trees(x, y)
    packed = fl.pack_trees(clf)
    p = 1.0 / (1.0 + np.exp(-fl.tree_logits(packed, x[:50])))
    assert np.allclose(p, clf.predict_proba(x[:50])[:, 1], atol=1e-5)


def test_fit_model_learns_a_planted_signal_and_round_trips():
    rng = np.random.default_rng(1)
    n = 240
    y = np.zeros((n, len(fl.FLAGS)), bool)
    y[np.arange(n), rng.integers(0, len(fl.FLAGS), n)] = True
    y[rng.random(n) < 0.3] = False  # clean rows
    x = rng.normal(size=(n, 5)).astype(np.float32) + 2.0 * y[:, :3].astype(np.float32) @ np.eye(3, 5, dtype=np.float32)
    maps = rng.normal(size=(n, 128, 2, 3)).astype(np.float32) * 0.1
    maps[y[:, 3], :, 0, 0] += 3.0  # the occluder lives in one cell
    groups = np.array([f"photo{i % 12}" for i in range(n)])
    model, cv = fit_model(x, maps, y, groups, folds=3)
    assert set(cv) == set(fl.FLAGS)
    probs = model.probabilities(x, maps)
    for j, f in enumerate(fl.FLAGS):
        pred = probs[f] >= model.thresholds[f]
        assert (pred == y[:, j]).mean() > 0.9, f
    again = fl.FlagModel.from_state(model.state_dict())
    for f in fl.FLAGS:
        assert np.allclose(again.probabilities(x[:10], maps[:10])[f], probs[f][:10])
    with pytest.raises(ConfigError):
        fl.FlagModel.from_state({"thresholds": torch.zeros(4)})


def test_threshold_maximises_the_weaker_of_precision_and_recall():
    p = np.array([0.1, 0.2, 0.35, 0.4, 0.8, 0.9])
    y = np.array([False, False, True, False, True, True])
    assert _best_threshold(p, y) == pytest.approx(0.35)


def test_level_table_counts_false_alarms_against_each_level():
    rows = [{"truth": ["dark"], "distortion": "dark", "level": 1, "after": ["dark"]},
            {"truth": ["dark"], "distortion": "dark", "level": 2, "after": []},
            {"truth": [], "distortion": "none", "level": 0, "after": ["dark"]},
            {"truth": [], "distortion": "none", "level": 0, "after": []},
            # A darkened frame of a photo that is blurred already: a blur positive, but not blur's level 2.
            {"truth": ["blur", "dark"], "distortion": "dark", "level": 2, "after": ["blur"]}]
    t = table(rows, "after")["dark"]
    assert t["1"] == {"n": 1, "recall": 1.0, "precision": 0.5}
    assert t["2"]["n"] == 2 and t["2"]["recall"] == 0.0 and t["negatives"]["false_alarms"] == 1
    assert t["all"]["recall"] == pytest.approx(1 / 3)
    blur = table(rows, "after")["blur"]
    assert blur["all"] == {"n": 1, "recall": 1.0, "precision": 1.0} and blur["2"]["n"] == 0


def test_a_photo_with_a_documented_defect_carries_it_on_every_frame():
    from skimage import data as skd

    from livelens.imageio import load_image

    # scikit-image documents clock as shot while the camera moved: its clean frames are blurred.
    items = R.items_for("skimage/clock", load_image(skd.clock()))
    assert items and all("blur" in it.flags for it in items)
    assert {it.flags for it in items if it.distortion == "none"} == {frozenset({"blur"})}
    assert any(it.flags == frozenset({"blur", "occlusion"}) for it in items)
    others = R.items_for("skimage/camera", load_image(skd.camera()))
    assert {it.flags for it in others if it.distortion == "none"} == {frozenset()}


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError):
        FlagTrainConfig(seeds=(0, 1), ship_seed=5)
    with pytest.raises(ConfigError):
        FlagTrainConfig(test_share=0.9)


def test_splits_are_photo_disjoint_and_keep_stereo_pairs_together():
    names = [f"p{i}" for i in range(20)] + ["skimage/motorcycle_left", "skimage/motorcycle_right"]
    for seed in range(3):
        train, test = R.photo_splits(names, seed)
        assert not set(train) & set(test) and sorted(train + test) == sorted(names)
        assert ("skimage/motorcycle_left" in test) == ("skimage/motorcycle_right" in test)


def test_more_windows_add_views_and_keep_the_first_two():
    from skimage import data as skd

    rgb = skd.astronaut()
    assert R.bases(2) == ("centre", "zoom") and R.bases(4) == ("centre", "zoom", "zoom_2", "zoom_3")
    two, four = R.items_for("skimage/astronaut", rgb), R.items_for("skimage/astronaut", rgb, windows=4)
    assert {it.key for it in two} < {it.key for it in four}
    assert len(four) - len(two) == len(two) - len(R.HARD_NEGATIVES)  # two more windows' worth
    views = [R.base_frame(rgb, "skimage/astronaut", b) for b in R.bases(4)]
    assert all(min(v.shape[:2]) >= 270 for v in views)  # never upscaled, still a stream-sized frame
    assert not any(np.array_equal(a, b) for a, b in itertools.combinations(views[1:], 2))
    with pytest.raises(ValueError):
        R.bases(0)
    with pytest.raises(ConfigError):
        FlagTrainConfig(windows=0)


# -- the shipped model, on photos its card says it never saw -----------------------------------------

@pytest.fixture(scope="module")
def shipped():
    store = ModelStore(SHIPPED_STORE)
    card = store.card(fl.MODEL_NAME)
    held_out = card["metrics"]["held_out_photos"]
    photos = {n: p for n, p in real_photos(packages=True) if n in held_out}
    assert len(photos) >= 8, "the shipped card's held-out photos are not all available here"
    assert not set(held_out) & set(card["datasets"][0]["photos"])
    engine = QualityEngine(iqa_ref=None, stores=[SHIPPED_STORE], flags_ref=fl.MODEL_NAME)
    return engine, photos


def _answer(engine: QualityEngine, item: R.Item, rgb: np.ndarray) -> dict:
    return engine.assess(R.render(item, rgb))


def _raised(a: dict) -> set[str]:
    b = a["brightness"]
    return {f for f, on in (("dark", b["dark"]), ("bright", b["bright"]), ("blur", a["blur"]["flag"]),
                            ("occlusion", a["occlusion"]["flag"])) if on}


def test_hard_negatives_are_not_flagged(shipped):
    """Clean frames, the darkest and the flattest window of each held-out photo (jackets, sky, walls)."""
    engine, photos = shipped
    answers = [_answer(engine, R.Item(n, base, "none", 0), rgb) for n, rgb in sorted(photos.items())
               for base in ("centre", "dark_50", "flat_50")]
    flagged = sum(bool(_raised(a)) for a in answers)
    classical = QualityEngine(iqa_ref=None, stores=[SHIPPED_STORE], flags_ref=None)
    before = sum(bool(_raised(classical.assess(R.render(R.Item(n, base, "none", 0), rgb))))
                 for n, rgb in sorted(photos.items()) for base in ("centre", "dark_50", "flat_50"))
    # The goal is none. The shipped model flags 6 of 42, as many as the classical thresholds do
    # (a washed-out window scene and a blurred ICDAR street photo among them, docs/quality.md):
    # this holds it there and no worse than the classical flags.
    assert flagged <= 0.15 * len(answers) and flagged <= before, (flagged, before, len(answers))
    assert all(a["models"][-1].startswith(fl.MODEL_NAME) and "flags_model" in a for a in answers)


def test_mild_levels_are_flagged(shipped):
    engine, photos = shipped
    for dist in R.LEVELS:
        flag = R.FLAG_OF[dist]
        hits = []
        for n, rgb in sorted(photos.items()):
            if dist in ("dark", "bright") and not R.EXPOSURE_RANGE[0] <= R.trimmed_luma(
                    R.base_frame(rgb, n, "centre")) <= R.EXPOSURE_RANGE[1]:
                continue
            hits.append(flag in _raised(_answer(engine, R.Item(n, "centre", dist, 1, "block"), rgb)))
        # Level 1 is the mild end a viewer still notices; docs/quality.md has the per-level table.
        assert len(hits) >= 5 and np.mean(hits) >= 0.7, (dist, hits)


def test_each_flag_responds_monotonically_to_its_level(shipped):
    engine, photos = shipped
    names = sorted(photos)[:4]
    for dist in ("dark", "bright", "gaussian_blur", "motion_blur"):
        flag = R.FLAG_OF[dist]
        ps = []
        for lv in range(0, 6):  # 0: the clean frame
            vals = [_answer(engine, R.Item(n, "centre", dist if lv else "none", lv), photos[n])["flags_model"]["p"][flag]
                    for n in names]
            ps.append(float(np.mean(vals)))
        # Mean probability over four photos: clean far below level 1, and no level more than 0.05
        # below the one before it.
        assert ps[1] > ps[0] + 0.3 and all(b >= a - 0.05 for a, b in itertools.pairwise(ps)), (dist, ps)


def test_black_frame_still_reports_only_its_root_cause(shipped):
    engine, _ = shipped
    black = np.random.default_rng(0).integers(0, 3, (540, 960, 3)).astype(np.uint8)
    answer = engine.assess(black)
    assert [lab["name"] for lab in answer["labels"]] == ["quality_black"]
    assert "flags_model" in answer  # the learned model ran; the black rule still suppressed its flags
