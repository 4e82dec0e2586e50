"""Training the mmocr detector and recogniser as Ray Train jobs (our own loop, mmocr's losses).

Why our own loop rather than mmengine's ``Runner`` inside the workers: Ray Train already owns
what the Runner would (process group, device placement, checkpoints, failure handling,
reporting), and the Runner wants config-driven datasets, hooks and its own checkpoint
layout. Calling ``model.loss`` from a 30-line loop keeps one source of truth for
checkpoints (Ray → model store), lets the data come from our Parquet manifests, and keeps
mmocr confined to :mod:`livelens.ocr.mmocr_adapter`.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livelens.errors import ConfigError
from livelens.ocr import mm_configs
from livelens.ocr import mmocr_adapter as mm


@dataclass
class OcrTrainConfig:
    """One OCR training run (detector or recogniser).

    Attributes:
        task: ``det`` or ``rec``.
        model: Config name in :mod:`livelens.ocr.mm_configs`.
        data: Manifest directory; generated in memory (``generate`` samples) when missing.
        generate: Samples to generate when ``data`` is absent.
        max_samples: Cap on training samples (small CPU runs).
        epochs: Passes over the data.
        batch_size: Per-worker batch size.
        lr: AdamW learning rate.
        det_size: Detector input side.
        num_workers: Ray Train workers.
        use_gpu: Put workers on GPUs.
        store: Model store root.
        name: Model name in the store.
        storage_path: Ray Train storage (checkpoints, results).
        seed: Random seed.
    """

    task: str = "rec"
    model: str = ""
    data: str = ""
    generate: int = 256
    max_samples: int = 512
    epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-3
    det_size: int = 320
    num_workers: int = 1
    use_gpu: bool = False
    store: str = "runs/model_store"
    name: str = ""
    storage_path: str = "runs/ray_results"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in ("det", "rec"):
            raise ConfigError(f"task must be 'det' or 'rec', got {self.task!r}")
        self.model = self.model or ("dbnet_resnet18_fpnc" if self.task == "det" else "crnn_minivgg")
        self.name = self.name or f"ocr_{self.task}_{self.model}"
        self.data = self.data or f"runs/data/{'text_det' if self.task == 'det' else 'text_lines'}"
        for k in ("epochs", "batch_size", "max_samples", "num_workers"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")


# -- data ------------------------------------------------------------------------------
def load_rows(cfg: OcrTrainConfig, split: str = "train") -> list[dict]:
    """Manifest rows of ``split`` (or freshly generated ones when the manifest is absent)."""
    if (Path(cfg.data) / "manifest.parquet").is_file():
        from livelens.data import read_manifest

        rows = [r for r in read_manifest(cfg.data).to_pylist() if r["split"] == split]
    else:
        from livelens.data.text import generate_text_det, generate_text_lines

        gen = generate_text_det if cfg.task == "det" else generate_text_lines
        offset = 0 if split == "train" else 10_000_000  # disjoint slots for held-out sets
        rows = gen(offset, cfg.generate, seed=cfg.seed)
    return rows[: cfg.max_samples]


def decode_rows(rows: list[dict]) -> list[tuple[np.ndarray, list[dict]]]:
    """``(rgb, texts)`` per row."""
    from livelens.imageio import decode_image

    return [(decode_image(r["image_bytes"]), list(r["texts"] or [])) for r in rows]


def det_batches(samples: list, batch_size: int, size: int, rng: np.random.Generator):
    """Shuffled DBNet batches; '###' texts (unreadable) become ignored regions."""
    order = rng.permutation(len(samples))
    for s in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[s:s + batch_size]]
        polys = [[np.asarray(t["polygon"], np.float32) for t in texts] for _, texts in chunk]
        ignored = [[t["text"] == "###" for t in texts] for _, texts in chunk]
        yield mm.det_inputs([img for img, _ in chunk], polys, ignored, size=size)


def rec_batches(samples: list, batch_size: int, channels: int, fixed_width: int | None, rng: np.random.Generator):
    """Shuffled recogniser batches of (crop, text)."""
    order = rng.permutation(len(samples))
    for s in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[s:s + batch_size]]
        yield mm.rec_inputs([img for img, _ in chunk], [texts[0]["text"] for _, texts in chunk],
                            channels=channels, fixed_width=fixed_width)


def train_one_epoch(model: torch.nn.Module, batches, opt: torch.optim.Optimizer, device: torch.device) -> float:
    """One pass; returns the mean total loss."""
    model.train()
    total, n = 0.0, 0
    for batch in batches:
        if device.type != "cpu":
            batch = {"inputs": [t.to(device) for t in batch["inputs"]], "data_samples": batch["data_samples"]}
        loss, _ = mm.compute_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        total, n = total + float(loss.detach()), n + 1
    return total / max(1, n)


def train_fn_per_worker(config: dict) -> None:
    """The Ray Train worker: build the model, train, report a checkpoint per epoch."""
    import ray.train
    import ray.train.torch

    cfg = OcrTrainConfig(**config)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + ray.train.get_context().get_world_rank())
    model = mm.build_model(mm_configs.get(cfg.model))
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    device = ray.train.torch.get_device()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    rows = load_rows(cfg)
    # Each worker takes its shard of the rows (manifests are small enough to list).
    ctx = ray.train.get_context()
    samples = decode_rows(rows[ctx.get_world_rank()::ctx.get_world_size()])
    start = 0
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "model.pt", weights_only=True, map_location="cpu")
            core.load_state_dict(state["model"])
            start = int(state["epoch"]) + 1
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        if cfg.task == "det":
            batches = det_batches(samples, cfg.batch_size, cfg.det_size, rng)
        else:
            batches = rec_batches(samples, cfg.batch_size, mm_configs.REC_CHANNELS.get(cfg.model, 1),
                                  mm_configs.REC_FIXED_WIDTH.get(cfg.model), rng)
        loss = train_one_epoch(model, batches, opt, device)
        metrics = {"epoch": epoch, "loss": loss, "epoch_s": time.time() - t0, "samples": len(samples)}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if ctx.get_world_rank() == 0:
                torch.save({"model": core.state_dict(), "epoch": epoch}, Path(d) / "model.pt")
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def run(cfg: OcrTrainConfig) -> dict[str, Any]:
    """Train with Ray Train, then publish the final weights to the model store with a card.

    Returns:
        ``{"ref", "metrics", "card"}``.
    """
    # Before importing ray, which reads its auth settings at import. Our own token: the shared
    # ~/.ray/auth_token belongs to whichever cluster on this host wrote it last.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from livelens.store import ModelStore, git_sha

    started = False
    if not ray.is_initialized():
        from livelens.train.driver import init_ray

        init_ray(num_cpus=max(4, cfg.num_workers + 2))
        started = True
    try:
        t0 = time.time()
        trainer = TorchTrainer(
            train_fn_per_worker,
            train_loop_config=asdict(cfg),
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker={"CPU": 0.5} if not cfg.use_gpu else {"CPU": 1, "GPU": 1}),
            run_config=RunConfig(name=f"{cfg.name}-{int(t0)}", storage_path=str(Path(cfg.storage_path).resolve()),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "model.pt", weights_only=True, map_location="cpu")["model"]
        card = {
            "task": f"ocr_{cfg.task}",
            "arch": {"backend": "mmocr", "config": cfg.model, "mm_config": mm_configs.get(cfg.model)},
            "dictionary": str(mm_configs.DICT_FILE.relative_to(Path(__file__).resolve().parents[2]))
            if cfg.task == "rec" else None,
            "data": {"source": cfg.data if (Path(cfg.data) / "manifest.parquet").is_file() else "generated:livelens.data.text",
                     "max_samples": cfg.max_samples},
            "train": asdict(cfg),
            "metrics": dict(result.metrics or {}),
            "train_seconds": round(time.time() - t0, 1),
            "git": git_sha(),
            "load": "livelens.ocr.mmocr_adapter.MmocrEngine(det=..., rec=...)",
        }
        ref = ModelStore(cfg.store).save(cfg.name, state, json.loads(json.dumps(card, default=str)))
        return {"ref": ref, "metrics": card["metrics"], "card": card}
    finally:
        if started:
            ray.shutdown()
