"""A generic Ray Train (V2) per-worker training loop: DDP, AMP, comm hooks, checkpoints, resume.

Jobs (safety, quality, OCR) call :func:`fit` from their ``train_fn_per_worker`` with a model
factory, a loss function and their batches; everything distributed lives here::

    def train_fn_per_worker(config: dict) -> None:
        cfg = MyConfig(**config)
        fit(lambda: create_model(...), lambda m, b: F.cross_entropy(m(b["x"])["main"], b["y"]),
            lambda epoch: shard.iter_torch_batches(batch_size=cfg.loop.batch_size), cfg.loop,
            evaluate=my_eval)

A checkpoint is written every epoch; a restarted worker group (FailureConfig) finds it
through ``ray.train.get_checkpoint()`` and continues from the next epoch.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from livelens.errors import ConfigError
from livelens.train.ddp import (
    ByteCounter,
    autocast,
    check_comm_hook,
    check_precision,
    grad_scaler,
    register_comm_hook,
    trainable_parameters,
    unwrap,
)

STATE_FILE = "state.pt"
SCHEDULES = ("cosine_epochs", "warmup_cosine")
STRATEGIES = ("ddp", "ps")
METRICS_FILE = "metrics.json"

Batch = Mapping[str, Any]
EvalFn = Callable[[nn.Module, int], tuple[dict[str, float], dict[str, bytes]]]


@dataclass
class LoopConfig:
    """Settings of :func:`fit` shared by every training job.

    Attributes:
        epochs: Passes over the training shard.
        lr: Peak learning rate (AdamW, cosine decay over epochs).
        weight_decay: AdamW weight decay.
        batch_size: Per-worker batch size.
        precision: ``fp32``, ``bf16`` (CPU or GPU) or ``fp16`` (GPU, with GradScaler).
        use_gpu: One GPU per worker.
        strategy: ``ddp`` (allreduce of gradients) or ``ps`` (a parameter server on Ray actors:
            livelens.train.ps; the ``ps_*`` settings apply, and the optimiser runs on its shards).
        ps_mode: ``sync`` (one averaged step per round, like DDP) or ``async``.
        ps_staleness: ``async``: how many pushes a worker may run ahead of the slowest one.
        ps_shards: Parameter-server shard actors.
        ps_optimizer: ``sgd`` or ``adamw`` (on the shards; ``weight_decay`` applies).
        ps_momentum: SGD momentum on the shards.
        ps_checkpoint_dir: Where shards checkpoint (a restarted shard reloads it); empty:
            ``runs/ps/<run name>``. Multi-node: a path every node shares.
        comm_hook: ``none``, ``fp16`` or ``powersgd``.
        allreduce: ``flat`` (DDP's ring over all ranks) or ``two_level`` (reduce within each
            node, allreduce across node leaders with ``comm_hook``'s compression, broadcast within
            each node: livelens.train.hierarchical).
        powersgd_rank: PowerSGD matrix approximation rank.
        powersgd_start_iter: Plain allreduce steps before PowerSGD starts compressing.
        max_steps_per_epoch: Cap on steps per epoch (None: the whole shard).
        seed: Seed for the model initialisation (identical on every rank).
        fail_at_epoch: Failure injection: worker ``fail_rank`` dies after this epoch's steps, before its checkpoint...
        fail_once_marker: ...once, recorded by creating this file (a path every worker sees).
        fail_rank: Rank that dies (clamped to the last rank).
        count_grad_bytes: Count gradient bytes per step sent by the comm hook (reported).
        schedule: ``cosine_epochs`` (cosine over epochs) or ``warmup_cosine`` (linear warm-up, then
            a cosine per step to ``lr_floor`` × lr over the run's steps or its time budget,
            whichever ends first).
        warmup_steps: Warm-up steps of ``warmup_cosine``.
        lr_floor: Where ``warmup_cosine`` ends, as a fraction of lr.
        max_minutes: Time budget of the training loop (0: none); ``warmup_cosine`` follows it, and
            every schedule stops when it is spent (all workers on the same step).
        clip_grad_norm: Clip the gradient norm to this (0: no clipping).
        log_every: Print the running loss every so many steps (0: per epoch only).
        eval_last_only: Evaluate only after the last epoch (evaluation that costs minutes).
        tensorboard_dir: Where rank 0 writes TensorBoard event files, one folder per run (the Ray
            Train run name): every scalar of every epoch's report (loss, lr, images/s, per-label
            precision/recall…). Empty: none. On a multi-node cluster give a path every node
            shares, as for checkpoints.
        mlflow_dir: Also log each epoch to an MLflow tracking directory (a local file store, no
            server; experiment ``livelens``, one MLflow run per training run, the loop settings as
            params). Empty (the default): no MLflow. Browse with ``mlflow ui --backend-store-uri``.
    """

    epochs: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    precision: str = "fp32"
    use_gpu: bool = False
    strategy: str = "ddp"
    ps_mode: str = "sync"
    ps_staleness: int = 0
    ps_shards: int = 2
    ps_optimizer: str = "adamw"
    ps_momentum: float = 0.0
    ps_checkpoint_dir: str = ""
    comm_hook: str = "none"
    allreduce: str = "flat"
    powersgd_rank: int = 2
    powersgd_start_iter: int = 2
    max_steps_per_epoch: int | None = None
    seed: int = 0
    fail_at_epoch: int | None = None
    fail_once_marker: str | None = None
    fail_rank: int = 1
    count_grad_bytes: bool = False
    # The step schedule and its budget (OCR's recipe; the classifiers keep cosine over epochs).
    schedule: str = "cosine_epochs"
    warmup_steps: int = 0
    lr_floor: float = 0.02
    max_minutes: float = 0.0
    clip_grad_norm: float = 0.0
    # Logging and evaluation.
    log_every: int = 0
    eval_last_only: bool = False
    tensorboard_dir: str = field(default_factory=lambda: _default_tensorboard_dir())
    mlflow_dir: str = ""

    def validate(self) -> None:
        """Check values before any worker starts.

        Raises:
            ConfigError: An impossible value or combination.
        """
        check_precision(self.precision, self.use_gpu)
        check_comm_hook(self.comm_hook, self.powersgd_rank, self.allreduce)
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if self.strategy == "ps":
            self.ps_config("check").validate()
            if self.comm_hook != "none" or self.allreduce != "flat":
                raise ConfigError("comm_hook and allreduce apply to strategy 'ddp'; a parameter server sends tensors")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.fail_at_epoch is not None and not self.fail_once_marker:
            raise ConfigError("fail_at_epoch needs fail_once_marker (so the failure happens only once)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.warmup_steps < 0 or self.max_minutes < 0 or self.clip_grad_norm < 0 or self.log_every < 0:
            raise ConfigError("warmup_steps, max_minutes, clip_grad_norm and log_every must be >= 0")
        if not 0 <= self.lr_floor <= 1:
            raise ConfigError(f"lr_floor must be in [0, 1], got {self.lr_floor}")

    def ps_config(self, run: str) -> Any:
        """The :class:`livelens.train.ps.PsConfig` of strategy ``ps`` for the run named ``run``."""
        from livelens.train.ps import PsConfig

        folder = self.ps_checkpoint_dir or str(_project_path("runs/ps") / run)
        return PsConfig(mode=self.ps_mode, staleness=self.ps_staleness, num_shards=self.ps_shards,
                        optimizer=self.ps_optimizer, momentum=self.ps_momentum, weight_decay=self.weight_decay,
                        checkpoint_dir=folder)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoopConfig:
        """Build from a dict, rejecting unknown keys (typos would otherwise be silently ignored)."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown loop config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


