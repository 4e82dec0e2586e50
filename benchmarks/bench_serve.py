"""Serving overhead: end-to-end HTTP throughput and latency against the raw batched model, same run.

Baseline: the moderation model called in this process on batches of decoded frames (decode
included), i.e. the best the hardware does. Served: ``/v1/moderate`` through the gateway and the
batched moderation replica, both through Serve's proxy and (with direct ingress) straight to the
gateway replica's port, and a third time with the model built inside the gateway replica
(``GatewayArgs.colocate``, path ``colocated_direct``: no gateway→model hop), driven by a lean asyncio HTTP/1.1 load generator on loopback
(``benchmarks.loadgen``). Reported per path: the throughput ratio (goal ≥ 0.85×), latency
percentiles under load, and the per-request overhead at concurrency 1 (client latency minus the
replica's decode and forward pass, as the answer reports them; goal p50 ≤ 3 ms). On a CUDA
machine it also measures safety-classification images/s from JPEG bytes on the GPU.

    python -m benchmarks.bench_serve [--requests 200 --concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.loadgen import Multipart, Response, run_load, start_local_ray
from livelens.imageio import decode_image, encode_jpeg
from serve_apps.common import SERVE_MODES, direct_ingress_url


def _frames(n: int, seed: int = 0) -> list[bytes]:
    """Live-stream-sized JPEG frames (smooth content, like real video, so the codec is realistic)."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 255, (9, 16, 3), dtype=np.uint8)
        out.append(encode_jpeg(cv2.resize(small, (640, 360), interpolation=cv2.INTER_CUBIC), quality=85))
    return out


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def raw_throughput(model: Any, jpegs: list[bytes], batch: int, seconds: float = 10.0) -> float:
    """Images/s of decode + batched classification in this process."""
    done, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        frames = [decode_image(jpegs[(i + k) % len(jpegs)]) for k in range(batch)]
        model.classify(frames)
        done, i = done + batch, i + batch
    return done / (time.perf_counter() - t0)


async def http_load(url: str, key: str, jpegs: list[bytes], n: int, concurrency: int) -> dict[str, Any]:
    """n requests with ``concurrency`` in flight; latencies, status counts and model-side times."""
    lat, model_ms, work_ms, codes, stages = [], [], [], {}, {}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/jpeg"}

    def record(_i: int, r: Response, ms: float) -> None:
        lat.append(ms)
        codes[r.status] = codes.get(r.status, 0) + 1
        if r.status == 200:
            t = json.loads(r.body)["timings_ms"]
            model_ms.append(t.get("moderate.classify", float("nan")))
            # What the raw baseline also does per frame: decode plus the forward pass.
            work_ms.append(t.get("moderate.decode", 0.0) + t.get("moderate.compute", float("nan")))
            for k, v in t.items():
                stages.setdefault(k, []).append(float(v))

    cpu0 = time.process_time()
    wall = await run_load(url, "/v1/moderate", jpegs, n, concurrency, headers, {"evidence": "none"}, record)
    return {"rps": codes.get(200, 0) / wall, "lat": lat, "model_ms": model_ms, "work_ms": work_ms, "codes": codes,
            "stages": stages, "client_cpu_ms": (time.process_time() - cpu0) * 1000 / max(1, n)}


async def http_batch_load(url: str, key: str, jpegs: list[bytes], n: int, per_request: int,
                          concurrency: int) -> dict[str, Any]:
    """n multipart requests of ``per_request`` frames each to ``/v1/moderate/batch``; frames/s answered 200."""
    bodies = []
    for i in range(len(jpegs)):
        mp = Multipart([("files", f"{k}.jpg", jpegs[(i * per_request + k) % len(jpegs)], "image/jpeg")
                        for k in range(per_request)])
        bodies.append(mp.body)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": mp.content_type}
    ok = 0

    def record(_i: int, r: Response, _ms: float) -> None:
        nonlocal ok
        if r.status == 200:
            ok += sum(1 for item in json.loads(r.body)["results"] if item.get("status", 200) == 200)

    wall = await run_load(url, "/v1/moderate/batch", bodies, n, concurrency, headers, {"evidence": "none"}, record)
    return {"ips": ok / wall, "frames_ok": ok}


