"""Generator throughput in images per second per core.

    python -m benchmarks.bench_generators [--n 40] [--json]

Each generator runs serially in this process and is timed in CPU seconds (so the figure is
per core and does not depend on what else runs on the machine). The baseline, measured in
the same run, is the cheapest possible "generator": JPEG-encoding one random frame of the
same size and hashing it, i.e. the storage cost every generator pays. Each figure is also
given as a ratio to that baseline (how many baseline-equivalents one generated image costs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable

import numpy as np

from livelens.data import frames as fr
from livelens.data import quality as qu
from livelens.data import text as tx
from livelens.data.render import encode_jpeg_bytes


def _cpu_rate(fn: Callable[[], int]) -> float:
    """Images per CPU second of ``fn`` (which returns how many images it made)."""
    t0 = time.process_time()
    n = fn()
    return n / max(time.process_time() - t0, 1e-9)


def run(n: int = 40, seed: int = 0) -> dict:
    """Measure every generator; returns a result dict (rates in images per CPU second)."""
    cfg = fr.FrameConfig()
    # Warm caches (fonts, photos) so the timing is steady-state generation.
    fr.generate_frames(0, 3, seed, cfg)
    tx.generate_text_lines(0, 3, seed)
    tx.generate_text_det(0, 1, seed)
    qu.generate_quality(0, 3, seed)

    rng = np.random.default_rng(seed)
    frames_raw = [rng.integers(0, 256, (cfg.height, cfg.width, 3), dtype=np.uint8) for _ in range(4)]

    def baseline() -> int:
        for i in range(n):
            hashlib.sha256(encode_jpeg_bytes(frames_raw[i % 4], cfg.jpeg_quality)).hexdigest()
        return n

    base = _cpu_rate(baseline)
    rates = {
        f"frames_{cfg.width}x{cfg.height}": _cpu_rate(lambda: len(fr.generate_frames(100, n, seed, cfg))),
        "frames_1280x720": _cpu_rate(
            lambda: len(fr.generate_frames(100, n // 2, seed, fr.FrameConfig(width=1280, height=720)))),
        "text_lines": _cpu_rate(lambda: len(tx.generate_text_lines(100, n * 5, seed))),
        "text_det_960x540": _cpu_rate(lambda: len(tx.generate_text_det(100, max(4, n // 4), seed))),
        "quality_384": _cpu_rate(lambda: len(qu.generate_quality(100, n * 2, seed))),
    }
    return {
        "unit": "images per CPU second (per core)",
        "baseline": {"name": f"jpeg_encode+sha256 random {cfg.width}x{cfg.height}", "rate": round(base, 1)},
        "generators": {k: {"rate": round(v, 1), "ratio_to_baseline": round(v / base, 3)} for k, v in rates.items()},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    a = p.parse_args(argv)
    res = run(a.n)
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"| generator | {res['unit']} | ratio to baseline ({res['baseline']['name']}: "
          f"{res['baseline']['rate']}/s) |\n|---|---|---|")
    for name, v in res["generators"].items():
        print(f"| {name} | {v['rate']} | {v['ratio_to_baseline']} |")


if __name__ == "__main__":
    main()