@dataclass
class FitState:
    """What a checkpoint restores (besides model, optimiser, scheduler and scaler state).

    Attributes:
        epoch: The next epoch to run.
        step: Optimiser steps taken so far, over all epochs (the per-step schedule's position).
        loop_s: Seconds spent in training steps so far (the time budget's position).
        train_time_s: Seconds of training and evaluation so far.
        history: One entry of scalar metrics per finished epoch.
    """

    epoch: int = 0
    step: int = 0
    loop_s: float = 0.0
    train_time_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def _default_tensorboard_dir() -> str:
    from livelens.store import project_root

    return str(project_root() / "runs" / "tensorboard")


#: Loop metrics that are bookkeeping, not curves.
_NOT_SCALARS = ("epoch", "rank", "world_size", "start_epoch", "resumed_from_epoch")


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and k not in _NOT_SCALARS}


def _project_path(root: str) -> Path:
    from livelens.store import project_root

    # A relative path is the project's (a Tune trial's working directory is its own folder).
    return Path(root) if Path(root).is_absolute() or "://" in root else project_root() / root


class EpochLog:
    """Rank 0's training log: each epoch's numeric metrics as TensorBoard scalars at step = epoch,
    and, when asked, as MLflow metrics of one MLflow run.

    Args:
        root: The folder of every run's event files; empty turns TensorBoard off.
        run: This run's name (its TensorBoard sub-folder and its MLflow run name).
        mlflow_dir: An MLflow tracking directory; empty turns MLflow off.
        params: Logged once as the MLflow run's params (the loop settings).
        resume: The worker group restarted from a checkpoint: log into the newest running MLflow
            run of this name rather than open a second one.
    """

    EXPERIMENT = "livelens"

    def __init__(self, root: str, run: str, mlflow_dir: str = "", params: Mapping[str, Any] | None = None,
                 resume: bool = False):
        self.writer = None
        self.mlflow = None
        if root:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(_project_path(root) / run))
        if mlflow_dir:
            self._start_mlflow(mlflow_dir, run, params or {}, resume)

    def _start_mlflow(self, mlflow_dir: str, run: str, params: Mapping[str, Any], resume: bool) -> None:
        # MLflow 3 keeps its file store behind this switch; a directory needs no server or database.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = _project_path(mlflow_dir).resolve().as_uri() if "://" not in mlflow_dir else mlflow_dir
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(self.EXPERIMENT)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(self.EXPERIMENT)
        self.mlflow = client
        if resume:
            # A worker group restarted from a checkpoint goes on with its run: a new run of the same
            # name would split the curves in two, and MLflow's UI would show only the second half.
            found = client.search_runs([exp_id], filter_string=f"tags.mlflow.runName = '{run}' "
                                       "and attributes.status = 'RUNNING'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
            if found:
                self.run_id = found[0].info.run_id
                return
        self.run_id = client.create_run(exp_id, run_name=run).info.run_id
        client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])

    def write(self, metrics: Mapping[str, Any], epoch: int) -> None:
        values = _scalars(metrics)
        if self.writer is not None:
            for key, value in values.items():
                # "recall/ads_qrcode"-style names group the per-label curves in TensorBoard's UI.
                self.writer.add_scalar(key, value, epoch)
            self.writer.flush()
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.mlflow.log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in values.items()])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.run_id)


