"""The safety job end to end on a tiny generated manifest: bad configs, DDP with comm hooks, resume, sweep.

Ray runs are slow on 2 cores (~1 min each), so there are few and they are tiny: 64 px
images, a random-init mobilenet_v2, 2 epochs of a few dozen frames.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from livelens.errors import ConfigError, ManifestError, TaxonomyError
from livelens.store import ModelStore
from livelens.train import LoopConfig
from livelens.train.driver import read_checkpoint
from train_jobs.safety import SafetyTrainConfig, run


def make_frames_manifest(out: Path, slots: int = 24) -> Path:
    """~30 generated live-stream frames (ads, HUDs, black, frozen) as a real manifest."""
    from livelens.data import write_manifest
    from livelens.data.frames import FrameConfig, frames_card, generate_frames

    cfg = FrameConfig()
    return write_manifest(generate_frames(0, slots, seed=3, cfg=cfg), out, frames_card(3, slots, cfg),
                          contact_sheet=False)


@pytest.fixture(scope="module")
def frames_manifest(tmp_path_factory) -> Path:
    return make_frames_manifest(tmp_path_factory.mktemp("data") / "frames")


def tiny(manifest: Path, tmp: Path, **loop) -> SafetyTrainConfig:
    return SafetyTrainConfig(
        manifest=str(manifest), pretrained=False, freeze_backbone=False, evidence_crop=False, image_size=64, num_workers=2,
        cpus_per_worker=0.5, storage_path=str(tmp / "train"), run_name="t", model_store=str(tmp / "store"),
        loop=LoopConfig(**{"epochs": 2, "lr": 3e-3, "batch_size": 8, "precision": "bf16", **loop}))


def test_bad_configs_fail_before_any_worker(frames_manifest, tmp_path):
    base = tiny(frames_manifest, tmp_path)
    with pytest.raises(ConfigError, match="unknown pooling 'sumpool'"):
        run(replace(base, pool="sumpool"))
    with pytest.raises(TaxonomyError, match="not found"):
        run(replace(base, taxonomy=str(tmp_path / "nope.yaml")))
    other = tmp_path / "tax.yaml"  # a valid taxonomy that knows none of the generated labels
    other.write_text('version: "t1"\ngroups:\n  - {name: fruit, kind: exclusive, negative: fruit_none}\n'
                     "labels:\n  - {name: fruit}\n  - {name: apple, parent: fruit}\n")
    from livelens.taxonomy import load_taxonomy

    assert load_taxonomy(other).version == "t1"
    with pytest.raises(ConfigError, match="not in taxonomy t1"):
        run(replace(base, taxonomy=str(other)))
    with pytest.raises(ManifestError):
        run(replace(base, manifest=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="fp16"):
        run(replace(base, loop=LoopConfig(precision="fp16")))
    with pytest.raises(ConfigError, match="comm hook"):
        run(replace(base, loop=LoopConfig(comm_hook="topk")))
    assert not (tmp_path / "train").exists()  # nothing was started


def test_sweep_pool_grid_multiplies_only_bilinear():
    from train_jobs.sweep import effective_pool, pool_grid

    grid = pool_grid(["avg", "tree", "bilinear"], ["full", "compact"])
    assert grid == [("avg", "-"), ("tree", "-"), ("bilinear", "full"), ("bilinear", "compact")]
    assert [effective_pool(*pv) for pv in grid] == ["avg", "tree", "bilinear", "compact_bilinear"]


def test_sweep_makes_local_paths_absolute_for_trial_directories(tmp_path, monkeypatch):
    from train_jobs.sweep import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(SafetyTrainConfig(manifest="runs/data/frames", storage_path="s3://bucket/train",
                                           model_store="runs/model_store"))
    assert cfg.manifest == str(tmp_path / "runs/data/frames")
    assert cfg.model_store == str(tmp_path / "runs/model_store")
    assert cfg.storage_path == "s3://bucket/train" and cfg.taxonomy is None


def _losses(summary: dict) -> list[float]:
    from ray.train import Checkpoint

    state, _, _ = read_checkpoint(Checkpoint(summary["checkpoint"]))
    return [h["train_loss"] for h in state["fit"]["history"]]


@pytest.mark.slow
@pytest.mark.ray
def test_ddp_powersgd_lowers_loss_and_registers(ray_session, frames_manifest, tmp_path):
    summary = run(tiny(frames_manifest, tmp_path, comm_hook="powersgd", powersgd_rank=2))
    losses = _losses(summary)
    assert summary["val"]["world_size"] == 2
    assert len(losses) == 2 and losses[-1] < losses[0]
    card = ModelStore(tmp_path / "store").card(summary["ref"])
    assert summary["ref"] == "safety@1"
    for key in ("datasets", "taxonomy_version", "backbone", "pooling", "metrics", "git_sha", "train_time_s"):
        assert card[key] not in (None, "", [])
    assert set(card["groups"]) >= {"ads", "game"}
    assert (tmp_path / "train" / "t" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.ray
def test_worker_crash_resumes_from_checkpoint_fp16_hook(ray_session, frames_manifest, tmp_path):
    marker = tmp_path / "crashed"
    cfg = tiny(frames_manifest, tmp_path, comm_hook="fp16", fail_at_epoch=1, fail_once_marker=str(marker),
               precision="fp32")
    summary = run(replace(cfg, register=False))
    assert marker.exists()  # rank 1 really died once
    assert summary["val"]["start_epoch"] == 1 and summary["val"]["resumed_from_epoch"] == 1
    assert summary["val"]["epoch"] == 1
    losses = _losses(summary)  # history survives the restart: both epochs
    assert len(losses) == 2 and losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_three_trials_registers_best(ray_session, frames_manifest, tmp_path):
    from train_jobs.sweep import SweepConfig
    from train_jobs.sweep import run as sweep

    base = replace(tiny(frames_manifest, tmp_path, epochs=2, precision="fp32"), num_workers=1, register=False,
                   max_failures=0)
    sc = SweepConfig(base=base, backbones=["mobilenet_v2"], pools=["avg", "gated", "bilinear"],
                     bilinear_variants=["compact"], lrs=[3e-3], num_samples=1, max_concurrent=3,
                     out=str(tmp_path / "sweep"))
    summary = sweep(sc)
    assert summary["trials"] == 3 and summary["errors"] == 0
    lines = (tmp_path / "sweep" / "results.md").read_text().strip().splitlines()
    assert len(lines) == 2 + 3
    assert (tmp_path / "sweep" / "accuracy_vs_cost.png").stat().st_size > 5000
    assert {line.split("|")[3].strip() for line in lines[2:]} == {"avg", "gated", "compact_bilinear"}  # the grid
    card = ModelStore(tmp_path / "store").card(summary["ref"])
    assert card["pooling"] in {"avg", "gated", "compact_bilinear"}
    assert card["metrics"]["accuracy"] == pytest.approx(summary["best_val_accuracy"])
    assert json.loads((tmp_path / "sweep" / "summary.json").read_text())["ref"] == summary["ref"]
