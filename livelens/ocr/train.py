"""Training the mmocr detector and recogniser as Ray Train jobs: the shared loop, mmocr's losses.

The loop is :func:`livelens.train.loop.fit`, the one every livelens job uses (DDP, checkpoints
holding model, optimiser, scheduler and step, resume after a worker dies, the warm-up + cosine
schedule over steps or a time budget). mmengine's ``Runner`` is not used: Ray Train already owns
what it would (process group, devices, checkpoints, failure handling, reporting), and it wants
config-driven datasets and its own checkpoint layout. mmocr stays confined to
:mod:`livelens.ocr.mmocr_adapter`: this module asks it for a model, batches and a loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livelens.errors import ConfigError
from livelens.ocr import mm_configs
from livelens.ocr import mmocr_adapter as mm
from livelens.ocr.metrics import det_metrics, rec_metrics
from livelens.store import user_store
from livelens.train.loop import LoopConfig


def _ocr_loop() -> LoopConfig:
    return LoopConfig(epochs=2, lr=1e-3, batch_size=16, schedule="warmup_cosine", warmup_steps=50,
                      clip_grad_norm=5.0, log_every=50, eval_last_only=True)


@dataclass
class OcrTrainConfig:
    """One OCR training run (detector or recogniser).

    Attributes:
        task: ``det`` or ``rec``.
        model: Config name in :mod:`livelens.ocr.mm_configs`.
        data: Manifest directory (used when ``source`` allows and it exists).
        source: ``auto`` (the manifest when present, else generated), ``manifest`` or
            ``generate`` (``generate`` fresh samples in memory; held-out ones from disjoint slots).
        generate: Samples to generate when generating.
        max_samples: Cap on training samples.
        pretrained: Start backbones from ImageNet where the config has offline weights.
        det_size: Detector input side.
        eval_samples: Held-out samples scored at the end (0 = none).
        num_workers: Ray Train workers (one GPU each with ``loop.use_gpu``).
        store: Model store root (default: the user store of the chain serving searches).
        name: Model name in the store.
        storage_path: Ray Train storage (checkpoints, results).
        run_name: Ray Train run name; rerunning with the same one resumes it (default: a new one).
        max_failures: Worker-group restarts from the last checkpoint before the run fails.
        loop: The shared loop's settings (epochs, lr, batch size, schedule, time budget, seed).
    """

    task: str = "rec"
    model: str = ""
    data: str = ""
    source: str = "auto"
    generate: int = 256
    max_samples: int = 512
    pretrained: bool = True
    det_size: int = 320
    eval_samples: int = 0
    num_workers: int = 1
    store: str = field(default_factory=user_store)
    name: str = ""
    storage_path: str = "runs/ray_results"
    run_name: str = ""
    max_failures: int = 1
    loop: LoopConfig = field(default_factory=_ocr_loop)

    def __post_init__(self) -> None:
        if isinstance(self.loop, dict):
            self.loop = LoopConfig.from_dict(self.loop)
        if self.task not in ("det", "rec"):
            raise ConfigError(f"task must be 'det' or 'rec', got {self.task!r}")
        self.model = self.model or ("dbnet_mobilenetv2_fpnc" if self.task == "det" else "crnn_resnet_small")
        table = mm_configs.DETECTORS if self.task == "det" else mm_configs.RECOGNIZERS
        if self.model not in table:
            raise ConfigError(f"{self.model!r} is not a {self.task} config; known: {sorted(table)}")
        self.name = self.name or f"ocr_{self.task}_{self.model}"
        self.data = self.data or f"runs/data/{'text_det' if self.task == 'det' else 'text_lines'}"
        if self.source not in ("auto", "manifest", "generate"):
            raise ConfigError(f"source must be auto, manifest or generate, got {self.source!r}")
        if self.source == "manifest" and not (Path(self.data) / "manifest.parquet").is_file():
            raise ConfigError(f"no manifest at {self.data} (run make data, or use source='generate')")
        for k in ("max_samples", "num_workers", "generate"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.eval_samples < 0 or self.max_failures < 0:
            raise ConfigError("eval_samples and max_failures must be >= 0")
        self.loop.validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OcrTrainConfig:
        """Rebuild from :func:`dataclasses.asdict` output (what Ray passes to the workers)."""
        if unknown := set(d) - {f.name for f in fields(cls)}:
            raise ConfigError(f"unknown OCR training config keys {sorted(unknown)}")
        return cls(**d)

    @property
    def imagenet_arch(self) -> str | None:
        """The torchvision arch the backbone starts from, or None (random init)."""
        return mm_configs.IMAGENET_INIT.get(self.model) if self.pretrained else None

    def uses_manifest(self) -> bool:
        """Whether the data comes from the manifest (else it is generated in memory)."""
        return self.source == "manifest" or (
            self.source == "auto" and (Path(self.data) / "manifest.parquet").is_file())


# -- data ------------------------------------------------------------------------------
def load_rows(cfg: OcrTrainConfig, split: str = "train", count: int | None = None) -> list[dict]:
    """Rows of ``split``: from the manifest, or generated (held-out splits from disjoint slots)."""
    count = count if count is not None else cfg.max_samples
    if cfg.uses_manifest():
        from livelens.data import read_manifest

        rows = [r for r in read_manifest(cfg.data).to_pylist() if r["split"] == split]
        return rows[:count]
    from livelens.data.text import generate_text_det, generate_text_lines

    gen = generate_text_det if cfg.task == "det" else generate_text_lines
    offset = 0 if split == "train" else 10_000_000  # disjoint slots for held-out sets
    n = min(count, cfg.generate) if split == "train" else count
    return gen(offset, n, seed=cfg.loop.seed)


def decode_rows(rows: list[dict]) -> list[tuple[np.ndarray, list[dict]]]:
    """``(rgb, texts)`` per row."""
    from livelens.imageio import decode_image

    return [(decode_image(r["image_bytes"]), list(r["texts"] or [])) for r in rows]


def det_batches(rows: list[dict], batch_size: int, size: int, rng: np.random.Generator):
    """Shuffled DBNet batches, decoded as they are needed; '###' texts become ignored regions."""
    order = rng.permutation(len(rows))
    for s in range(0, len(order), batch_size):
        chunk = decode_rows([rows[i] for i in order[s:s + batch_size]])
        polys = [[np.asarray(t["polygon"], np.float32) for t in texts] for _, texts in chunk]
        ignored = [[t["text"] == "###" for t in texts] for _, texts in chunk]
        yield mm.det_inputs([img for img, _ in chunk], polys, ignored, size=size)


def width_buckets(aspects: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of similar aspect ratio, in random order.

    A batch is padded to its widest crop, so mixing a 2-character crop with a 14-character one
    spends most of the compute on padding. Sorting on a jittered aspect keeps batches tight
    while their membership still changes from epoch to epoch.
    """
    jitter = aspects * rng.uniform(0.85, 1.15, len(aspects))
    order = np.argsort(jitter, kind="stable")
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def rec_batches(rows: list[dict], batch_size: int, channels: int, fixed_width: int | None, rng: np.random.Generator):
    """Recogniser batches of (crop, text) with similar widths, decoded as they are needed."""
    aspects = np.array([r["width"] / max(1, r["height"]) for r in rows], np.float64)
    for idx in width_buckets(aspects, batch_size, rng):
        chunk = decode_rows([rows[i] for i in idx])
        yield mm.rec_inputs([img for img, _ in chunk], [texts[0]["text"] for _, texts in chunk],
                            channels=channels, fixed_width=fixed_width)