def lr_at(progress: float, step: int, peak: float, warmup_steps: int, floor: float = 0.02) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``peak`` to ``floor × peak`` over ``progress``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    p = min(1.0, max(0.0, progress))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


class StepSchedule:
    """Where a run is in its steps and its time budget; sets the learning rate of ``warmup_cosine``.

    Its position lives in :class:`FitState` (``step``, ``loop_s``), so a resumed run continues the
    schedule where the checkpoint left it rather than warming up again.

    Args:
        cfg: The loop settings (``schedule``, ``lr``, ``warmup_steps``, ``lr_floor``, ``max_minutes``).
        total_steps: The run's steps (``steps_per_epoch × epochs``); None when unknown, then only
            the time budget (if any) moves ``warmup_cosine``'s cosine.
        state: The run's state; ``step`` and ``loop_s`` are read and advanced.
    """

    def __init__(self, cfg: LoopConfig, total_steps: int | None, state: FitState):
        self.cfg, self.total_steps, self.state = cfg, total_steps, state
        self.max_s = cfg.max_minutes * 60
        self._t0 = time.perf_counter()
        self._base = state.loop_s

    def elapsed(self) -> float:
        return self._base + time.perf_counter() - self._t0

    def sync(self) -> None:
        """Fold the time since the last sync into ``state.loop_s`` (call before a checkpoint)."""
        now = time.perf_counter()
        self.state.loop_s = self._base + now - self._t0
        self._base, self._t0 = self.state.loop_s, now

    def progress(self) -> float:
        by_steps = self.state.step / self.total_steps if self.total_steps else 0.0
        by_time = self.elapsed() / self.max_s if self.max_s else 0.0
        return max(by_steps, by_time)

    def out_of_time(self) -> bool:
        return bool(self.max_s) and self.elapsed() >= self.max_s

    def done(self) -> bool:
        return self.out_of_time() or (self.cfg.schedule == "warmup_cosine" and bool(self.total_steps)
                                      and self.state.step >= self.total_steps)

    def apply(self, optimizer: torch.optim.Optimizer) -> float:
        """Set the step's learning rate (``warmup_cosine``); returns the rate in use."""
        if self.cfg.schedule == "warmup_cosine":
            lr = lr_at(self.progress(), self.state.step, self.cfg.lr, self.cfg.warmup_steps, self.cfg.lr_floor)
            for g in optimizer.param_groups:
                g["lr"] = lr
        return float(optimizer.param_groups[0]["lr"])


