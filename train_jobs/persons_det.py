"""``make train-persons``: train the persons-stage detector (mmdet RTMDet on MobileNetV2) with Ray Train.

It finds faces and the overlays the frame generator draws (QR codes, logos and watermarks,
picture-in-picture windows, text overlays, HUD panels) on generated frames with real faces
pasted in (:mod:`livelens.persons.detdata`). Presets (flags override any field):

* ``cpu`` (default): what fits 2 CPU cores in about 20 minutes (a 15-minute step budget).
* ``smoke``: a few batches, to check that the job runs end to end (the test suite).
* ``gpu``: more frames, larger input, longer::

    python -m train_jobs.persons_det --preset gpu

The weights go to the model store as ``persons_det`` with a card (config, classes, input size,
held-out COCO mAP); ``/v1/persons`` serves it with ``persons.live.detector: persons_det``, and
``python -m livelens.persons.evaluate --detectors persons_det,mtcnn,haar`` measures its face
recall on the real held-out photos. Rerunning with the same ``--run-name`` resumes.
"""

from __future__ import annotations

import argparse
import json

from livelens.cli_config import apply_flat, config_from_args, config_parser
from livelens.persons.train import DetTrainConfig, run

PRESETS: dict[str, dict] = {
    "cpu": dict(samples=3000, epochs=30, max_minutes=15, batch_size=8, lr=1e-3, warmup_steps=30, eval_samples=150),
    "smoke": dict(samples=8, epochs=1, batch_size=4, size=256, warmup_steps=1, eval_samples=4),
    "gpu": dict(samples=40000, epochs=40, batch_size=32, size=640, eval_samples=500, use_gpu=True),
}


def preset_config(preset: str) -> DetTrainConfig:
    """The preset's config."""
    return apply_flat(DetTrainConfig(), PRESETS[preset])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    config_parser(DetTrainConfig, parser=p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = run(config_from_args(preset_config(a.preset), a))
    print(json.dumps({"ref": out["ref"], "metrics": out["metrics"]}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
