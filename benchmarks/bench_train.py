"""Training benchmark: Ray Train DDP vs plain torchrun DDP, and PowerSGD gradient bytes.

    python -m benchmarks.bench_train [--workers 2] [--steps 20] [--skip-cuda]

Figures, each a ratio against a baseline measured in the same run:

- ``ray_vs_torchrun``: images/s of a Ray TorchTrainer run over a ``torchrun`` run, same model
  (torchvision resnet18, random init, 64 px), same generated data, same worker count (goal ≥ 0.95);
- ``powersgd_vs_allreduce_bytes``: gradient bytes per step sent by the PowerSGD hook over DDP's
  fp32 allreduce (and the fp16 hook), counted by wrapping the hooks;
- ``cuda_resnet50_bf16``: ResNet-50 bf16 training images/s on one GPU against fp32 on the same
  GPU, only when CUDA is present (reported as not measured otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.train_torchrun import BENCH_DEFAULTS, build_model, ddp_throughput

REPO = Path(__file__).resolve().parents[1]


def run_torchrun(cfg: dict[str, Any], workers: int) -> dict[str, Any]:
    """Plain torchrun on this machine (gloo, CPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "res.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
               str(REPO / "benchmarks" / "train_torchrun.py"), "--out", str(out), "--config", json.dumps(cfg)]
        env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=900)
        return json.loads(out.read_text())


def _ray_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(build_model(config["model"], config["num_classes"]))
    res = ddp_throughput(model, config, ctx.get_world_rank(), ctx.get_world_size())
    # Train V2 keeps metrics with checkpoints only, so rank 0 attaches a tiny one (after the timing).
    if ctx.get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as d:
            Path(d, "res.json").write_text(json.dumps(res))
            ray.train.report(res, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(res)


def run_ray(cfg: dict[str, Any], workers: int, storage: str) -> dict[str, Any]:
    """The same loop under a Ray Train V2 TorchTrainer."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(_ray_worker, train_loop_config=cfg,
                           scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"bench-{int(time.time())}", storage_path=storage))
    t0 = time.perf_counter()
    res = trainer.fit()
    return {**res.metrics, "job_wall_s": time.perf_counter() - t0}


def grad_bytes(model_name: str, num_classes: int, rank: int) -> dict[str, float]:
    """Bytes per step of each comm hook on the benchmark model (a one-process gloo group suffices)."""
    from livelens.train.ddp import ByteCounter, register_comm_hook

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        try:
            for hook in ("none", "fp16", "powersgd"):
                torch.manual_seed(0)
                ddp = nn.parallel.DistributedDataParallel(build_model(model_name, num_classes))
                counter = ByteCounter()
                register_comm_hook(ddp, hook, powersgd_rank=rank, start_powersgd_iter=2, counter=counter)
                x, y = torch.randn(4, 3, 64, 64), torch.randint(0, num_classes, (4,))
                for _ in range(4):
                    nn.functional.cross_entropy(ddp(x), y).backward()
                    counter.end_step()
                out[hook] = counter.per_step(skip=2)
        finally:
            torch.distributed.destroy_process_group()
    return out


def cuda_bf16(steps: int = 30) -> dict[str, Any]:
    """ResNet-50 training images/s on one GPU, bf16 autocast vs fp32 (batch 128, 224 px)."""
    if not torch.cuda.is_available():
        return {"measured": False, "reason": "no CUDA device on this machine"}
    import torchvision

    dev = torch.device("cuda")
    res: dict[str, Any] = {"measured": True, "device": torch.cuda.get_device_name(0)}
    for prec in ("fp32", "bf16"):
        model = torchvision.models.resnet50(weights=None).to(dev).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(128, 3, 224, 224, device=dev).to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (128,), device=dev)
        for i in range(steps + 5):
            if i == 5:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec == "bf16"):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        res[f"{prec}_images_per_s"] = steps * 128 / (time.perf_counter() - t0)
    res["bf16_vs_fp32"] = res["bf16_images_per_s"] / res["fp32_images_per_s"]
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every measurement and print JSON plus a Markdown summary."""
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=BENCH_DEFAULTS["steps"])
    p.add_argument("--repeats", type=int, default=2, help="alternating torchrun/Ray pairs (best of each kept)")
    p.add_argument("--powersgd-rank", type=int, default=2)
    p.add_argument("--skip-cuda", action="store_true")
    a = p.parse_args(argv)
    # Ray reads the auth mode when it is imported, and a local ray.init() turns token auth on.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    cfg = {**BENCH_DEFAULTS, "steps": a.steps}
    if not ray.is_initialized():
        ray.init(num_cpus=max(4, a.workers * 2), include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024 * 1024,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(cfg["threads"])}})
    torchrun_runs, ray_runs = [], []
    with tempfile.TemporaryDirectory() as storage:
        # Alternate the two so a burst of load from elsewhere on the machine hits both alike.
        for _ in range(a.repeats):
            torchrun_runs.append(run_torchrun(cfg, a.workers))
            ray_runs.append(run_ray(cfg, a.workers, storage))
    ray.shutdown()
    best_t = max(r["images_per_s"] for r in torchrun_runs)
    best_r = max(r["images_per_s"] for r in ray_runs)
    gb = grad_bytes(cfg["model"], cfg["num_classes"], a.powersgd_rank)
    result = {
        "config": {**cfg, "workers": a.workers, "repeats": a.repeats, "powersgd_rank": a.powersgd_rank},
        "torchrun_images_per_s": [r["images_per_s"] for r in torchrun_runs],
        "ray_images_per_s": [r["images_per_s"] for r in ray_runs],
        "ray_job_wall_s": [r["job_wall_s"] for r in ray_runs],
        "ray_vs_torchrun": best_r / best_t,
        "grad_bytes_per_step": gb,
        "powersgd_vs_allreduce_bytes": gb["powersgd"] / gb["none"],
        "fp16_vs_allreduce_bytes": gb["fp16"] / gb["none"],
        "cuda_resnet50_bf16": {"measured": False, "reason": "skipped"} if a.skip_cuda else cuda_bf16(),
    }
    print(json.dumps(result, indent=2))
    print(f"\n| figure | value |\n|---|---|\n| Ray Train / torchrun images/s ({a.workers} workers, "
          f"{cfg['model']} {cfg['image_size']}px) | {result['ray_vs_torchrun']:.3f} |\n"
          f"| PowerSGD r={a.powersgd_rank} / allreduce bytes per step | {result['powersgd_vs_allreduce_bytes']:.4f} |\n"
          f"| fp16 hook / allreduce bytes per step | {result['fp16_vs_allreduce_bytes']:.3f} |")
    return result


if __name__ == "__main__":
    main()