def all_workers(flag: bool) -> bool:
    """Whether ``flag`` holds on any worker: DDP workers must stop on the same step or hang."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    # NCCL reduces CUDA tensors only.
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: torch.amp.GradScaler, state: FitState, metrics: Mapping[str, Any],
                    files: Mapping[str, bytes]) -> None:
    """Write model/optimiser state (tensors + plain types: loadable with weights_only) and artifacts."""
    torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "fit": asdict(state)}, path / STATE_FILE)
    (path / METRICS_FILE).write_text(json.dumps(dict(metrics), indent=2, default=float))
    for name, data in files.items():
        (path / name).write_bytes(data)


def load_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """The saved state dict of a checkpoint directory (``weights_only=True``)."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def _maybe_fail(cfg: LoopConfig, epoch: int, rank: int, world: int) -> None:
    """Failure injection: kill this worker process once, as a crashed node would."""
    if cfg.fail_at_epoch is None or epoch != cfg.fail_at_epoch or rank != min(cfg.fail_rank, world - 1):
        return
    marker = Path(cfg.fail_once_marker or "")
    if marker.exists():
        return
    _wait_until_reports_collected()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} died at epoch {epoch}\n")
    os._exit(1)  # no cleanup, no exception: the process is simply gone


def _wait_until_reports_collected(timeout_s: float = 60.0) -> None:
    """Block until the controller has taken this worker's earlier reports off its queue.

    The controller polls workers on an interval; an epoch shorter than that interval could die
    with the previous checkpoint still queued, so the injected crash would test a restart from
    scratch instead of a resume. Ray exposes no public hook for this, hence the private queue;
    if its layout changes we only lose the wait, not the crash.
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        pending = get_train_context().get_result_queue()
    except Exception:  # best effort: a changed internal API must not stop the crash
        return
    deadline = time.monotonic() + timeout_s
    while getattr(pending, "unfinished_tasks", 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the poll's reply, carrying the report, is still on its way to the controller


def _node_ids(world: int) -> list[str]:
    """Each rank's Ray node id (gathered so rank 0 can report where the workers ran)."""
    import ray

    mine = ray.get_runtime_context().get_node_id()
    if world == 1 or not torch.distributed.is_initialized():
        return [mine]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, mine)
    return [str(x) for x in out]


def keep_frozen_norms_in_eval(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are frozen back in eval mode.

    A frozen backbone must also keep its running statistics: updating them in train mode
    would change the features the heads were trained on (and the backbone would no longer be
    the ImageNet one that head-only checkpoints rely on).
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters(False)):
            m.eval()


