"""The OCR training job: its schedule, batching and config checks, and a tiny Ray Train run end to end."""

from __future__ import annotations

import time

import numpy as np
import pytest

from livelens.errors import ConfigError
from livelens.ocr import mmocr_adapter as mm
from livelens.ocr.metrics import det_metrics, rec_metrics
from livelens.ocr.train import Budget, OcrTrainConfig, lr_at, run, width_buckets
from livelens.store import ModelStore
from train_jobs.ocr import PRESETS, parse_args, task_config


def test_width_buckets_cover_every_sample_once_and_stay_tight():
    rng = np.random.default_rng(0)
    aspects = rng.uniform(1.0, 12.0, 1000)
    batches = width_buckets(aspects, 50, rng)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    spread = np.mean([aspects[b].max() / aspects[b].min() for b in batches])
    random_spread = np.mean([aspects[b].max() / aspects[b].min() for b in np.array_split(rng.permutation(1000), 20)])
    assert spread < 1.6 < random_spread
    # Membership changes between epochs (the jitter), so batches are not the same every pass.
    again = width_buckets(aspects, 50, np.random.default_rng(1))
    assert {tuple(sorted(b)) for b in batches} != {tuple(sorted(b)) for b in again}


def test_lr_warms_up_then_decays_to_the_floor():
    assert lr_at(0.0, 0, 1e-3, 10) == pytest.approx(1e-4)
    assert lr_at(0.0, 9, 1e-3, 10) == pytest.approx(1e-3)
    assert lr_at(0.5, 100, 1e-3, 10) == pytest.approx(1e-3 * (0.02 + 0.98 * 0.5))
    assert lr_at(1.0, 100, 1e-3, 10) == pytest.approx(2e-5)
    assert lr_at(3.0, 100, 1e-3, 10) == pytest.approx(2e-5)


def test_budget_ends_on_steps_or_time_whichever_first():
    b = Budget(total_steps=10)
    b.step = 5
    assert b.progress() == pytest.approx(0.5) and not b.done()
    b.step = 10
    assert b.done()
    t = Budget(total_steps=10**9, max_seconds=0.05)
    time.sleep(0.06)
    assert t.done() and t.progress() >= 1.0


@pytest.mark.parametrize("bad", [dict(task="seg"), dict(task="det", model="crnn_minivgg"),
                                 dict(source="s3"), dict(epochs=0), dict(lr=0.0), dict(max_minutes=-1),
                                 dict(source="manifest", data="/nonexistent")])
def test_bad_configs_are_typed_errors(bad):
    with pytest.raises(ConfigError):
        OcrTrainConfig(**bad)


def test_presets_parse_and_flags_override():
    tasks, a = parse_args(["--task", "rec", "--max-minutes", "1.5", "--max-samples", "100"])
    cfg = task_config(tasks[0], a)
    assert tasks == ["rec"] and cfg.model == PRESETS["cpu"]["rec"]["model"] == "crnn_resnet_small"
    assert cfg.max_minutes == 1.5 and cfg.max_samples == cfg.generate == 100
    for preset in PRESETS.values():
        for task, kw in preset.items():
            OcrTrainConfig(task=task, **kw)  # every preset is a valid config
    with pytest.raises(SystemExit):
        parse_args(["--model", "crnn_minivgg"])  # one model for two tasks


def test_metrics_are_mmocr_metrics_on_plain_inputs():
    m = rec_metrics([("韩国小馆", "韩国小馆"), ("VX12", "vx123")])
    assert m["word_acc"] == 0.5 and 0.5 < m["char_recall"] < 1.0
    square = np.array([0, 0, 10, 0, 10, 10, 0, 10], np.float32)
    far = square + 100
    d = det_metrics([([square, far], [0.9, 0.9])], [([square], [False])])
    assert d["recall"] == 1.0 and d["precision"] == 0.5


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("task", ["det", "rec"])
def test_tiny_ray_train_run_publishes_a_loadable_model(ray_session, tmp_path, task):
    kw = dict(PRESETS["smoke"][task])
    cfg = OcrTrainConfig(task=task, store=str(tmp_path / "store"), storage_path=str(tmp_path / "ray"), **kw)
    out = run(cfg)
    card = ModelStore(cfg.store).card(out["ref"])
    assert out["ref"] == f"ocr_{task}_{cfg.model}@1" and card["arch"]["config"] == cfg.model
    assert card["init"] == ("imagenet:mobilenet_v2" if task == "det" else "random")
    assert card["metrics"]["steps"] >= 1 and np.isfinite(card["metrics"]["loss"])
    held = [k for k in card["metrics"] if k.startswith("heldout_")]
    assert held and all(0.0 <= card["metrics"][k] <= 1.0 for k in held)
    # The engine builds the config the card names, at the size it was trained at.
    eng = mm.MmocrEngine(**{task: out["ref"]}, store=cfg.store)
    if task == "det":
        assert eng.det_name == cfg.model and eng.det_size == cfg.det_size
        assert isinstance(eng.detect([np.full((64, 96, 3), 255, np.uint8)])[0], list)
    else:
        assert eng.rec_name == cfg.model
        assert isinstance(eng.recognize([np.full((32, 80, 3), 255, np.uint8)])[0][0], str)
