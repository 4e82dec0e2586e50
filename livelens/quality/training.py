"""Training the NR-IQA model with Ray Train: data, per-worker loop, held-out evaluation, registration.

``train_jobs/quality.py`` is the command line; everything it runs lives here so tests can
exercise the pieces without a cluster.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from livelens.errors import ConfigError
from livelens.quality import iqa
from livelens.quality.dataset import QualitySample, generate_quality_set, quality_rows, real_photos
from livelens.store import user_store
from livelens.train.loop import LoopConfig

REPO = Path(__file__).resolve().parents[2]


@dataclass
class QualityTrainConfig:
    """Settings of ``make train-quality``.

    Attributes:
        manifest: The data owner's quality manifest; generated here from real photos when absent.
        shared: ../shared/data (more real photos for the generated set), if present.
        num_workers: Ray Train workers (each a fraction of a CPU on this small machine).
        cpus_per_worker: Logical CPUs reserved per worker.
        passes_per_epoch: Passes over the training features per reported epoch (the set is small,
            so one checkpoint per pass would be mostly overhead).
        storage_path: Where Ray Train writes checkpoints (path or URI).
        run_name: Reuse to resume.
        model_store: Where the trained model is registered.
        register: Publish to the model store.
        features_cache: Features of the generated set, reused while its dataset id is unchanged
            (generating and featurising ~1,200 images takes minutes on 2 cores). Empty: no cache.
        loop: Generic loop settings (epochs, lr, batch size...).
    """

    manifest: str = "runs/data/quality"
    shared: str = str(REPO.parent / "shared" / "data")
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    passes_per_epoch: int = 20
    storage_path: str = "runs/train"
    run_name: str = ""
    model_store: str = field(default_factory=user_store)
    register: bool = True
    features_cache: str = "runs/quality/features.npz"
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=15, lr=3e-3, batch_size=64))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QualityTrainConfig:
        """Build from a dict (as Ray passes ``train_loop_config``)."""
        d = dict(d)
        loop = d.pop("loop", {})
        return cls(**d, loop=loop if isinstance(loop, LoopConfig) else LoopConfig.from_dict(loop))

    def validate(self) -> None:
        """Raises ConfigError on impossible values, before any worker starts."""
        self.loop.validate()
        if self.num_workers < 1 or self.cpus_per_worker <= 0 or self.passes_per_epoch < 1:
            raise ConfigError("num_workers, passes_per_epoch must be >= 1 and cpus_per_worker > 0")


def load_samples(cfg: QualityTrainConfig) -> tuple[list[QualitySample], str]:
    """The generated fallback set and its description (used when there is no manifest)."""
    shared = Path(cfg.shared)
    photos = real_photos(shared if shared.is_dir() else None, side=iqa.IQA_SIDE)
    return generate_quality_set(photos), f"livelens.quality.dataset:generated({len(photos)} photos, SSIM scores)"


def feature_table(samples: list[QualitySample]) -> dict[str, np.ndarray]:
    """Features, scores and splits of ``samples`` as arrays (small enough for the train config)."""
    return {
        "x": np.stack([iqa.features(s.image) for s in samples]).astype(np.float32),
        "y": np.asarray([s.score for s in samples], np.float32),
        "test": np.asarray([s.split == "test" for s in samples]),
        "distortion": np.asarray([s.distortion for s in samples]),
        "photo": np.asarray([s.photo for s in samples]),
    }


def _feature_chunk(start: int, count: int, _seed: int, path: str, indices: tuple[int, ...]) -> list[dict]:
    """Features of the manifest rows ``indices[start:start + count]`` (one Ray task decodes its own slice)."""
    from livelens.data.manifest import decode_row_image, read_manifest_rows

    pixels = read_manifest_rows(path, indices[start : start + count], columns=["image_bytes", "image_uri"])
    data, uris = pixels["image_bytes"].to_pylist(), pixels["image_uri"].to_pylist()
    return [{"x": iqa.features(decode_row_image(b, u))} for b, u in zip(data, uris, strict=True)]


def manifest_feature_table(path: str | Path) -> dict[str, np.ndarray]:
    """:func:`feature_table` of a quality manifest, featurised in Ray tasks when Ray is running.

    The driver reads only metadata; each task decodes and featurises its own slice of JPEGs, so
    a 4,000-image set never sits decoded (~1.8 GB) in one process.
    """
    from livelens.data.parallel import run_generator

    meta = quality_rows(path)
    indices = tuple(r["index"] for r in meta)
    rows = run_generator(_feature_chunk, len(indices), 0, str(path), indices, chunk=256, desc="iqa features")
    return {
        "x": np.stack([r["x"] for r in rows]).astype(np.float32),
        "y": np.asarray([r["score"] for r in meta], np.float32),
        "test": np.asarray([r["split"] == "test" for r in meta]),
        "distortion": np.asarray([r["distortion"] for r in meta]),
        "photo": np.asarray([r["photo"] for r in meta]),
    }


def _fingerprint(manifest: Path) -> str:
    """Content fingerprint of a manifest: its rows' content ids (a card's name does not change when
    the data is regenerated with another seed or size)."""
    import hashlib

    from livelens.data.manifest import read_manifest

    ids = read_manifest(manifest, columns=["id"])["id"].to_pylist()
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def cached_feature_table(cfg: QualityTrainConfig) -> dict[str, Any]:
    """The feature table of the manifest (or the generated fallback), through ``cfg.features_cache``.

    The cache is reused only for the same manifest content and feature width, so regenerated data
    or a changed feature set is featurised again.
    """
    manifest = Path(cfg.manifest)
    from_manifest = (manifest / "manifest.parquet").is_file()
    fingerprint = _fingerprint(manifest) if from_manifest else "generated"
    cache = Path(cfg.features_cache) if cfg.features_cache else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            table: dict[str, Any] = {k: z[k] for k in z.files}
        if str(table.get("fingerprint", "")) == fingerprint and table["x"].shape[1] == iqa.N_FEATURES:
            table["dataset_id"], table["fingerprint"] = str(table["dataset_id"]), fingerprint
            return table
    if from_manifest:
        from livelens.data.manifest import load_card

        card = load_card(manifest)
        table = {**manifest_feature_table(manifest), "dataset_id": str(card.get("id") or card.get("name") or manifest)}
    else:
        samples, dataset_id = load_samples(cfg)
        table = {**feature_table(samples), "dataset_id": dataset_id}
    table["fingerprint"] = fingerprint
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **table)
    return table


def build_net(x_train: np.ndarray) -> iqa.IqaNet:
    """A fresh network whose normaliser is fitted on the training features."""
    net = iqa.IqaNet(iqa.IqaArch(in_features=x_train.shape[1]))
    net.set_normaliser(x_train)
    return net


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: fit the MLP on this worker's shard, evaluate on held-out photos."""
    import ray.train

    from livelens.train import fit

    cfg = QualityTrainConfig.from_dict(config["cfg"])
    x_tr, y_tr = np.asarray(config["x_train"], np.float32), np.asarray(config["y_train"], np.float32)
    x_te, y_te = np.asarray(config["x_test"], np.float32), np.asarray(config["y_test"], np.float32)
    ctx = ray.train.get_context()
    shard = (ctx.get_world_rank(), ctx.get_world_size())

    def evaluate(model, epoch):
        return {f"val_{k}": v for k, v in iqa.evaluate_features(model, x_te, y_te).items()}, {}

    fit(lambda: build_net(x_tr), iqa.l1_loss,
        lambda epoch: iqa.batches(x_tr, y_tr, cfg.loop.batch_size, seed=epoch, passes=cfg.passes_per_epoch,
                                  shard=shard),
        cfg.loop, evaluate=evaluate)


