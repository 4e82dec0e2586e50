"""The driver side of a Ray Train job that publishes one model: start Ray, fit, read the last checkpoint.

Used by the jobs whose whole run is one :class:`~ray.train.torch.TorchTrainer` over
:func:`livelens.train.fit` (the OCR models, the persons detector, the attribute network):
:func:`train_and_publish` fits and stores the final weights with the job's card.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any


def worker_context(use_gpu: bool) -> tuple[int, int]:
    """Inside a Ray Train worker: its ``(rank, world size)``, with torch's CPU threads set.

    Ray sets OMP_NUM_THREADS to a worker's CPU reservation, one thread for our fractional 0.5;
    on CPU the workers of a node share its cores instead (one worker ran at half speed).
    """
    import ray.train
    import torch

    ctx = ray.train.get_context()
    if not use_gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    return ctx.get_world_rank(), ctx.get_world_size()


def fit_with_ray(train_fn: Callable[[dict], None], config: dict[str, Any], *, name: str, storage_path: str,
                 num_workers: int = 1, use_gpu: bool = False, max_failures: int = 1
                 ) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Run ``train_fn`` on ``num_workers`` Ray Train workers and read the final checkpoint.

    Starts (and afterwards stops) a local Ray with token auth when none is connected.

    Returns:
        ``(state, metrics, checkpoint path)`` of the last reported checkpoint.

    Raises:
        Exception: The run's error, when it failed past ``max_failures`` restarts.
    """
    # Before importing ray, which reads its auth settings at import. Our own token: the shared
    # ~/.ray/auth_token belongs to whichever cluster on this host wrote it last.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from livelens.train.driver import init_ray, make_run_config, read_checkpoint

    started = not ray.is_initialized()
    if started:
        init_ray(num_cpus=max(4, num_workers + 2))
    try:
        trainer = TorchTrainer(
            train_fn, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 0.5}),
            run_config=make_run_config(name, storage_path, max_failures=max_failures, keep=1),
        )
        result = trainer.fit()
        if result.error:
            raise result.error
        state, metrics, _ = read_checkpoint(result.checkpoint)
        return state, metrics, result.checkpoint.path
    finally:
        if started:
            ray.shutdown()


def train_and_publish(train_fn: Callable[[dict], None], cfg: Any, card: Mapping[str, Any]) -> dict[str, Any]:
    """Fit ``train_fn`` on ``cfg`` with :func:`fit_with_ray`, then store the final weights with a card.

    Args:
        train_fn: The per-worker loop; its checkpoints hold ``{"model": state_dict}``.
        cfg: The job's config dataclass, with ``name``, ``run_name``, ``storage_path``,
            ``num_workers``, ``loop.use_gpu``, ``max_failures`` and ``store``.
        card: What the job says of its model (task, arch, data, init, licence, load); the run's
            config, final metrics, training seconds and git commit are added here.

    Returns:
        ``{"ref", "metrics", "card", "checkpoint"}``.
    """
    from livelens.store import ModelStore, git_sha

    t0 = time.time()
    state, metrics, checkpoint = fit_with_ray(
        train_fn, asdict(cfg), name=cfg.run_name or f"{cfg.name}-{int(t0)}", storage_path=cfg.storage_path,
        num_workers=cfg.num_workers, use_gpu=cfg.loop.use_gpu, max_failures=cfg.max_failures)
    full = {**card, "train": asdict(cfg), "metrics": dict(metrics), "train_seconds": round(time.time() - t0, 1),
            "git": git_sha()}
    ref = ModelStore(cfg.store).save(cfg.name, state["model"], json.loads(json.dumps(full, default=str)))
    return {"ref": ref, "metrics": full["metrics"], "card": full, "checkpoint": checkpoint}