def gpu_images_per_s(seconds: float = 10.0) -> str | float:
    """Safety classification from JPEG bytes on CUDA (decode on CPU, model on GPU), or why not measured."""
    import torch

    if not torch.cuda.is_available():
        return "not measured (no CUDA device on this machine)"
    from livelens.store import find_in_stores

    found = find_in_stores("safety")
    if found is None:
        return "not measured (no safety model in the stores)"
    from livelens.models import predict
    from livelens.models.io import load_from_store
    from livelens.store import ModelStore

    model = load_from_store(ModelStore(found[0]), found[1]).eval().cuda()
    jpegs = _frames(64)
    import cv2

    batch, done = 64, 0
    torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        arr = np.stack([cv2.resize(decode_image(j), (224, 224)) for j in jpegs[:batch]])
        x = torch.from_numpy(arr).cuda().permute(0, 3, 1, 2).float().div_(255)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            predict(model, x)
        torch.cuda.synchronize()
        done += batch
    return round(done / (time.perf_counter() - t0), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0, help="per raw round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--serve-mode", choices=sorted(SERVE_MODES), default="throughput",
                   help="Ray Serve runtime flags (serve_apps.common.SERVE_MODES); `make run` uses throughput")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "token"
    # Read by every Serve process at import, so it must be in the environment the raylet inherits.
    os.environ.update(SERVE_MODES[a.serve_mode])
    jpegs = _frames(32)

    from livelens.moderation import ModerationEngine

    margs = {"live": {"max_batch_size": a.batch, "cam_labels": 0}}
    # The raw baseline is the engine the deployment runs, called in-process on whole batches.
    raw_model = ModerationEngine()
    raw_model.classify([decode_image(jpegs[0])])  # warm-up (lazy init, allocator)

    import ray
    from ray import serve

    from serve_apps.gateway import build_app

    key, key_file, port = start_local_ray()
    raw_runs: list[float] = []
    paths: dict[str, dict[str, Any]] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"gateway": {"key_file": key_file},
                         "moderation": {**margs, "deploy": {"num_cpus": 0.5, "max_ongoing_requests": 32,
                                                            "max_queued_requests": 1000}},
                         "ocr": None, "quality": None, "streams": None})
        serve.run(app, name="bench", route_prefix="/")
        # The same model built inside the gateway replica (GatewayArgs.colocate): no gateway→model hop.
        colo = build_app({"gateway": {"key_file": key_file, "colocate": ["moderate"]},
                          "moderation": {**margs, "deploy": {"num_cpus": 0.5}},
                          "ocr": None, "quality": None, "streams": None})
        serve.run(colo, name="bench_colo", route_prefix="/colo")
        # The first app again with metrics and the access log off: the telemetry's cost, same run.
        quiet = build_app({"gateway": {"key_file": key_file, "metrics": False, "access_log_level": "OFF"},
                           "moderation": {**margs, "deploy": {"num_cpus": 0.5, "max_ongoing_requests": 32,
                                                              "max_queued_requests": 1000}},
                           "ocr": None, "quality": None, "streams": None})
        serve.run(quiet, name="bench_quiet", route_prefix="/quiet")
        # The first app again with traffic capture sampling every frame (random_share=1, the worst
        # case): what capture costs a request, same run.
        capture_dir = Path("runs/bench_capture")
        shutil.rmtree(capture_dir, ignore_errors=True)
        captured = build_app({"gateway": {"key_file": key_file, "live": {"capture": {
                                  "enabled": True, "keys": ["bench"], "uri": str(capture_dir), "random_share": 1.0,
                                  "max_rows": 5000}}},
                              "moderation": {**margs, "deploy": {"num_cpus": 0.5, "max_ongoing_requests": 32,
                                                                 "max_queued_requests": 1000}},
                              "ocr": None, "quality": None, "streams": None})
        serve.run(captured, name="bench_capture", route_prefix="/capture")
        # Through Serve's proxy, and (with direct ingress) straight to the gateway replica's port.
        urls = {"proxy": f"http://127.0.0.1:{port}"}
        direct = direct_ingress_url("bench", "127.0.0.1")
        if direct:
            urls["direct"] = direct
        colo_direct = direct_ingress_url("bench_colo", "127.0.0.1")
        urls["colocated_" + ("direct" if colo_direct else "proxy")] = colo_direct or f"http://127.0.0.1:{port}/colo"
        quiet_direct = direct_ingress_url("bench_quiet", "127.0.0.1")
        urls["metrics_off_" + ("direct" if quiet_direct else "proxy")] = quiet_direct or f"http://127.0.0.1:{port}/quiet"
        capture_direct = direct_ingress_url("bench_capture", "127.0.0.1")
        urls["capture_" + ("direct" if capture_direct else "proxy")] = (
            capture_direct or f"http://127.0.0.1:{port}/capture")
        for url in urls.values():
            asyncio.run(http_load(url, key, jpegs, 16, 4))  # warm-up
        for name, url in urls.items():
            paths[name] = {"url": url, "single": asyncio.run(http_load(url, key, jpegs, 40, 1)), "runs": [],
                           "batch_runs": [], "lat": [], "codes": {}, "client_cpu": []}
        # Interleaved rounds, medians reported: on a shared machine the load drifts over minutes, and
        # back-to-back phases would compare two different machines.
        for _ in range(a.rounds):
            raw_runs.append(raw_throughput(raw_model, jpegs, a.batch, a.seconds))
            for url_name, url in urls.items():
                acc = paths[url_name]
                res = asyncio.run(http_load(url, key, jpegs, a.requests, a.concurrency))
                acc["runs"].append(res["rps"])
                acc["client_cpu"].append(res["client_cpu_ms"])
                acc["lat"] += res["lat"]
                for c, n in res["codes"].items():
                    acc["codes"][c] = acc["codes"].get(c, 0) + n
                # The same frames as /batch requests of 8: one HTTP round trip and one fan-out per 8.
                bres = asyncio.run(http_batch_load(url, key, jpegs, max(2, a.requests // 8), 8,
                                                   max(1, a.concurrency // 8)))
                acc["batch_runs"].append(bres["ips"])
    finally:
        serve.shutdown()
        ray.shutdown()
    raw_ips = statistics.median(raw_runs)
    result: dict[str, Any] = {
        "device": "cpu", "cpu_count": os.cpu_count(), "serve_mode": a.serve_mode, "batch": a.batch,
        "concurrency": a.concurrency, "rounds": a.rounds,
        "raw_images_per_s": round(raw_ips, 2),
        "raw_runs": [round(x, 2) for x in raw_runs],
    }
    for name, acc in paths.items():
        single = acc["single"]
        # Overhead = client latency minus the work the raw baseline also does (decode + forward pass),
        # so the batch wait, queueing, hops and JSON all count. The older figure subtracted the whole
        # classify stage, which hid the batch wait; it is kept for comparison.
        overhead = [lt - w for lt, w in zip(single["lat"], single["work_ms"], strict=False) if w == w]
        overhead_old = [lt - m for lt, m in zip(single["lat"], single["model_ms"], strict=False) if m == m]
        result[name] = {
            "url": acc["url"],
            "http_runs": [round(x, 2) for x in acc["runs"]],
            "http_images_per_s": round(statistics.median(acc["runs"]), 2),
            "throughput_ratio_vs_raw": round(statistics.median(acc["runs"]) / raw_ips, 3),
            "batch_route_runs": [round(x, 2) for x in acc["batch_runs"]],
            "batch_route_ratio_vs_raw": round(statistics.median(acc["batch_runs"]) / raw_ips, 3),
            "latency_ms_under_load": {q: round(_pct(acc["lat"], q), 1) for q in (50, 90, 95, 99)},
            "status_codes": acc["codes"],
            # The load generator shares the 2 cores with the server; its own CPU per request, for scale.
            "loadgen_cpu_ms_per_request": round(statistics.median(acc["client_cpu"]), 2),
            "overhead_ms_c1": {"p50": round(statistics.median(overhead), 2) if overhead else None,
                               "p90": round(_pct(overhead, 90), 2)},
            "latency_minus_classify_ms_c1_p50": round(statistics.median(overhead_old), 2) if overhead_old else None,
            "latency_ms_c1_p50": round(_pct(single["lat"], 50), 1),
            # Where the c=1 time goes, as the service itself reports it (server-side stages, medians).
            "server_stages_ms_c1_p50": {k: round(statistics.median(v), 2) for k, v in single["stages"].items()},
        }
    on, off = ("direct", "metrics_off_direct") if "metrics_off_direct" in result else ("proxy", "metrics_off_proxy")
    # Metrics + access log on (the default) against off, same path, same rounds; goal ≥ 0.98.
    result["metrics_throughput_ratio_on_vs_off"] = round(
        result[on]["http_images_per_s"] / max(result[off]["http_images_per_s"], 1e-9), 3)
    cap = "capture_direct" if "capture_direct" in result else "capture_proxy"
    # Capture on (every frame sampled) against off, same path: the per-request cost, p50 at c=1.
    result["capture_overhead_ms_c1_p50"] = round(
        result[cap]["overhead_ms_c1"]["p50"] - result[on]["overhead_ms_c1"]["p50"], 3)
    result["capture_stage_ms_c1_p50"] = result[cap]["server_stages_ms_c1_p50"].get("capture")
    result["capture_throughput_ratio_on_vs_off"] = round(
        result[cap]["http_images_per_s"] / max(result[on]["http_images_per_s"], 1e-9), 3)
    result["gpu_safety_images_per_s"] = gpu_images_per_s()
    result["goals"] = {"throughput_ratio": ">= 0.85", "overhead_p50_ms": "<= 3", "metrics_throughput_ratio": ">= 0.98",
                       "capture_overhead_p50_ms": "<= 0.5"}
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
