"""``make data``: build the default training and evaluation sets under ``runs/data``.

    python -m livelens.data.build --out runs/data [--frames 2400] [--only frames,quality]

Each set is generated in parallel as Ray tasks (a local Ray is started if none is running)
and written as a manifest directory (Parquet + card + contact sheet). The real sets of
../shared/data are imported too when present (``runs/data/real/<name>``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from livelens.data import frames as fr
from livelens.data import quality as qu
from livelens.data import text as tx
from livelens.data.manifest import write_manifest
from livelens.data.parallel import run_generator
from livelens.errors import ConfigError

SETS = ("frames", "text_lines", "text_det", "quality", "real")


@dataclass
class BuildArgs:
    """What ``make data`` builds (defaults sized to finish in < 10 min on 2 cores)."""

    out: Path = Path("runs/data")
    seed: int = 0
    frames: int = 2500
    text_lines: int = 5000
    text_det: int = 300
    quality: int = 4000
    width: int = 960
    height: int = 540
    only: tuple[str, ...] = SETS
    num_cpus: int | None = None


def parse_args(argv: list[str] | None = None) -> BuildArgs:
    p = argparse.ArgumentParser(prog="python -m livelens.data.build", description=__doc__.splitlines()[0])
    d = BuildArgs()
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--frames", type=int, default=d.frames, help="frame slots (frozen slots give 3-5 rows)")
    p.add_argument("--text-lines", type=int, default=d.text_lines)
    p.add_argument("--text-det", type=int, default=d.text_det)
    p.add_argument("--quality", type=int, default=d.quality)
    p.add_argument("--width", type=int, default=d.width, help="landscape frame width (portrait swaps)")
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--only", default=",".join(SETS), help=f"comma-separated subset of {','.join(SETS)}")
    p.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs (default: all cores)")
    a = p.parse_args(argv)
    only = tuple(s.strip() for s in a.only.split(",") if s.strip())
    bad = [s for s in only if s not in SETS]
    if bad:
        raise ConfigError(f"--only: unknown sets {bad}; choose from {SETS}")
    for name in ("frames", "text_lines", "text_det", "quality", "width", "height"):
        if getattr(a, name) < 0 or (name in ("width", "height") and getattr(a, name) < 64):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive (≥64 for sizes), got {getattr(a, name)}")
    return BuildArgs(a.out, a.seed, a.frames, a.text_lines, a.text_det, a.quality, a.width, a.height, only, a.num_cpus)


def _init_ray(num_cpus: int | None) -> bool:
    """Start a local Ray if none is running; returns True if we started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    # RAY_AUTH_MODE is deliberately not set here: Ray reads it when it is imported, and setting it
    # afterwards leaves the driver in 'disabled' mode while the GCS it spawns demands a token.
    # A new local ray.init() turns token auth on by itself (and writes ~/.ray/auth_token).
    for attempt in (1, 2):
        try:
            ray.init(
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=False,
                object_store_memory=768 * 1024 * 1024,
                log_to_driver=False,
                # No working_dir: livelens is installed (editable) in the venv, so workers import it;
                # uploading the repo would also ship datasets/, runs/ and .venv.
            )
            return True
        except Exception as exc:  # Ray start-up fails with bare Exception/RuntimeError on an overloaded host
            ray.shutdown()
            print(f"[data] Ray failed to start (attempt {attempt}): {exc}", file=sys.stderr, flush=True)
    # The generators are pure functions of (seed, slot): serial output is byte-identical, only slower.
    print("[data] continuing without Ray: generating serially in this process", file=sys.stderr, flush=True)
    return False


def build(args: BuildArgs) -> dict:
    """Generate and write every requested set; returns a summary (counts and seconds per set)."""
    summary: dict = {}
    args.out.mkdir(parents=True, exist_ok=True)

    def timed(name: str, make):
        t0 = time.perf_counter()
        rows, card = make()
        path = write_manifest(rows, args.out / name, card)
        dt = time.perf_counter() - t0
        summary[name] = {"rows": len(rows), "seconds": round(dt, 1), "path": str(path)}
        print(f"[data] {name}: {len(rows)} rows in {dt:.1f} s -> {path}", flush=True)

    if "frames" in args.only and args.frames:
        cfg = fr.FrameConfig(width=args.width, height=args.height)
        timed("frames", lambda: (run_generator(fr.generate_frames, args.frames, args.seed, cfg, chunk=25, desc="frames"),
                                 fr.frames_card(args.seed, args.frames, cfg)))
    if "text_lines" in args.only and args.text_lines:
        cfg_t = tx.TextConfig()
        timed("text_lines", lambda: (
            run_generator(tx.generate_text_lines, args.text_lines, args.seed, cfg_t, chunk=250, desc="text_lines"),
            {"name": "text_lines", "generator": "livelens.data.text.generate_text_lines", "seed": args.seed,
             "config": cfg_t.__dict__, "dictionary": "livelens/resources/dict_zh_en.txt",
             "notes": "One text line per image (height 48); the label is texts[0].text. attributes.hard marks "
                      "low-contrast/blurred/noisy lines."}))
    if "text_det" in args.only and args.text_det:
        timed("text_det", lambda: (
            run_generator(tx.generate_text_det, args.text_det, args.seed, args.width, args.height, chunk=20,
                          desc="text_det"),
            {"name": "text_det", "generator": "livelens.data.text.generate_text_det", "seed": args.seed,
             "notes": "Polygons follow the ink: 4 points for straight/rotated, 2x(n+1) for curved. "
                      "attributes.styles lists each instance's style in order."}))
    if "quality" in args.only and args.quality:
        cfg_q = qu.QualityConfig()
        timed("quality", lambda: (
            run_generator(qu.generate_quality, args.quality, args.seed, cfg_q, chunk=100, desc="quality"),
            {"name": "quality", "generator": "livelens.data.quality.generate_quality", "seed": args.seed,
             "config": cfg_q.__dict__, "score": "100 - 100 * weight[type] * (level / 5) ** 1.2",
             "weights": {k: v[1] for k, v in qu.DISTORTIONS.items()},
             "notes": "Split by source photo (attributes.photo): val/test photos never appear in train."}))
    if "real" in args.only:
        from livelens.data import importers
        from livelens.data.render import shared_data_dir

        root = shared_data_dir()
        if root is None:
            print("[data] ../shared/data not found: skipping the real-set imports", flush=True)
        else:
            for name, (rows, card) in importers.import_shared(root).items():
                timed(f"real/{name}", lambda rows=rows, card=card: (rows, card))
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    started = _init_ray(args.num_cpus)
    try:
        summary = build(args)
    finally:
        if started:
            import ray

            ray.shutdown()
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
