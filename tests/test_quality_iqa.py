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


def test_manifest_features_are_photo_disjoint_and_cached_per_dataset(tmp_path):
    from livelens.data import build
    from livelens.quality.training import QualityTrainConfig, cached_feature_table

    args = build.parse_args(["--out", str(tmp_path / "data"), "--quality", "24", "--only", "quality"])
    build.build(args)
    cfg = QualityTrainConfig(manifest=str(tmp_path / "data" / "quality"), features_cache=str(tmp_path / "f.npz"))
    table = cached_feature_table(cfg)  # Ray is not running here: featurised serially, same code path per chunk
    assert table["x"].shape == (24, iqa.N_FEATURES) and np.isfinite(table["x"]).all()
    test_photos = set(table["photo"][table["test"]])
    assert test_photos and not test_photos & set(table["photo"][~table["test"]])
    assert set(table["y"][table["distortion"] == "none"]) <= {100.0}
    # The cache is reused for the same manifest content and recomputed when the data changes,
    # even though the regenerated set keeps its name.
    np.savez(tmp_path / "f.npz", **{**table, "x": table["x"] + 1.0})
    assert np.allclose(cached_feature_table(cfg)["x"], table["x"] + 1.0)
    build.build(build.parse_args(["--out", str(tmp_path / "data"), "--quality", "20", "--only", "quality"]))
    regenerated = cached_feature_table(cfg)
    assert regenerated["x"].shape == (20, iqa.N_FEATURES) and regenerated["dataset_id"] == table["dataset_id"]


def test_shipped_quality_model_ranks_distortion_levels():
    """The default `quality_iqa` (built by `make default-models`) scores heavier distortion lower."""
    from livelens.quality import distort as dist
    from livelens.store import SHIPPED_STORE

    store = ModelStore(SHIPPED_STORE)
    model = iqa.IqaModel.from_store(store)
    metrics = store.card(model.ref)["metrics"]
    # The card carries what its training run measured on held-out photos (see docs/quality.md).
    assert metrics["eval_split"] == "held-out photos" and 0.9 <= metrics["srocc"] <= 1.0
    photo = data.coffee()  # a sanity check of the shipped weights on a real photo
    # Moderate and strong levels: near the top the score saturates (docs/quality.md, limits).
    for f in (lambda lv: dist.gaussian_blur(photo, [0.01, 2.0, 5.0][lv]),
              lambda lv: dist.gaussian_noise(photo, [0, 25, 40][lv], seed=1),
              lambda lv: dist.jpeg(photo, [95, 15, 4][lv])):
        scores = model.score_batch([f(lv) for lv in range(3)])
        assert scores[0] > scores[1] > scores[2], scores
