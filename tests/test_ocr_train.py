"""The OCR training job: its schedule, batching and config checks, and a tiny Ray Train run end to end."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from livelens.errors import ConfigError
from livelens.ocr import mmocr_adapter as mm
from livelens.ocr.metrics import det_metrics, rec_metrics
from livelens.ocr.train import OcrTrainConfig, run, width_buckets
from livelens.store import ModelStore
from livelens.train.loop import FitState, LoopConfig, StepSchedule, lr_at
from train_jobs.ocr import PRESETS, parse_args, preset_config, task_config


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


def test_schedule_ends_on_steps_or_time_whichever_first_and_resumes_where_it_was():
    cfg = LoopConfig(lr=1e-3, schedule="warmup_cosine", warmup_steps=2)
    state = FitState(step=5)
    sched = StepSchedule(cfg, total_steps=10, state=state)
    assert sched.progress() == pytest.approx(0.5) and not sched.done()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert sched.apply(opt) == pytest.approx(lr_at(0.5, 5, 1e-3, 2))  # mid-cosine, not warming up again
    state.step = 10
    assert sched.done()
    timed = StepSchedule(LoopConfig(max_minutes=0.05 / 60), total_steps=10**9, state=FitState(loop_s=0.04))
    time.sleep(0.02)
    assert timed.done() and timed.progress() >= 1.0  # the budget spent before a resume counts


@pytest.mark.parametrize("bad", [dict(task="seg"), dict(task="det", model="crnn_minivgg"),
                                 dict(source="s3"), dict(loop=LoopConfig(epochs=0)), dict(loop=LoopConfig(lr=0.0)),
                                 dict(loop=LoopConfig(max_minutes=-1)), dict(loop=LoopConfig(schedule="steps")),
                                 dict(source="manifest", data="/nonexistent")])
def test_bad_configs_are_typed_errors(bad):
    with pytest.raises(ConfigError):
        OcrTrainConfig(**bad)


def test_presets_parse_and_flags_override():
    tasks, a = parse_args(["--task", "rec", "--max-minutes", "1.5", "--max-samples", "100", "--no-pretrained"])
    cfg = task_config(tasks[0], a)
    assert tasks == ["rec"] and cfg.model == PRESETS["cpu"]["rec"]["model"] == "crnn_resnet_small"
    assert cfg.loop.max_minutes == 1.5 and cfg.max_samples == cfg.generate == 100 and not cfg.pretrained
    assert cfg.loop.batch_size == PRESETS["cpu"]["rec"]["batch_size"]  # the preset stays where no flag was given
    for preset in PRESETS:
        for task in PRESETS[preset]:
            preset_config(preset, task)  # every preset is a valid config
    assert preset_config("gpu", "rec").loop.use_gpu
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
def test_tiny_ray_train_run_publishes_a_loadable_model(ray_session, tmp_path, task, monkeypatch):
    """On the shared loop; the recogniser's run loses a worker and resumes optimiser, scheduler and step."""
    from ray.train import Checkpoint

    from livelens.train.driver import read_checkpoint

    cfg = preset_config("smoke", task)
    marker = tmp_path / "died"
    loop = cfg.loop if task == "det" else LoopConfig(**{**cfg.loop.__dict__, "epochs": 3, "fail_at_epoch": 1,
                                                         "fail_once_marker": str(marker), "fail_rank": 0})
    cfg = OcrTrainConfig(**{**cfg.__dict__, "store": str(tmp_path / "store"), "storage_path": str(tmp_path / "ray"),
                            "loop": loop})
    out = run(cfg)
    card = ModelStore(cfg.store).card(out["ref"])
    assert out["ref"] == f"ocr_{task}_{cfg.model}@1" and card["arch"]["config"] == cfg.model
    assert card["init"] == ("imagenet:mobilenet_v2" if task == "det" else "random")
    m = card["metrics"]
    assert m["global_step"] >= 1 and np.isfinite(m["train_loss"])
    held = [k for k in m if k.startswith("heldout_")]
    assert held and all(0.0 <= m[k] <= 1.0 for k in held)
    if task == "rec":
        # 32 lines in batches of 16: 2 steps an epoch, 3 epochs; the worker died after epoch 1's steps.
        assert marker.exists() and m["resumed_from_epoch"] == 1 and m["epoch"] == 2
        state, _, _ = read_checkpoint(Checkpoint(out["checkpoint"]))
        assert state["fit"]["step"] == m["global_step"] == 6
        # AdamW's own step count only reaches 6 if its state came back from the checkpoint.
        assert all(int(v["step"]) == 6 for v in state["optimizer"]["state"].values())
        assert m["lr"] == pytest.approx(lr_at(5 / 6, 5, cfg.loop.lr, cfg.loop.warmup_steps, cfg.loop.lr_floor))
    # The engine builds the config the card names, at the size it was trained at.
    eng = mm.MmocrEngine(**{task: out["ref"]}, store=cfg.store)
    if task == "det":
        assert eng.det_name == cfg.model and eng.det_size == cfg.det_size
        assert isinstance(eng.detect([np.full((64, 96, 3), 255, np.uint8)])[0], list)
    else:
        assert eng.rec_name == cfg.model
        assert isinstance(eng.recognize([np.full((32, 80, 3), 255, np.uint8)])[0][0], str)
    # Serving loads exactly this model when its store heads the chain.
    from serve_apps.ocr import OcrArgs, _engine

    monkeypatch.setenv("LIVELENS_MODEL_STORE", cfg.store)
    served = _engine(OcrArgs(engine="mmocr", engine_kwargs={task: out["ref"].split("@")[0]}))
    assert served.model_refs == {task: out["ref"]}
