"""NR-IQA: features on real photos, a tiny training run lowers the loss, store round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage import data

from livelens.errors import ModelNotFoundError
from livelens.quality import assess, iqa
from livelens.quality import distort as D
from livelens.quality.training import build_net
from livelens.store import ModelStore
from livelens.train.loop import LoopConfig, train_one_epoch


@pytest.fixture(scope="module")
def small_set() -> dict[str, np.ndarray]:
    """Blur and noise levels of three real photos, scored by level (0 worst … 100 pristine)."""
    xs, ys = [], []
    for name in ("astronaut", "coffee", "chelsea"):
        img = getattr(data, name)()[::2, ::2]
        for lv, (sigma, noise) in enumerate([(0, 0), (1.0, 5), (2.0, 12), (4.0, 25)]):
            for f in (lambda im, s=sigma: D.gaussian_blur(im, s), lambda im, n=noise: D.gaussian_noise(im, n)):
                xs.append(iqa.features(f(img)))
                ys.append(100.0 - 30.0 * lv)
    return {"x": np.stack(xs).astype(np.float32), "y": np.asarray(ys, np.float32)}


def test_features_are_finite_for_real_and_degenerate_images():
    for img in (data.astronaut(), np.zeros((1, 1, 3), np.uint8), np.full((64, 64, 3), 200, np.uint8)):
        f = iqa.features(img)
        assert f.shape == (iqa.N_FEATURES,) and np.isfinite(f).all()


def test_tiny_training_run_lowers_loss_and_ranks_levels(small_set):
    torch.manual_seed(0)
    net = build_net(small_set["x"])
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    cfg = LoopConfig(epochs=1, batch_size=8)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def run_epoch(seed: int) -> float:
        batches = iqa.batches(small_set["x"], small_set["y"], cfg.batch_size, seed=seed, passes=10)
        return train_one_epoch(net, iqa.l1_loss, batches, opt, scaler, cfg, torch.device("cpu"))["train_loss"]

    first = run_epoch(0)
    for s in range(1, 5):
        last = run_epoch(s)
    assert last < 0.5 * first, (first, last)
    assert iqa.evaluate_features(net, small_set["x"], small_set["y"])["srocc"] > 0.8


def test_store_round_trip_and_assess_reports_iqa(tmp_path, small_set):
    net = build_net(small_set["x"])
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelNotFoundError):
        iqa.IqaModel.from_store(store)
    ref = store.save(iqa.MODEL_NAME, net.state_dict(), {"arch": iqa.IqaModel(net).card_arch()})
    model = iqa.IqaModel.from_store(store, ref)
    img = data.camera()
    assert model.score(img) == pytest.approx(iqa.IqaModel(net).score(img), abs=1e-4)
    out = assess(img, iqa=model)
    json.dumps(out)
    assert 0.0 <= out["iqa"]["score"] <= 100.0 and out["iqa"]["model"] == ref
    assert sum(p.numel() for p in net.parameters()) * 4 < 1_000_000  # ships as <1 MB of weights
