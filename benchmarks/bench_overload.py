"""Overload with a deadline: /v1/analyze flooded past capacity, admission off and on, in one run.

One app (moderation, OCR and quality behind the gateway) on a local Ray. Phase ``off`` has no
deadlines: every request queues. Phase ``on`` sets the analyze deadline in the
gateway's live config (reconfigured in place) and floods again. For each phase: answers by status, the
latency of the 200s (p50/p99, which should stay within the deadline) and of the 503s (which should
be fast), and answers per second.

    python -m benchmarks.bench_overload [--requests 160] [--concurrency 32] [--deadline 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.loadgen import run_load, start_local_ray


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 1) if xs else None


async def flood(url: str, key: str, bodies: list[bytes], n: int, concurrency: int) -> dict[str, Any]:
    lat: dict[int, list[float]] = {}

    def record(_i: int, r: Any, ms: float) -> None:
        lat.setdefault(r.status, []).append(ms)

    wall = await run_load(url, "/v1/analyze", bodies, n, concurrency,
                          {"authorization": f"Bearer {key}", "content-type": "image/jpeg"},
                          {"evidence": "none"}, record)
    return {"codes": {str(c): len(v) for c, v in sorted(lat.items())}, "wall_s": round(wall, 1),
            "answers_per_s": round(n / wall, 2),
            "ok_ms": {"p50": _pct(lat.get(200, []), 50), "p99": _pct(lat.get(200, []), 99),
                      "max": _pct(lat.get(200, []), 100)},
            "rejected_ms": {"p50": _pct(lat.get(503, []), 50), "p99": _pct(lat.get(503, []), 99)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--deadline", type=float, default=4.0, help="analyze deadline (s) in phase 'on'")
    p.add_argument("--out", default="runs/bench/overload.json")
    a = p.parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "token"
    from serve_apps.common import SERVE_MODES

    os.environ.update(SERVE_MODES["throughput"])

    import ray
    from ray import serve

    from livelens.data.frames import FrameConfig, generate_slot
    from serve_apps.gateway import build_app

    cfg = FrameConfig(p_negative=0.3, p_ads=0.5, p_game=0.2, p_black=0, p_frozen=0)
    bodies = [generate_slot(5, s, cfg)[0]["image_bytes"] for s in range(24)]
    key, key_file, port = start_local_ray()
    result: dict[str, Any] = {"requests": a.requests, "concurrency": a.concurrency, "deadline_s": a.deadline,
                              "cpu_count": os.cpu_count()}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})

        def deploy(deadlines: dict[str, float]) -> None:
            # Only the gateway's user_config differs between the two: Serve reconfigures it in place.
            serve.run(build_app({"gateway": {"key_file": key_file, "live": {"deadlines_s": deadlines}},
                                 "streams": None}), name="livelens", route_prefix="/")

        deploy({})
        url = f"http://127.0.0.1:{port}"
        asyncio.run(flood(url, key, bodies, 8, 2))  # warm-up: lazy models, allocators
        result["off"] = asyncio.run(flood(url, key, bodies, a.requests, a.concurrency))
        deploy({"analyze": a.deadline})
        asyncio.run(flood(url, key, bodies, 8, 2))  # the new replica's first completions (its estimate)
        result["on"] = asyncio.run(flood(url, key, bodies, a.requests, a.concurrency))
    finally:
        serve.shutdown()
        ray.shutdown()
    on_ok = result["on"]["ok_ms"]["p99"]
    result["on_ok_p99_within_deadline"] = on_ok is not None and on_ok <= a.deadline * 1000
    text = json.dumps(result, indent=2)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
