"""Gradient communication on a real multi-node cluster: flat ring vs two-level allreduce vs parameter server.

    python -m benchmarks.bench_comm [--nodes 2] [--per-node 2] [--model resnet18] [--steps 8]

It starts a :class:`cluster.local.LocalCluster` (a head and ``--nodes`` worker raylets on
loopback) and runs one Ray Train job of ``nodes × per_node`` workers. Every worker builds the
same model twice, wraps one copy in DDP's flat allreduce and one in the two-level hook, and:

- checks that both give the same averaged gradient (max abs difference, on one batch);
- times ``--steps`` forward/backward passes of each;
- counts the TCP bytes each worker sent **to workers on other nodes** during each phase, from
  the kernel's per-socket counters (``ss``); on loopback no interface counter can tell nodes
  apart, sockets can.

A second job on the same cluster trains the same model through the parameter server
(``livelens.train.ps``, sync) for the same steps and counts its bytes and throughput.

Each figure is also given as a ratio to the flat ring of the same run, with the textbook ring
model beside the measured bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DRIVER = """
import json, sys
from benchmarks.bench_comm import run_job
print("@@" + json.dumps(run_job(json.loads(sys.argv[1]))))
"""


def _model(name: str) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 256), nn.ReLU(), nn.Linear(256, 10))
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=10)


def _batch(config: dict[str, Any], rank: int, step: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1000 * rank + step)
    side = config["image_size"]
    return torch.randn(config["batch_size"], 3, side, side, generator=g), torch.randint(0, 10, (config["batch_size"],),
                                                                                         generator=g)


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _phase(model: Any, config: dict[str, Any], rank: int) -> dict:
    """``steps`` forward/backward passes; time and bytes this rank sent to other nodes."""
    import torch.distributed as dist
    from torch import nn

    from livelens.train.hierarchical import tcp_bytes_sent

    dist.barrier()
    before = tcp_bytes_sent()
    t0 = time.perf_counter()
    for step in range(config["steps"]):
        x, y = _batch(config, rank, step)
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
    dist.barrier()
    secs = time.perf_counter() - t0
    return {"before": before, "after": tcp_bytes_sent(), "s": secs}


def comm_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: flat vs two-level DDP on the same model, same batches."""
    import copy

    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from livelens.train.ddp import ByteCounter, register_comm_hook
    from livelens.train.hierarchical import cross_node_bytes, ring_inter_node_bytes

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    base = _model(config["model"])
    flat = DistributedDataParallel(copy.deepcopy(base))
    two = DistributedDataParallel(copy.deepcopy(base))
    counter = ByteCounter()
    state = register_comm_hook(two, config["compression"], counter=counter, allreduce="two_level",
                               powersgd_rank=config.get("powersgd_rank", 2))
    node_of = state.groups.node_of
    node = node_of[rank]
    # Correctness: one batch through both.
    x, y = _batch(config, rank, 999)
    for m in (flat, two):
        m.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
    diff = max(float((a.grad - b.grad).abs().max()) for a, b in zip(flat.parameters(), two.parameters(), strict=True))
    scale = max(float(a.grad.abs().max()) for a in flat.parameters())
    phases = {"flat": _phase(flat, config, rank), "two_level": _phase(two, config, rank)}
    # Which node each socket address belongs to: every rank's own local addresses.
    mine = {addr for ph in phases.values() for (addr, _peer) in ph["after"]}
    addr_node: dict[str, int] = {}
    for r, addrs in enumerate(_gather(sorted(mine))):
        for a in addrs:
            addr_node[a] = node_of[r]
    out = {"rank": rank, "node": node, "max_abs_diff": diff, "grad_scale": scale, "node_id": ray.get_runtime_context().get_node_id()}
    for name, ph in phases.items():
        out[f"{name}_cross_bytes"] = cross_node_bytes(ph["before"], ph["after"], node, addr_node)
        out[f"{name}_all_bytes"] = cross_node_bytes(ph["before"], ph["after"], -1, addr_node)  # to any worker
        out[f"{name}_s"] = ph["s"]
    rows = _gather(out)
    grad_bytes = sum(p.numel() * 4 for p in base.parameters())
    if rank == 0:
        steps = config["steps"]
        res = {"world": world, "nodes": len(set(node_of)), "node_of": node_of, "grad_bytes": grad_bytes,
               "max_abs_diff": max(r["max_abs_diff"] for r in rows), "grad_scale": rows[0]["grad_scale"],
               "per_rank": rows}
        for name in ("flat", "two_level"):
            res[f"{name}_cross_bytes_per_step"] = sum(r[f"{name}_cross_bytes"] for r in rows) / steps
            res[f"{name}_all_bytes_per_step"] = sum(r[f"{name}_all_bytes"] for r in rows) / steps
            res[f"{name}_images_per_s"] = steps * config["batch_size"] * world / max(r[f"{name}_s"] for r in rows)
        res["model_flat_ring_cross_bytes"] = ring_inter_node_bytes(grad_bytes, node_of)
        res["model_two_level_cross_bytes"] = ring_inter_node_bytes(grad_bytes, node_of, state.groups.leader_ranks)
        res["counter_leader_bytes_per_step"] = counter.bytes_sent / max(1, steps + 1)
        with tempfile.TemporaryDirectory() as d:
            Path(d, "res.json").write_text(json.dumps(res))
            ray.train.report({"ok": 1}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report({"ok": 1})
    dist.barrier()


def ps_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: the same steps through the parameter server (sync SGD on 2 shards)."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from livelens.train.ps import (
        NAMESPACE,
        PsClient,
        PsConfig,
        PsOptimizer,
        shard_names,
        start_shards,
        stop_shards,
    )

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run = f"bench-comm-{config['tag']}"
    cfg = PsConfig(mode="sync", num_shards=2)
    if rank == 0:
        start_shards(run, world, cfg)
    dist.barrier()
    shards = [ray.get_actor(n, namespace=NAMESPACE) for n in shard_names(run, cfg.num_shards)]
    model = _model(config["model"])
    client = PsClient(shards, dict(model.named_parameters()), rank)
    opt = PsOptimizer(model.parameters(), client, lr=0.01)
    dist.barrier()
    b0 = client.bytes_pushed + client.bytes_pulled
    t0 = time.perf_counter()
    for step in range(config["steps"]):
        x, y = _batch(config, rank, step)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    dist.barrier()
    secs = time.perf_counter() - t0
    rows = _gather({"bytes": client.bytes_pushed + client.bytes_pulled - b0, "s": secs})
    if rank == 0:
        stop_shards(run, cfg.num_shards)
        steps = config["steps"]
        res = {"ps_bytes_per_step": sum(r["bytes"] for r in rows) / steps,
               "ps_images_per_s": steps * config["batch_size"] * world / max(r["s"] for r in rows)}
        with tempfile.TemporaryDirectory() as d:
            Path(d, "res.json").write_text(json.dumps(res))
            ray.train.report({"ok": 1}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report({"ok": 1})


def _fit(fn: Any, config: dict[str, Any], storage: str, name: str) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(fn, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=config["world"], resources_per_worker={"CPU": 1},
                                                        placement_strategy="PACK"),
                           run_config=RunConfig(name=name, storage_path=storage))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name} failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        return json.loads(Path(d, "res.json").read_text())


