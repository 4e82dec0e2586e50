"""DDP helpers: gradient-communication hooks, mixed precision, and a gradient-byte counter.

A comm hook replaces DDP's bucket allreduce. ``fp16`` halves the bytes on the wire;
``powersgd`` sends a rank-``r`` factorisation of each large gradient matrix instead of the
matrix (Vogels et al., 2019), trading a little accuracy per step for much less traffic on
slow links, which is what a multi-node CPU cluster has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from livelens.errors import ConfigError

COMM_HOOKS = ("none", "fp16", "powersgd")
#: ``flat``: DDP's one ring over every rank; ``two_level``: livelens.train.hierarchical.
ALLREDUCE = ("flat", "two_level")
PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: str, use_gpu: bool) -> None:
    """Reject precision/device combinations that cannot work, before any worker starts.

    bf16 autocast runs on CPU and GPU; fp16 needs a GradScaler, whose loss scaling only
    exists for CUDA, and CPU fp16 kernels are missing for many ops.

    Raises:
        ConfigError: Unknown precision, or fp16 without a GPU.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "fp16" and not use_gpu:
        raise ConfigError("precision 'fp16' needs use_gpu=True (GradScaler is CUDA-only); use 'bf16' on CPU")


def check_comm_hook(name: str, powersgd_rank: int = 1, allreduce: str = "flat") -> None:
    """Validate a comm-hook choice.

    Raises:
        ConfigError: Unknown hook or allreduce scheme, or a non-positive PowerSGD rank.
    """
    if allreduce not in ALLREDUCE:
        raise ConfigError(f"unknown allreduce scheme {allreduce!r}; choose one of {ALLREDUCE}")
    if name not in COMM_HOOKS:
        raise ConfigError(f"unknown comm hook {name!r}; choose one of {COMM_HOOKS}")
    if name == "powersgd" and powersgd_rank < 1:
        raise ConfigError(f"powersgd_rank must be >= 1, got {powersgd_rank}")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")


@dataclass
class ByteCounter:
    """Gradient bytes handed to the network by a comm hook, summed over buckets and steps."""

    bytes_sent: int = 0
    buckets: int = 0
    history: list[int] = field(default_factory=list)

    def per_step(self, skip: int = 0) -> float:
        """Mean bytes per optimiser step over ``history`` after the first ``skip`` steps."""
        rest = self.history[skip:]
        return sum(rest) / len(rest) if rest else 0.0

    def end_step(self) -> None:
        """Close one optimiser step (call after ``backward``)."""
        self.history.append(self.bytes_sent - sum(self.history))


def _counting(hook: Callable, state: Any, counter: ByteCounter, elem_bytes: int) -> Callable:
    """Wrap ``hook`` so each bucket adds what it actually sends to ``counter``.

    For PowerSGD the hook's own state tracks the element count after compression; during
    its warm-up iterations it falls back to a plain allreduce of the whole bucket.
    """

    def wrapped(hook_state, bucket):  # unannotated: DDP compares annotations to real types, not strings
        before = getattr(state, "total_numel_after_compression", None)
        fut = hook(hook_state, bucket)
        after = getattr(state, "total_numel_after_compression", None)
        if before is not None and after is not None and after > before:
            counter.bytes_sent += (after - before) * bucket.buffer().element_size()
        else:
            counter.bytes_sent += bucket.buffer().numel() * elem_bytes
        counter.buckets += 1
        return fut

    return wrapped


def register_comm_hook(model: nn.Module, name: str, *, powersgd_rank: int = 1, start_powersgd_iter: int = 2,
                       counter: ByteCounter | None = None, allreduce: str = "flat") -> Any:
    """Install a gradient comm hook on a DDP model; a no-op for a plain module (one worker).

    Ray's ``prepare_model`` wraps in DDP only when world_size > 1, hence the check.

    Args:
        model: The (possibly DDP-wrapped) model.
        name: ``none`` (DDP's allreduce), ``fp16`` or ``powersgd``.
        powersgd_rank: Matrix approximation rank for PowerSGD.
        start_powersgd_iter: Plain allreduce steps before compressing (PowerSGD warm-up).
        counter: When given, counts the gradient bytes each step sends (for ``two_level``: the
            bytes this rank sends to other nodes).
        allreduce: ``flat`` or ``two_level`` (within nodes, then across node leaders; ``name``
            then compresses the leaders' stage).

    Returns:
        The hook state (PowerSGDState for powersgd, TwoLevelState for two_level), or None.
    """
    check_comm_hook(name, powersgd_rank, allreduce)
    if not isinstance(model, DistributedDataParallel):
        return None
    if allreduce == "two_level":
        from livelens.train.hierarchical import register_two_level_hook

        return register_two_level_hook(model, name, powersgd_rank=powersgd_rank,
                                       start_powersgd_iter=start_powersgd_iter, counter=counter)
    state: Any = None
    if name == "none":
        if counter is None:
            return None
        hook, elem = default_hooks.allreduce_hook, 4
    elif name == "fp16":
        hook, elem = default_hooks.fp16_compress_hook, 2
    else:
        # Error feedback (on by default) needs at least two plain allreduce steps first.
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                            start_powerSGD_iter=max(2, start_powersgd_iter))
        hook, elem = powerSGD_hook.powerSGD_hook, 4
    if counter is not None:
        hook = _counting(hook, state, counter, elem)
    model.register_comm_hook(state, hook)
    return state


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters that get gradients (frozen backbones are skipped by the optimiser)."""
    return (p for p in model.parameters() if p.requires_grad)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
