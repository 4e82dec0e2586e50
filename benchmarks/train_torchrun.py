"""The DDP step loop shared by both sides of ``bench_train``, and its plain ``torchrun`` entry point.

    torchrun --nproc_per_node=2 benchmarks/train_torchrun.py --out result.json

Both the torchrun run and the Ray TorchTrainer run call :func:`ddp_throughput` with the same
model, the same generated data and the same step counts, so the ratio isolates Ray's overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from torch import nn

BENCH_DEFAULTS: dict[str, Any] = {"model": "resnet18", "image_size": 64, "batch_size": 32, "warmup": 3,
                                  "steps": 20, "threads": 1, "num_classes": 16}


def build_model(name: str, num_classes: int) -> nn.Module:
    """A torchvision classifier with random weights (no download)."""
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)


def ddp_throughput(model: nn.Module, cfg: dict[str, Any], rank: int, world: int,
                   device: torch.device | None = None) -> dict[str, float]:
    """Train ``cfg['steps']`` timed steps (after ``warmup``) on a fixed generated batch; images/s over all ranks.

    ``model`` must already be wrapped in DDP when ``world > 1``. The batch is generated once
    per rank from a rank-dependent seed, so data loading does not enter the measurement.
    """
    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(cfg["batch_size"], 3, cfg["image_size"], cfg["image_size"], generator=g).to(device)
    y = torch.randint(0, cfg["num_classes"], (cfg["batch_size"],), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step() -> float:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(cfg["warmup"]):
        step()
    if world > 1:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        loss = step()
    if world > 1:
        torch.distributed.barrier()
    secs = time.perf_counter() - t0
    return {"images_per_s": cfg["steps"] * cfg["batch_size"] * world / secs, "seconds": secs, "final_loss": loss}


def main() -> None:
    """torchrun entry point: rank 0 writes the result JSON."""
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="{}", help="JSON overrides of BENCH_DEFAULTS")
    a = p.parse_args()
    cfg = {**BENCH_DEFAULTS, **json.loads(a.config)}
    torch.set_num_threads(cfg["threads"])
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(build_model(cfg["model"], cfg["num_classes"]))
    res = ddp_throughput(model, cfg, rank, world)
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump({**res, "world_size": world, "pid": os.getpid()}, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