def run_job(config: dict[str, Any]) -> dict[str, Any]:
    """Driver side (inside the cluster): the DDP comparison, then, if asked, the PS run."""
    import os

    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    with tempfile.TemporaryDirectory() as storage:
        res = _fit(comm_worker, config, storage, "comm")
        if config.get("ps"):
            res.update(_fit(ps_worker, {**config, "tag": int(time.time())}, storage, "ps"))
    return res


def run_on_cluster(config: dict[str, Any], nodes: int = 2, per_node: int = 2, timeout: float = 900) -> dict[str, Any]:
    """Start a LocalCluster of ``nodes`` raylets with ``per_node`` CPUs each and run :func:`run_job`."""
    from cluster.local import LocalCluster

    config = {**config, "world": nodes * per_node}
    with LocalCluster(num_workers=nodes, cpus_per_worker=per_node, object_store_mb=200, include_dashboard=False) as c:
        proc = c.run_driver(DRIVER, timeout=timeout, args=[json.dumps(config)])
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-5000:])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("@@"))
    return json.loads(line[2:])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and print JSON plus a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--per-node", type=int, default=2)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--compression", default="none", choices=["none", "fp16", "powersgd"])
    p.add_argument("--no-ps", action="store_true")
    a = p.parse_args(argv)
    t0 = time.time()
    res = run_on_cluster({"model": a.model, "image_size": a.image_size, "batch_size": a.batch_size, "steps": a.steps,
                          "compression": a.compression, "ps": not a.no_ps}, a.nodes, a.per_node)
    res["wall_s"] = time.time() - t0
    flat = res["flat_cross_bytes_per_step"]
    res["two_level_vs_flat_cross_bytes"] = res["two_level_cross_bytes_per_step"] / flat if flat else None
    res["two_level_vs_flat_images_per_s"] = res["two_level_images_per_s"] / res["flat_images_per_s"]
    if "ps_bytes_per_step" in res:
        res["ps_vs_flat_images_per_s"] = res["ps_images_per_s"] / res["flat_images_per_s"]
    print(json.dumps({k: v for k, v in res.items() if k != "per_rank"}, indent=2))
    mb = 1024 * 1024
    print(f"\n{a.nodes} nodes × {a.per_node} workers, {a.model} ({res['grad_bytes'] / mb:.1f} MB of gradients), "
          f"{a.steps} steps, compression {a.compression}\n")
    print("| scheme | inter-node MB/step (measured) | ring model | images/s | vs flat |")
    print("|---|---|---|---|---|")
    print(f"| flat ring | {flat / mb:.1f} | {res['model_flat_ring_cross_bytes'] / mb:.1f} | "
          f"{res['flat_images_per_s']:.1f} | 1.0 |")
    print(f"| two-level | {res['two_level_cross_bytes_per_step'] / mb:.1f} | "
          f"{res['model_two_level_cross_bytes'] / mb:.1f} | {res['two_level_images_per_s']:.1f} | "
          f"bytes {res['two_level_vs_flat_cross_bytes']:.2f}, images/s {res['two_level_vs_flat_images_per_s']:.2f} |")
    if "ps_bytes_per_step" in res:
        print(f"| parameter server (sync, 2 shards) | {res['ps_bytes_per_step'] / mb:.1f} (all workers↔shards) | – | "
              f"{res['ps_images_per_s']:.1f} | images/s {res['ps_vs_flat_images_per_s']:.2f} |")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