# -- held-out scores ---------------------------------------------------------------------
def heldout_scores(cfg: OcrTrainConfig, model: torch.nn.Module, rows: list[dict]) -> dict[str, float]:
    """The trained model on held-out rows: word/char accuracy (rec) or HmeanIOU (det)."""
    engine = mm.MmocrEngine.from_modules(
        detector=model if cfg.task == "det" else None, recognizer=model if cfg.task == "rec" else None,
        det_name=cfg.model if cfg.task == "det" else "dbnet_mobilenetv2_fpnc",
        rec_name=cfg.model if cfg.task == "rec" else "crnn_resnet_small", det_size=cfg.det_size)
    samples = decode_rows(rows)
    if cfg.task == "rec":
        preds = engine.recognize([img for img, _ in samples])
        return {f"heldout_{k}": v for k, v in rec_metrics(
            [(p, texts[0]["text"]) for (p, _), (_, texts) in zip(preds, samples, strict=True)]).items()}
    boxes = engine.detect([img for img, _ in samples])
    preds = [([b.polygon for b in bs], [b.score for b in bs]) for bs in boxes]
    gts = [([np.asarray(t["polygon"], np.float32) for t in texts], [t["text"] == "###" for t in texts])
           for _, texts in samples]
    return {f"heldout_{k}": v for k, v in det_metrics(preds, gts).items()}


