"""A parameter server on Ray actors: shards hold the parameters, workers pull them and push gradients.

The seed's training platform had a generic parameter-server component (通用的parameter-server组件)
beside its allreduce training. livelens offers it as a strategy of the same training jobs
(``--strategy ps``; :func:`livelens.train.fit` switches on it):

- Each :class:`ParameterShard` is an async Ray actor holding some of the model's trainable
  tensors (split by size) and their optimiser (SGD with momentum, or AdamW). It applies updates
  itself, so workers never hold optimiser state.
- A worker's step (:class:`PsOptimizer`, a ``torch.optim.Optimizer`` so schedulers work
  unchanged) pushes its gradients to every shard, then pulls the parameters back.
- ``sync``: a shard averages one gradient from every worker, then applies them as one step. A
  pull waits while this worker's gradient is still waiting for the round to complete. This is
  synchronous data-parallel SGD, as DDP computes it.
- ``async`` with bounded staleness ``s``: a shard applies each worker's gradient on its own
  (scaled by 1/W). A pull waits until the slowest worker is at most ``s`` pushes behind this one,
  and a push runs at most ``s`` steps ahead of the slowest reader: push ``n`` is held until
  every worker has pulled ``n - s`` times (stale synchronous parallel, bounded both ways). With
  SGD and ``s = 0`` this is exactly synchronous SGD.
- Every ``checkpoint_every`` updates a shard writes its tensors, optimiser state, version and
  clocks (atomic rename). A killed shard is restarted by Ray (``max_restarts``) and reloads
  that file; calls that were in flight are retried on the new actor. Gradients the dead actor
  held but had not applied (the round in progress, or queued async pushes) are asked for again:
  a pull answers ``None`` and the worker pushes its last gradient once more, so nothing is lost
  when every update is checkpointed (the default).

BatchNorm statistics and frozen tensors are not served: each worker keeps its own, and rank 0's
go into the checkpoint, as with DDP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from livelens.errors import ConfigError

MODES = ("sync", "async")
OPTIMIZERS = ("sgd", "adamw")
#: Named actors live in this namespace, so every worker of a run finds the same shards.
NAMESPACE = "livelens-ps"


@dataclass(frozen=True)
class PsConfig:
    """Settings of a parameter server.

    Attributes:
        mode: ``sync`` or ``async``.
        staleness: ``async`` only: how many pushes a worker may be ahead of the slowest one.
        num_shards: Shard actors (the tensors are split between them by size).
        optimizer: ``sgd`` or ``adamw``, run on the shards.
        momentum: SGD momentum.
        weight_decay: Weight decay (SGD: L2; AdamW: decoupled).
        checkpoint_dir: Where shards write their checkpoints (empty: none). Multi-node: a path
            every node shares.
        checkpoint_every: Updates between shard checkpoints.
        cpus_per_shard: Logical CPUs each shard reserves. 0 by default: a Train run reserves its
            workers' CPUs first, and shards that wait for a CPU would hold every worker at its
            first pull.
    """

    mode: str = "sync"
    staleness: int = 0
    num_shards: int = 2
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    checkpoint_dir: str = ""
    checkpoint_every: int = 1
    cpus_per_shard: float = 0.0

    def validate(self) -> None:
        """Raises ConfigError on an impossible setting."""
        if self.mode not in MODES:
            raise ConfigError(f"unknown parameter-server mode {self.mode!r}; choose one of {MODES}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown parameter-server optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.staleness < 0 or self.num_shards < 1 or self.checkpoint_every < 1 or self.cpus_per_shard < 0:
            raise ConfigError("staleness >= 0, num_shards >= 1, checkpoint_every >= 1 and cpus_per_shard >= 0 needed")
        if self.mode == "sync" and self.staleness:
            raise ConfigError("staleness applies to mode 'async' only")


def split_by_size(shapes: Mapping[str, tuple[int, ...]], num_shards: int) -> list[list[str]]:
    """Assign tensor names to shards, largest first onto the lightest shard (balanced bytes)."""
    loads = [0] * num_shards
    out: list[list[str]] = [[] for _ in range(num_shards)]
    for name in sorted(shapes, key=lambda n: -int(np.prod(shapes[n]))):
        i = loads.index(min(loads))
        out[i].append(name)
        loads[i] += int(np.prod(shapes[name]))
    return out


class ParameterShard:
    """One shard: tensors, their optimiser, the version and each worker's push count.

    Run as an async Ray actor (see :func:`start_shards`); its methods are coroutines so that
    waiting pulls do not block pushes.
    """

    def __init__(self, index: int, num_workers: int, cfg: dict[str, Any]):
        self.index, self.num_workers = index, num_workers
        self.cfg = PsConfig(**cfg)
        self.params: dict[str, torch.Tensor] = {}
        self.opt: torch.optim.Optimizer | None = None
        self.version = 0
        self.clocks = [0] * num_workers
        self.pending: dict[int, dict[str, np.ndarray]] = {}  # sync: this round's gradients
        self.reads = [0] * num_workers  # async: pulls each worker has made
        self.queued: list[deque[tuple[int, dict[str, np.ndarray]]]] = [deque() for _ in range(num_workers)]
        self.restored_from: int | None = None
        self.changed = asyncio.Condition()
        self._lr = 0.0
        path = self._ckpt_path()
        if path is not None and path.exists():
            self._load(path)

    # -- checkpoints --------------------------------------------------------------------------
    def _ckpt_path(self) -> Path | None:
        return Path(self.cfg.checkpoint_dir) / f"shard-{self.index}.pt" if self.cfg.checkpoint_dir else None

    def _make_opt(self) -> None:
        ps = [nn.Parameter(t, requires_grad=True) for t in self.params.values()]
        self.params = dict(zip(self.params, ps, strict=True))
        if self.cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(ps, lr=1.0, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)
        else:
            self.opt = torch.optim.AdamW(ps, lr=1.0, weight_decay=self.cfg.weight_decay)

    def _save(self) -> None:
        path = self._ckpt_path()
        if path is None or self.opt is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"params": {k: v.detach() for k, v in self.params.items()}, "opt": self.opt.state_dict(),
                    "version": self.version, "clocks": list(self.clocks), "reads": list(self.reads)}, tmp)
        os.replace(tmp, path)  # a reader never sees half a file

    def _load(self, path: Path) -> None:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.params = dict(saved["params"])
        self._make_opt()
        assert self.opt is not None
        self.opt.load_state_dict(saved["opt"])
        self.version, self.clocks = int(saved["version"]), list(saved["clocks"])
        self.reads = list(saved["reads"])
        self.restored_from = self.version

    # -- protocol -----------------------------------------------------------------------------
    async def init(self, tensors: dict[str, np.ndarray]) -> int:
        """Set the starting tensors; only the first call counts (every rank starts identically)."""
        if self.opt is None:
            self.params = {k: torch.tensor(v) for k, v in tensors.items()}
            self._make_opt()
            self._save()
        return self.version

    async def push(self, worker: int, grads: dict[str, np.ndarray], lr: float, n: int = 0) -> None:
        """Hand in ``worker``'s ``n``-th gradient (computed at the tensors of its pull ``n - 1``)."""
        if self.opt is None:
            raise RuntimeError(f"parameter shard {self.index} was never initialised")
        self._lr = lr
        if self.cfg.mode == "sync":
            self.clocks[worker] += 1
            self.pending[worker] = grads
            if len(self.pending) == self.num_workers:
                mean = {k: sum(g[k] for g in self.pending.values()) / self.num_workers for k in self.params}
                self.pending.clear()
                self._apply(mean, lr)
        else:
            # Before its n-th push a worker has pulled n times (a restart may have lost the count).
            self.reads[worker] = max(self.reads[worker], n)
            if n > self.clocks[worker] and all(k != n for k, _ in self.queued[worker]):  # else a retried duplicate
                self.queued[worker].append((n, grads))
            self._drain()
        async with self.changed:
            self.changed.notify_all()

    def _drain(self) -> None:
        """Apply queued async gradients that no longer run ahead of the slowest reader.

        Push ``n`` of a worker is applied once every worker has pulled ``n - staleness`` times, so a
        pull never sees gradients from more than ``staleness`` steps ahead of it; with 0 each
        pull sees exactly the rounds before it, as synchronous SGD does.
        """
        moved = True
        while moved:
            moved = False
            for w, q in enumerate(self.queued):
                if q and q[0][0] == self.clocks[w] + 1 and min(self.reads) >= q[0][0] - self.cfg.staleness:
                    _, grads = q.popleft()
                    # The clock moves before the update so that a checkpoint taken by the update holds it.
                    self.clocks[w] += 1
                    self._apply({k: g / self.num_workers for k, g in grads.items()}, self._lr)
                    moved = True

    def _apply(self, grads: Mapping[str, np.ndarray], lr: float) -> None:
        assert self.opt is not None
        for k, p in self.params.items():
            p.grad = torch.from_numpy(np.ascontiguousarray(grads[k], dtype=np.float32)).view_as(p)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.version += 1
        if self.version % self.cfg.checkpoint_every == 0:
            self._save()

    def _ready(self, worker: int, tag: int) -> bool:
        if self.cfg.mode == "sync":
            # Done when the round the worker pushed into was applied, or when its gradient is not
            # pending at all (lost with a restarted actor: the worker pushes it again).
            return self.version > tag or worker not in self.pending
        return min(self.clocks) >= tag - self.cfg.staleness or self._lost(worker, tag)

    def _lost(self, worker: int, n: int) -> bool:
        """Async: push ``n`` of ``worker`` is neither applied nor queued (a restart lost it)."""
        return n > self.clocks[worker] and all(k != n for k, _ in self.queued[worker])

    async def pull(self, worker: int, tag: int = -1,
                   timeout_s: float = 600.0) -> tuple[int, dict[str, np.ndarray] | None]:
        """The tensors once ``worker`` may go on (see the module doc).

        Args:
            worker: The worker's index.
            tag: ``sync``: the version the worker's last push was computed at (-1: none yet);
                ``async``: how many gradients the worker has pushed.
            timeout_s: Give up waiting after this long.

        Returns:
            ``(version, tensors)``, or ``(version, None)`` to ask the worker to push its last
            gradient again: this shard lost it in a restart.
        """
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: self._ready(worker, tag)), timeout_s)
            if self.cfg.mode == "sync":
                if self.version <= tag:
                    return self.version, None
            elif tag > 0 and self._lost(worker, tag):
                return self.version, None
            out = {k: v.detach().numpy().copy() for k, v in self.params.items()}
            if self.cfg.mode == "async":
                self.reads[worker] = max(self.reads[worker], tag + 1)
                self._drain()
                self.changed.notify_all()
        return self.version, out

    async def stats(self) -> dict[str, Any]:
        """Version, clocks, the restore point (None if never restarted) and the tensor names."""
        return {"index": self.index, "mode": self.cfg.mode, "version": self.version, "clocks": list(self.clocks),
                "restored_from": self.restored_from, "names": sorted(self.params), "pid": os.getpid(),
                "lr": self._lr}


