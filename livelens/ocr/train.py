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
import math
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
from livelens.ocr.metrics import det_metrics, rec_metrics
from livelens.store import user_store


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
        epochs: Passes over the data (the upper bound when ``max_minutes`` is set).
        max_minutes: Wall-clock budget for the training loop (0 = none). The learning-rate
            schedule follows whichever of steps and time runs out first, so a budgeted run
            still ends on a small learning rate.
        batch_size: Per-worker batch size.
        lr: Peak AdamW learning rate.
        warmup_steps: Linear warm-up before the cosine decay.
        pretrained: Start backbones from ImageNet where the config has offline weights.
        det_size: Detector input side.
        eval_samples: Held-out samples scored at the end (0 = none).
        num_workers: Ray Train workers.
        use_gpu: Put workers on GPUs.
        store: Model store root.
        name: Model name in the store.
        storage_path: Ray Train storage (checkpoints, results).
        seed: Random seed.
        log_every: Print the running loss every so many steps (0 = only per epoch).
    """

    task: str = "rec"
    model: str = ""
    data: str = ""
    source: str = "auto"
    generate: int = 256
    max_samples: int = 512
    epochs: int = 2
    max_minutes: float = 0.0
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    pretrained: bool = True
    det_size: int = 320
    eval_samples: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    store: str = field(default_factory=user_store)
    name: str = ""
    storage_path: str = "runs/ray_results"
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
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
        for k in ("epochs", "batch_size", "max_samples", "num_workers", "generate"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.max_minutes < 0 or self.eval_samples < 0 or self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError("max_minutes, eval_samples and warmup_steps must be >= 0, lr > 0")

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
    return gen(offset, n, seed=cfg.seed)


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


def lr_at(progress: float, step: int, peak: float, warmup_steps: int, floor: float = 0.02) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``peak`` to ``floor × peak`` over ``progress``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    p = min(1.0, max(0.0, progress))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


@dataclass
class Budget:
    """When training ends: after ``total_steps`` or ``max_seconds``, whichever comes first."""

    total_steps: int
    max_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)
    step: int = 0

    def progress(self) -> float:
        by_steps = self.step / max(1, self.total_steps)
        by_time = (time.monotonic() - self.started) / self.max_seconds if self.max_seconds else 0.0
        return max(by_steps, by_time)

    def done(self) -> bool:
        return self.progress() >= 1.0


def train_one_epoch(model: torch.nn.Module, batches, opt: torch.optim.Optimizer, device: torch.device,
                    budget: Budget | None = None, peak_lr: float | None = None, warmup_steps: int = 0,
                    log_every: int = 0) -> float:
    """One pass (cut short when ``budget`` runs out); returns the mean total loss.

    With ``budget`` and ``peak_lr`` the learning rate follows :func:`lr_at` step by step.
    ``log_every`` prints the running loss every so many steps: a CPU epoch can take many minutes.
    """
    model.train()
    total, n = 0.0, 0
    for batch in batches:
        if budget is not None and _all_done(budget.done()):
            break
        if budget is not None and peak_lr is not None:
            for g in opt.param_groups:
                g["lr"] = lr_at(budget.progress(), budget.step, peak_lr, warmup_steps)
        if device.type != "cpu":
            batch = {"inputs": [t.to(device) for t in batch["inputs"]], "data_samples": batch["data_samples"]}
        loss, _ = mm.compute_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        total, n = total + float(loss.detach()), n + 1
        if budget is not None:
            budget.step += 1
        if log_every and n % log_every == 0:
            where = f"step {budget.step}, {budget.progress():.0%} of budget" if budget is not None else f"step {n}"
            print(f"[ocr-train] {where}: epoch's mean loss {total / n:.4f}, lr {opt.param_groups[0]['lr']:.2e}", flush=True)
    return total / max(1, n)


def _all_done(done: bool) -> bool:
    """Whether any worker is out of budget: DDP workers must stop on the same step or hang."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return done
    # NCCL reduces CUDA tensors only.
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1.0 if done else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


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


def train_fn_per_worker(config: dict) -> None:
    """The Ray Train worker: build the model, train, report a checkpoint per epoch."""
    import ray.train
    import ray.train.torch

    cfg = OcrTrainConfig(**config)
    torch.manual_seed(cfg.seed)
    if not cfg.use_gpu:
        # Ray sets OMP_NUM_THREADS to a worker's CPU reservation, one thread for our fractional
        # 0.5; the workers of this node share its cores instead (one worker ran at half speed).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ray.train.get_context().get_local_world_size()))
    rng = np.random.default_rng(cfg.seed + ray.train.get_context().get_world_rank())
    if cfg.task == "det":
        model = mm.build_detector(cfg.model, pretrained=cfg.imagenet_arch is not None)
    else:
        model = mm.build_recognizer(cfg.model)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    device = ray.train.torch.get_device()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    ctx = ray.train.get_context()
    # Each worker takes its shard of the rows (manifests are small enough to list); images stay
    # encoded until their batch is made.
    rows = load_rows(cfg)[ctx.get_world_rank()::ctx.get_world_size()]
    start = 0
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "model.pt", weights_only=True, map_location="cpu")
            core.load_state_dict(state["model"])
            start = int(state["epoch"]) + 1
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    budget = Budget(total_steps=steps_per_epoch * cfg.epochs, max_seconds=cfg.max_minutes * 60)
    budget.step = steps_per_epoch * start
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        if cfg.task == "det":
            batches = det_batches(rows, cfg.batch_size, cfg.det_size, rng)
        else:
            batches = rec_batches(rows, cfg.batch_size, mm_configs.REC_CHANNELS.get(cfg.model, 1),
                                  mm_configs.REC_FIXED_WIDTH.get(cfg.model), rng)
        loss = train_one_epoch(model, batches, opt, device, budget, cfg.lr, cfg.warmup_steps,
                               log_every=cfg.log_every)
        last = epoch == cfg.epochs - 1 or _all_done(budget.done())
        metrics = {"epoch": epoch, "loss": loss, "epoch_s": time.time() - t0, "samples": len(rows),
                   "steps": budget.step, "lr": opt.param_groups[0]["lr"]}
        if last and cfg.eval_samples and ctx.get_world_rank() == 0:
            t1 = time.time()
            metrics |= heldout_scores(cfg, core, load_rows(cfg, "val", cfg.eval_samples))
            metrics["eval_s"] = time.time() - t1
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if ctx.get_world_rank() == 0:
                torch.save({"model": core.state_dict(), "epoch": epoch}, Path(d) / "model.pt")
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        if last:
            break


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
            "data": {"source": cfg.data if cfg.uses_manifest() else "generated:livelens.data.text",
                     "max_samples": cfg.max_samples, "heldout": "val split" if cfg.uses_manifest()
                     else "generated slots from 10,000,000 (disjoint from training)"},
            "init": f"imagenet:{cfg.imagenet_arch}" if cfg.imagenet_arch else "random",
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
