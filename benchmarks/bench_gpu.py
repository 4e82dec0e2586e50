"""`make bench-gpu`: the GPU figures, in about 5 minutes on one H100/H200, unchanged on a lent device.

    python -m benchmarks.bench_gpu [--out runs/bench-gpu.json] [--dry-run]

Three measurements, each with a ratio against a baseline from the same run:

1. **ResNet-50 training, bf16 vs fp32** (batch 128, 224 px, channels-last, SGD): images/s of
   each and their ratio.
2. **Serving images/s from JPEG bytes**: the moderation engine's own header check, decode and
   preprocessing (``ModerationEngine.decode``/``to_tensor``) in a thread pool, and the served
   safety model moved to the GPU. The engine keeps its model on the CPU, so this is its code with
   the model on the GPU, not a Serve request. Baselines: the decode and preprocessing alone (the
   CPU ceiling) and the model alone on a batch already on the GPU; the pipeline is reported as a
   share of the lower of the two.
3. **The mmocr GPU preset's first epoch** (``train_jobs.ocr --preset gpu``, detection then
   recognition, through Ray Train on one GPU) on a reduced sample count: wall time, images/s,
   and the full preset projected from it, as a share of the seed's one-day iteration.

``--dry-run`` runs every part on the CPU with toy sizes, so the script itself is tested here;
without CUDA and without ``--dry-run`` it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def resnet50_bf16(device: str, steps: int, batch: int, side: int) -> dict[str, Any]:
    """ResNet-50 training images/s, fp32 then bf16 autocast, on ``device``."""
    import torchvision

    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                           "batch": batch, "side": side, "steps": steps}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None).to(device).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(batch, 3, side, side, device=device).to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device=device)
        warm = 5 if device == "cuda" else 1
        for i in range(steps + warm):
            if i == warm:
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=prec == "bf16"):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        res[f"{prec}_images_per_s"] = steps * batch / (time.perf_counter() - t0)
        del model, opt
    res["bf16_vs_fp32"] = res["bf16_images_per_s"] / res["fp32_images_per_s"]
    return res


def serving_from_jpeg(device: str, seconds: float, batch: int, threads: int) -> dict[str, Any]:
    """The moderation engine's own steps from JPEG bytes, with its model on ``device``.

    Each frame goes through what the moderation deployment runs: ``probe_image`` (the gateway's
    header check), ``ModerationEngine.decode`` and ``ModerationEngine.to_tensor`` (the one eval
    preprocessing), then the served safety model's forward pass. The engine itself keeps its model
    on the CPU, so the model is moved to ``device`` here; everything before it is the engine's code,
    run in a thread pool (OpenCV's decode releases the GIL). Baselines from the same run: the
    decode and preprocessing alone, and the model alone on a batch already on ``device``.
    """
    from benchmarks.bench_serve import _frames
    from livelens.imageio import probe_image
    from livelens.models import predict
    from livelens.moderation import ModerationEngine

    engine = ModerationEngine(use_open_nsfw=False, threads=threads)
    safety = engine.safety
    if safety is None:
        raise RuntimeError(f"no safety model in the stores: {engine.missing}")
    model = safety.model.to(device)
    jpegs = _frames(64)
    pool = ThreadPoolExecutor(threads)

    def frame(j: bytes) -> np.ndarray:
        return engine.decode(probe_image(j))[0]

    def prepared(i: int) -> torch.Tensor:
        frames = list(pool.map(frame, [jpegs[(i + k) % len(jpegs)] for k in range(batch)]))
        return engine.to_tensor(frames, safety)

    def timed(fn: Any) -> float:
        fn(0)  # warm-up: allocator, cuDNN autotune
        done, i, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn(i)
            done += batch
            i += batch
        return done / (time.perf_counter() - t0)

    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    torch.backends.cudnn.benchmark = True

    def infer(x: torch.Tensor) -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=dtype):
            predict(model, x.to(device, non_blocking=True))
        if device == "cuda":
            torch.cuda.synchronize()

    fixed = prepared(0).to(device)
    res: dict[str, Any] = {"model": safety.ref, "batch": batch, "decode_threads": threads,
                           "input_hw": list(safety.input_hw)}
    res["decode_only_images_per_s"] = timed(prepared)
    res["model_only_images_per_s"] = timed(lambda i: infer(fixed))
    res["pipeline_images_per_s"] = timed(lambda i: infer(prepared(i)))
    res["pipeline_vs_bound"] = res["pipeline_images_per_s"] / min(res["decode_only_images_per_s"],
                                                                 res["model_only_images_per_s"])
    pool.shutdown()
    return res


def ocr_first_epoch(preset: str, det_samples: int, rec_samples: int, full: dict[str, dict]) -> dict[str, Any]:
    """One epoch of each task of ``preset`` on reduced samples; the full preset projected from it."""
    import tempfile

    from livelens.cli_config import apply_flat
    from livelens.ocr.train import run
    from train_jobs.ocr import preset_config

    out: dict[str, Any] = {"preset": preset}
    projected = 0.0
    scratch = tempfile.mkdtemp(prefix="bench-gpu-")  # the benchmark's models stay out of the user store
    for task, n in (("det", det_samples), ("rec", rec_samples)):
        cfg = apply_flat(preset_config(preset, task), {"generate": n, "max_samples": n, "epochs": 1,
                                                       "store": f"{scratch}/store", "storage_path": f"{scratch}/train"})
        t0 = time.perf_counter()
        summary = run(cfg)
        wall = time.perf_counter() - t0
        per_image = wall / n
        f = full[task]
        out[task] = {"samples": n, "wall_s": wall, "images_per_s": n / wall,
                     "metrics": {k: v for k, v in (summary.get("metrics") or {}).items() if isinstance(v, int | float)}}
        projected += per_image * f["max_samples"] * f["epochs"]
    out["full_preset_projected_h"] = projected / 3600
    out["full_preset_vs_one_day"] = projected / 86400
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the three measurements and write them as JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench-gpu.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the script, measures nothing")
    p.add_argument("--skip-ocr", action="store_true")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        print("bench-gpu: no CUDA device here; run it on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    device = "cuda" if cuda and not a.dry_run else "cpu"
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from train_jobs.ocr import PRESETS

    t0 = time.time()
    res: dict[str, Any] = {"dry_run": a.dry_run, "torch": torch.__version__}
    if a.dry_run:
        res["resnet50"] = resnet50_bf16(device, steps=1, batch=2, side=64)
        res["serving"] = serving_from_jpeg(device, seconds=0.5, batch=4, threads=2)
        if not a.skip_ocr:
            res["ocr"] = ocr_first_epoch("smoke", 8, 32, PRESETS["gpu"])
    else:
        res["resnet50"] = resnet50_bf16(device, steps=30, batch=128, side=224)
        res["serving"] = serving_from_jpeg(device, seconds=15, batch=256, threads=min(16, os.cpu_count() or 4))
        if not a.skip_ocr:
            res["ocr"] = ocr_first_epoch("gpu", 1024, 16384, PRESETS["gpu"])
    res["wall_s"] = time.time() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps(res, indent=2, default=str))
    r, s = res["resnet50"], res["serving"]
    print(f"\n| figure | value | ratio |\n|---|---|---|\n"
          f"| ResNet-50 bf16 training images/s ({r['device']}) | {r['bf16_images_per_s']:.0f} | "
          f"{r['bf16_vs_fp32']:.2f} × fp32 |\n"
          f"| serving images/s from JPEG (safety, batch {s['batch']}) | {s['pipeline_images_per_s']:.0f} | "
          f"{s['pipeline_vs_bound']:.2f} of min(decode {s['decode_only_images_per_s']:.0f}, "
          f"model {s['model_only_images_per_s']:.0f}) |")
    if "ocr" in res:
        o = res["ocr"]
        print(f"| mmocr {o['preset']} first epoch det / rec images/s | {o['det']['images_per_s']:.1f} / "
              f"{o['rec']['images_per_s']:.1f} | full gpu preset ≈ {o['full_preset_projected_h']:.1f} h = "
              f"{o['full_preset_vs_one_day']:.2f} day |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