def shard_names(run: str, num_shards: int) -> list[str]:
    """The actor names of a run's shards."""
    return [f"{run}/shard-{i}" for i in range(num_shards)]


def start_shards(run: str, num_workers: int, cfg: PsConfig, *, max_restarts: int = 3) -> list[Any]:
    """Create (or find) the run's shard actors; any worker or the driver may call it.

    The actors are detached and named, so a restarted worker group finds the same shards with
    their latest tensors; :func:`stop_shards` ends them.
    """
    import ray

    cfg.validate()
    actor = ray.remote(ParameterShard)
    return [actor.options(name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                          max_restarts=max_restarts, max_task_retries=-1, num_cpus=cfg.cpus_per_shard,
                          max_concurrency=max(64, 4 * num_workers))
            .remote(i, num_workers, asdict(cfg)) for i, name in enumerate(shard_names(run, cfg.num_shards))]


def stop_shards(run: str, num_shards: int) -> None:
    """Kill the run's shard actors (their checkpoints stay)."""
    import ray

    for name in shard_names(run, num_shards):
        with contextlib.suppress(ValueError):  # already gone
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)


class PsClient:
    """A worker's side of the protocol: push gradients, pull parameters, count the bytes.

    Args:
        shards: The shard actor handles.
        params: The worker's trainable tensors by name.
        worker: This worker's index (0..W-1).
    """

    def __init__(self, shards: list[Any], params: Mapping[str, nn.Parameter], worker: int):
        import ray

        self.shards, self.params, self.worker = shards, dict(params), worker
        self.owner = split_by_size({k: tuple(p.shape) for k, p in self.params.items()}, len(shards))
        self.bytes_pushed = self.bytes_pulled = 0
        self.versions = [0] * len(shards)  # the version of each shard's tensors we hold
        self.last: list[dict[str, np.ndarray]] = [{} for _ in shards]
        self.lr = 0.0
        # Every worker offers the same (seeded) tensors; the first to arrive sets them.
        ray.get([s.init.remote({k: self._np(self.params[k]) for k in names})
                 for s, names in zip(shards, self.owner, strict=True)])
        stats = ray.get([s.stats.remote() for s in shards])
        self.sync = stats[0]["mode"] == "sync"
        # Gradients pushed so far (async: the pull's tag). A worker of a restarted group carries
        # on from the count its shards hold for its index.
        self.pushes = 0 if self.sync else min(st["clocks"][worker] for st in stats)
        # sync: the version our last push to each shard was computed at; async: our push count.
        self.tags = [-1 if self.sync else self.pushes] * len(shards)
        self.pull()

    @staticmethod
    def _np(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float32).numpy()

    def pull(self) -> int:
        """Copy the shards' tensors into the worker's parameters; returns the lowest version.

        A shard that lost this worker's last gradient in a restart gets it again, then is asked again.
        """
        import ray

        pending = {i: self.shards[i].pull.remote(self.worker, self.tags[i]) for i in range(len(self.shards))}
        with torch.no_grad():
            while pending:
                i, ref = next(iter(pending.items()))
                version, tensors = ray.get(ref)
                del pending[i]
                if tensors is None:
                    ray.get(self._send(i, version))
                    pending[i] = self.shards[i].pull.remote(self.worker, self.tags[i])
                    continue
                self.versions[i] = version
                for k, v in tensors.items():
                    p = self.params[k]
                    p.copy_(torch.as_tensor(np.array(v), dtype=p.dtype, device=p.device))
                    self.bytes_pulled += v.nbytes
        return min(self.versions)

    def _send(self, i: int, version: int) -> Any:
        self.tags[i] = version if self.sync else self.pushes
        self.bytes_pushed += sum(g.nbytes for g in self.last[i].values())
        return self.shards[i].push.remote(self.worker, self.last[i], self.lr, self.pushes)

    def push(self, lr: float) -> None:
        """Send this worker's gradients (zeros for tensors that got none) to their shards."""
        import ray

        self.lr = float(lr)
        self.pushes += 1
        for i, names in enumerate(self.owner):
            self.last[i] = {k: (self._np(self.params[k].grad) if self.params[k].grad is not None
                                else np.zeros(tuple(self.params[k].shape), np.float32)) for k in names}
        ray.get([self._send(i, self.versions[i]) for i in range(len(self.shards))])

    def step(self, lr: float) -> int:
        """Push, then pull (waiting as the mode says); returns the version pulled."""
        self.push(lr)
        return self.pull()


class PsOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose ``step`` is a parameter-server round trip.

    The real optimiser runs on the shards; this one only carries the learning rate (so
    ``CosineAnnealingLR`` and the loop's step schedule set it as usual) to the shards with every
    push.
    """

    def __init__(self, params: Iterable[nn.Parameter], client: PsClient, lr: float):
        super().__init__(list(params), {"lr": lr})
        self.client = client

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Push this worker's gradients and pull the shards' tensors (``closure`` as torch's)."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        self.client.step(self.param_groups[0]["lr"])

