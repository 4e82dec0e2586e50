"""``make eval-dedupe``: near-duplicate precision and recall on held-out real photos.

The rule's defaults were chosen on the photos of ``dedupe.TUNING_PHOTOS``; the figures reported
are on the other offline photos, with variants drawn from a fresh seed. Smooth synthetic scenes
are measured apart: many of them look alike to both signals.

    python -m train_jobs.eval_dedupe --out runs/eval-dedupe
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np


def _fit(rgb: np.ndarray, side: int = 640) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = min(1.0, side / max(h, w))
    return cv2.resize(rgb, (int(w * s), int(h * s)), interpolation=cv2.INTER_AREA) if s < 1 else rgb


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/eval-dedupe")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--model", default="mobilenet_v2")
    a = p.parse_args(argv)
    from livelens.data.render import procedural_scene
    from livelens.evaluation import real_photos
    from livelens.loop import dedupe
    from livelens.loop.embed import load_embedder

    photos = real_photos()
    embed = load_embedder(a.model)
    held = [_fit(rgb) for name, rgb in photos if name not in dedupe.TUNING_PHOTOS]
    tuning = [_fit(rgb) for name, rgb in photos if name in dedupe.TUNING_PHOTOS]
    scenes = [procedural_scene(640, 360, np.random.default_rng([a.seed, i]))[1] for i in range(40)]
    report = {"rule": dedupe.DedupeRule().__dict__, "model": embed.ref, "seed": a.seed,
              "held_out_photos": dedupe.evaluate(held, embed, seed=a.seed),
              "tuning_photos (chosen on)": dedupe.evaluate(tuning, embed, seed=a.seed),
              "synthetic_scenes": dedupe.evaluate(scenes, embed, seed=a.seed)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