def forward_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The mmocr model's total loss on one raw batch (:func:`mmocr_adapter.loss_terms`, summed)."""
    return sum(v for v in mm.loss_terms(model, batch).values() if isinstance(v, torch.Tensor))


def train_fn_per_worker(config: dict) -> None:
    """The Ray Train worker: this rank's rows, mmocr batches and loss, the shared loop."""
    from livelens.train import fit
    from livelens.train.job import worker_context

    cfg = OcrTrainConfig.from_dict(config)
    rank, world = worker_context(cfg.loop.use_gpu)
    # Each worker takes its shard of the rows (manifests are small enough to list); images stay
    # encoded until their batch is made.
    rows = load_rows(cfg)[rank::world]

    def build() -> torch.nn.Module:
        if cfg.task == "det":
            return mm.build_detector(cfg.model, pretrained=cfg.imagenet_arch is not None)
        return mm.build_recognizer(cfg.model)

    def batches(epoch: int):
        # Seeded by epoch: a resumed run sees the epoch's batches it would have seen.
        rng = np.random.default_rng([cfg.loop.seed, rank, epoch])
        if cfg.task == "det":
            return det_batches(rows, cfg.loop.batch_size, cfg.det_size, rng)
        return rec_batches(rows, cfg.loop.batch_size, mm_configs.REC_CHANNELS.get(cfg.model, 1),
                           mm_configs.REC_FIXED_WIDTH.get(cfg.model), rng)

    def evaluate(model: torch.nn.Module, epoch: int) -> tuple[dict[str, float], dict[str, bytes]]:
        if not cfg.eval_samples:
            return {}, {}
        t1 = time.time()
        scores = heldout_scores(cfg, model, load_rows(cfg, "val", cfg.eval_samples))
        return {**scores, "eval_s": time.time() - t1}, {}

    fit(build, forward_loss, batches, cfg.loop, evaluate=evaluate,
        steps_per_epoch=math.ceil(len(rows) / cfg.loop.batch_size), extra_metrics={"samples_total": len(rows)})


def run(cfg: OcrTrainConfig) -> dict[str, Any]:
    """Train with Ray Train, then publish the final weights to the model store with a card.

    Returns:
        ``{"ref", "metrics", "card", "checkpoint"}``.
    """
    from livelens.train.job import train_and_publish

    card = {
        "task": f"ocr_{cfg.task}",
        "arch": {"backend": "mmocr", "config": cfg.model, "mm_config": mm_configs.get(cfg.model)},
        "dictionary": str(mm_configs.DICT_FILE.relative_to(Path(__file__).resolve().parents[2]))
        if cfg.task == "rec" else None,
        "data": {"source": cfg.data if cfg.uses_manifest() else "generated:livelens.data.text",
                 "max_samples": cfg.max_samples, "heldout": "val split" if cfg.uses_manifest()
                 else "generated slots from 10,000,000 (disjoint from training)"},
        "init": f"imagenet:{cfg.imagenet_arch}" if cfg.imagenet_arch else "random",
        "load": "livelens.ocr.mmocr_adapter.MmocrEngine(det=..., rec=...)",
    }
    return train_and_publish(train_fn_per_worker, cfg, card)