def run(cfg: QualityTrainConfig) -> dict[str, Any]:
    """Build data, train with Ray Train, evaluate on held-out photos and register ``quality_iqa``."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from livelens.train.driver import make_run_config, read_checkpoint, storage_path

    cfg.validate()
    t0 = time.time()
    table = cached_feature_table(cfg)
    dataset_id = str(table.pop("dataset_id"))
    tr, te = ~table["test"], table["test"]
    if tr.sum() == 0 or te.sum() == 0:
        raise ConfigError("the quality set needs photos in both the train and the test split")
    run_name = cfg.run_name or time.strftime("quality-%Y%m%d-%H%M%S")
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": asdict(cfg), "x_train": table["x"][tr], "y_train": table["y"][tr],
                           "x_test": table["x"][te], "y_test": table["y"][te]},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=make_run_config(run_name, cfg.storage_path),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {run_name} finished without a checkpoint: {result.error}")
    state, metrics, _ = read_checkpoint(result.checkpoint)
    net = build_net(table["x"][tr])
    net.load_state_dict(state["model"])
    held_out = iqa.evaluate_features(net, table["x"][te], table["y"][te])
    per_distortion = {}
    for d in sorted(set(table["distortion"][te]) - {"none"}):
        sel = te & ((table["distortion"] == d) | (table["distortion"] == "none"))
        per_distortion[d] = iqa.evaluate_features(net, table["x"][sel], table["y"][sel])["srocc"]
    summary: dict[str, Any] = {
        "run_name": run_name, "dataset": dataset_id, "n_train": int(tr.sum()), "n_test": int(te.sum()),
        "test_photos": sorted(set(table["photo"][te].tolist())), "held_out": held_out,
        "held_out_srocc_per_distortion": per_distortion, "train_time_s": metrics.get("train_time_s"),
        "wall_time_s": time.time() - t0, "checkpoint": result.checkpoint.path,
        "history": state["fit"]["history"],
    }
    if cfg.register:
        from livelens.store import ModelStore

        card = {"task": "quality_iqa", "kind": "NSS features (BRISQUE-style MSCN + classical measures) + MLP",
                "arch": asdict(net.arch), "datasets": [dataset_id],
                "metrics": {"srocc": held_out["srocc"], "lcc": held_out["lcc"], "mae": held_out["mae"],
                            "srocc_per_distortion": per_distortion, "eval_split": "held-out photos"},
                "train_time_s": metrics.get("train_time_s"), "wall_time_s": summary["wall_time_s"],
                "n_parameters": sum(p.numel() for p in net.parameters()), "config": asdict(cfg)}
        summary["ref"] = ModelStore(cfg.model_store).save(iqa.MODEL_NAME, net.state_dict(), card)
    out = Path(storage_path(cfg.storage_path)) / run_name
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