def train_one_epoch(model: nn.Module, forward_loss: Callable[[nn.Module, Batch], torch.Tensor],
                    batches: Iterable[Batch], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    cfg: LoopConfig, device: torch.device, counter: ByteCounter | None = None,
                    schedule: StepSchedule | None = None) -> dict[str, float]:
    """One pass over ``batches`` (cut short when the schedule is done); mean loss, steps, samples, seconds."""
    model.train()
    keep_frozen_norms_in_eval(model)
    total, steps, samples, t0 = 0.0, 0, 0, time.perf_counter()
    for batch in batches:
        if schedule is not None and all_workers(schedule.done()):
            break
        if schedule is not None:
            schedule.apply(optimizer)
        with autocast(cfg.precision, device):
            loss = forward_loss(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {steps}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        if counter is not None:
            counter.end_step()
        total += float(loss.detach())
        steps += 1
        if schedule is not None:
            schedule.state.step += 1
        samples += _batch_len(batch)
        if cfg.log_every and steps % cfg.log_every == 0:
            where = f"step {schedule.state.step}, {schedule.progress():.0%}" if schedule is not None else f"step {steps}"
            print(f"[train] {where}: epoch's mean loss {total / steps:.4f}, lr {optimizer.param_groups[0]['lr']:.2e}",
                  flush=True)
        if cfg.max_steps_per_epoch and steps >= cfg.max_steps_per_epoch:
            break
    secs = time.perf_counter() - t0
    return {"train_loss": total / max(steps, 1), "steps": steps, "samples": samples, "epoch_s": secs,
            "lr": float(optimizer.param_groups[0]["lr"])}


def _batch_len(batch: Batch) -> int:
    first = next(iter(batch.values()))
    return len(first)


def fit(build_model: Callable[[], nn.Module], forward_loss: Callable[[nn.Module, Batch], torch.Tensor],
        train_batches: Callable[[int], Iterable[Batch]], cfg: LoopConfig, *, evaluate: EvalFn | None = None,
        make_optimizer: Callable[[Iterable[nn.Parameter], LoopConfig], torch.optim.Optimizer] | None = None,
        extra_metrics: Mapping[str, Any] | None = None, steps_per_epoch: int | None = None) -> FitState:
    """Train inside a Ray Train worker, reporting metrics and a checkpoint every epoch.

    Args:
        build_model: Builds the (unwrapped) model; called after seeding, on every rank.
        forward_loss: ``(model, batch) -> scalar loss``; runs under autocast.
        train_batches: ``epoch -> iterable of batches`` already on the worker's device.
        cfg: Loop settings.
        evaluate: ``(model, epoch) -> (scalar metrics, files)``, run on rank 0 with the unwrapped
            model in eval mode; files (e.g. ``confusion.png``) go into the checkpoint.
        make_optimizer: Optimiser factory over trainable parameters (default AdamW).
        extra_metrics: Constant values added to every report (e.g. the trial config).
        steps_per_epoch: Steps in one epoch, when known: ``warmup_cosine`` spreads its cosine over
            ``steps_per_epoch × epochs``.

    Returns:
        The final fit state (epoch count, history, train time).
    """
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    model = build_model()
    counter = ByteCounter() if cfg.count_grad_bytes else None
    ps = None
    if cfg.strategy == "ps":
        model = ray.train.torch.prepare_model(model, parallel_strategy=None)
        ps = _ps_client(model, cfg, ctx.get_experiment_name(), rank, world)
    else:
        model = ray.train.torch.prepare_model(model)
        register_comm_hook(model, cfg.comm_hook, powersgd_rank=cfg.powersgd_rank,
                           start_powersgd_iter=cfg.powersgd_start_iter, counter=counter, allreduce=cfg.allreduce)
    params = list(trainable_parameters(model))
    if not params:
        raise ConfigError("the model has no trainable parameters")
    if ps is not None:
        from livelens.train.ps import PsOptimizer

        optimizer: torch.optim.Optimizer = PsOptimizer(params, ps, cfg.lr)
    else:
        optimizer = (make_optimizer(params, cfg) if make_optimizer
                     else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    scaler = grad_scaler(cfg.precision, device)
    state = FitState()

    ckpt = ray.train.get_checkpoint()
    resumed_from = -1
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = load_checkpoint_state(d)
        unwrap(model).load_state_dict(saved["model"])
        if ps is not None:
            ps.pull()  # the shards outlive a restarted worker group and hold newer tensors
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = FitState(**saved["fit"])
        resumed_from = state.epoch
    nodes = _node_ids(world)
    start_epoch = state.epoch
    tb = EpochLog(cfg.tensorboard_dir if rank == 0 else "", ctx.get_experiment_name(),
                  cfg.mlflow_dir if rank == 0 else "", asdict(cfg), resume=resumed_from >= 0)
    schedule = StepSchedule(cfg, steps_per_epoch * cfg.epochs if steps_per_epoch else None, state)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        stats = train_one_epoch(model, forward_loss, train_batches(epoch), optimizer, scaler, cfg, device, counter,
                                schedule)
        schedule.sync()
        # Die after this epoch's steps, before its checkpoint, once the previous report has been collected.
        _maybe_fail(cfg, epoch, rank, world)
        if cfg.schedule == "cosine_epochs":
            scheduler.step()
        last = epoch == cfg.epochs - 1 or all_workers(schedule.done())
        metrics: dict[str, Any] = {**(extra_metrics or {}), "epoch": epoch, "start_epoch": start_epoch,
                                   "resumed_from_epoch": resumed_from, "world_size": world,
                                   "worker_nodes": nodes, "rank": rank, **stats, "global_step": state.step,
                                   "loop_s": state.loop_s, "last": last,
                                   "images_per_s": stats["samples"] * world / max(stats["epoch_s"], 1e-9)}
        if counter is not None:
            metrics["grad_bytes_per_step"] = counter.per_step(skip=cfg.powersgd_start_iter)
        if ps is not None:
            metrics["ps_bytes_per_step"] = (ps.bytes_pushed + ps.bytes_pulled) / max(ps.pushes, 1)
            metrics["ps_version"] = ps.versions[0]
        files: dict[str, bytes] = {}
        if evaluate is not None and rank == 0 and (last or not cfg.eval_last_only):
            inner = unwrap(model)
            inner.eval()
            with torch.no_grad(), autocast(cfg.precision, device):
                scalars, files = evaluate(inner, epoch)
            metrics.update(scalars)
        state.epoch = epoch + 1
        state.train_time_s += time.perf_counter() - t0
        metrics["train_time_s"] = state.train_time_s
        state.history.append({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(Path(tmp), model, optimizer, scheduler, scaler, state, metrics, files)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
        # Logged only once every rank has reported (report waits for all of them): an epoch whose
        # group died before its checkpoint is trained again after the restart, and would otherwise
        # appear twice in TensorBoard and MLflow.
        tb.write(metrics, epoch)
        if last:
            break
    tb.close()
    if ps is not None:
        _stop_ps(cfg, ctx.get_experiment_name(), rank)
    return state


def _ps_client(model: nn.Module, cfg: LoopConfig, run: str, rank: int, world: int) -> Any:
    """Start (rank 0) or find the run's parameter-server shards and connect this worker."""
    import ray

    from livelens.train.ps import PsClient, shard_names, start_shards

    ps_cfg = cfg.ps_config(run)
    dist = torch.distributed
    if rank == 0:
        shards = start_shards(run, world, ps_cfg)
    if dist.is_initialized():
        dist.barrier()  # named actors exist before the other ranks look them up
    if rank != 0:
        from livelens.train.ps import NAMESPACE

        shards = [ray.get_actor(n, namespace=NAMESPACE) for n in shard_names(run, ps_cfg.num_shards)]
    named = {k: p for k, p in unwrap(model).named_parameters() if p.requires_grad}
    return PsClient(shards, named, rank)


def _stop_ps(cfg: LoopConfig, run: str, rank: int) -> None:
    """End the shards once every worker is done with them (their checkpoints stay)."""
    from livelens.train.ps import stop_shards

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        stop_shards(run, cfg.ps_shards)
