"""Memory per deployment of the service ``make run`` starts, idle and after large images.

Deploys the same Serve config as ``python -m serve_apps`` (the shipped file, the default layout),
then reads RSS and USS (memory only that process holds), open files and threads of every Serve
process, and which heavy stacks (torch, OpenCV, onnxruntime, mmcv…) each one has mapped:

1. when every deployment is running;
2. after warm traffic: each image route, sizes from thumbnails to a 24 MP photo.

The baseline is the idle figure of the same run; growth is "after / idle". A stack mapped by a
process whose deployment never uses it is memory to cut. The service is deployed twice in the run,
with heap trimming off and then on (``livelens.serving.heap``), and the RSS after load of the two
is the before/after of that cut.

    python -m benchmarks.bench_memory [--layout colocated|composed] [--out runs/bench/memory.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from livelens.serving.heap import DEFAULT_INTERVAL_S as DEFAULT_TRIM_S
from livelens.serving.heap import ENV_INTERVAL


def _jpeg(h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    # Smooth content (a gradient plus noise) compresses like a photo, unlike pure noise.
    img = np.clip(np.linspace(0, 255, w)[None, :, None] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", default="colocated")
    p.add_argument("--out", default="runs/bench/memory.json")
    p.add_argument("--trim-s", type=float, default=DEFAULT_TRIM_S,
                   help="the heap-trim interval of the second deployment (the first one trims nothing)")
    a = p.parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "token"
    from serve_apps.common import SERVE_MODES

    os.environ.update(SERVE_MODES["throughput"])
    import httpx
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    from benchmarks.loadgen import start_local_ray
    from benchmarks.procstats import as_rows, format_table, serve_process_stats, stacks_by_role
    from serve_apps.__main__ import _parse, app_args, serve_schema

    key, key_file, port = start_local_ray()
    opts = _parse(["--port", str(port), "--key-file", key_file, "--layout", a.layout, "--no-build"])
    result: dict = {"layout": a.layout, "runs": {}}
    url = f"http://127.0.0.1:{port}"
    headers = {"authorization": f"Bearer {key}", "content-type": "image/jpeg"}
    sizes = [(120, 160), (720, 1280), (1080, 1920), (3000, 4000), (4000, 6000)]
    job_env = dict(ray.get_runtime_context().runtime_env.get("env_vars") or {})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # The same service twice in one run: heap trimming off (the baseline), then on.
        for name, interval in (("trim off", "0"), ("trim on", str(a.trim_s))):
            schema = serve_schema(opts, app_args(opts))
            schema.applications[0].runtime_env = {"env_vars": {**job_env, ENV_INTERVAL: interval}}
            _get_global_client().deploy_apps(schema)
            deadline = time.time() + 600
            while (st := serve.status().applications.get("livelens")) is None or st.status != "RUNNING":
                if time.time() > deadline or (st is not None and st.status in ("DEPLOY_FAILED", "UNHEALTHY")):
                    raise SystemExit(f"app did not start: {st}")
                time.sleep(2)
            time.sleep(5)  # let start-up allocations settle before the baseline
            idle = serve_process_stats("livelens", uss=True)
            codes: dict[int, int] = {}
            for route in ("/v1/moderate", "/v1/quality", "/v1/ocr", "/v1/analyze"):
                for i, (h, w) in enumerate(sizes):
                    r = httpx.post(url + route, content=_jpeg(h, w, i), headers=headers, timeout=300,
                                   params={"evidence": "none"})
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
            # Both runs wait the same two trim intervals after the load, so only trimming differs.
            time.sleep(2 * a.trim_s + 2)
            warm = serve_process_stats("livelens", uss=True)
            result["runs"][name] = {"codes": codes, "idle": as_rows(idle), "after_large_images": as_rows(warm),
                                    "stacks": stacks_by_role("livelens")}
            print(f"[{name}] layout {a.layout}; answers {codes}")
            print("idle (all deployments running):")
            print(format_table(idle))
            print("after every route with images up to 24 MP:")
            print(format_table(warm))
            total_idle = sum(s.rss_mb for s in idle.values())
            total_warm = sum(s.rss_mb for s in warm.values())
            result["runs"][name]["rss_total_mb"] = {"idle": total_idle, "after": total_warm}
            print(f"RSS total {total_warm:.0f} MB after load vs {total_idle:.0f} MB idle: {total_warm / total_idle:.2f}x")
            for role, stacks in result["runs"][name]["stacks"].items():
                print(f"  {role:34s} maps {', '.join(stacks) or '-'}")
            serve.delete("livelens")
    finally:
        serve.shutdown()
        ray.shutdown()
    off, on = (result["runs"][k]["rss_total_mb"]["after"] for k in ("trim off", "trim on"))
    result["trim_ratio"] = on / off
    print(f"RSS after load, trim on / trim off (same run): {on:.0f} / {off:.0f} MB = {on / off:.2f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
