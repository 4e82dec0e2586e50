"""One store chain: every job publishes where serving looks, and serving loads exactly what a job published."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from livelens.errors import ModelNotFoundError
from livelens.store import (
    SHIPPED_STORE,
    ModelStore,
    find_in_stores,
    open_in_stores,
    project_root,
    store_chain,
    user_store,
)


def test_the_chain_is_the_user_store_then_the_shipped_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("LIVELENS_MODEL_STORE", raising=False)
    monkeypatch.delenv("LIVELENS_MODEL_STORES", raising=False)
    monkeypatch.chdir(tmp_path)  # anchored at the project, not the working directory
    assert user_store() == str(project_root() / "runs" / "model_store")
    assert store_chain() == [user_store(), SHIPPED_STORE]
    monkeypatch.setenv("LIVELENS_MODEL_STORE", str(tmp_path / "mine"))
    assert store_chain() == [str(tmp_path / "mine"), SHIPPED_STORE]
    monkeypatch.setenv("LIVELENS_MODEL_STORES", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert store_chain() == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_every_job_publishes_to_the_user_store_by_default(monkeypatch, tmp_path):
    from livelens.ocr.evaluate import EvalArgs
    from livelens.ocr.train import OcrTrainConfig
    from livelens.quality.training import QualityTrainConfig
    from livelens.train.regions import RegionTrainConfig
    from train_jobs.safety import SafetyTrainConfig

    monkeypatch.setenv("LIVELENS_MODEL_STORE", str(tmp_path / "mine"))
    assert ModelStore().root == str(tmp_path / "mine")
    for cfg in (SafetyTrainConfig(), RegionTrainConfig(), QualityTrainConfig(), OcrTrainConfig()):
        assert getattr(cfg, "model_store", getattr(cfg, "store", None)) == str(tmp_path / "mine"), type(cfg)
    assert EvalArgs().store == str(tmp_path / "mine")


def test_a_user_model_shadows_the_shipped_one_and_misses_name_the_chain(monkeypatch, tmp_path):
    monkeypatch.setenv("LIVELENS_MODEL_STORE", str(tmp_path / "mine"))
    monkeypatch.delenv("LIVELENS_MODEL_STORES", raising=False)
    assert find_in_stores("safety") == (SHIPPED_STORE, "safety@1")
    ModelStore(tmp_path / "mine").save("safety", {"w": torch.zeros(1)}, {"task": "t"}, version="7")
    assert find_in_stores("safety") == (str(tmp_path / "mine"), "safety@7")
    assert find_in_stores("safety@1") == (SHIPPED_STORE, "safety@1")  # a pinned version is found further down
    with pytest.raises(ModelNotFoundError, match="none of the model stores"):
        open_in_stores("weapons")


@pytest.mark.slow
@pytest.mark.ray
def test_quality_job_publishes_what_the_quality_deployment_then_serves(ray_session, monkeypatch, tmp_path):
    from livelens.data import build
    from livelens.quality.engine import QualityEngine
    from livelens.quality.training import QualityTrainConfig, run
    from livelens.train.loop import LoopConfig

    monkeypatch.setenv("LIVELENS_MODEL_STORE", str(tmp_path / "store"))
    build.build(build.parse_args(["--out", str(tmp_path / "data"), "--quality", "24", "--only", "quality"]))
    summary = run(QualityTrainConfig(manifest=str(tmp_path / "data" / "quality"), storage_path=str(tmp_path / "train"),
                                     features_cache="", passes_per_epoch=2, loop=LoopConfig(epochs=1, batch_size=8)))
    served = QualityEngine()  # the deployment's engine, with the default chain
    assert served.iqa[1]["ref"] == summary["ref"] and Path(served.iqa[1]["store"]) == tmp_path / "store"
