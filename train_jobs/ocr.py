"""``make train-ocr``: train the mmocr detector (DBNet) and recogniser (CRNN) with Ray Train.

Presets (flags override any field):

* ``cpu`` (default, ``make train-ocr``): what converges on 2 CPU cores in about 40 minutes.
  DBNet on an ImageNet MobileNetV2 (15 min) and a narrow-ResNet CRNN (25 min), on scene text
  generated in memory, each scored on held-out generated samples at the end.
* ``smoke``: a few batches, to check that the job runs end to end (the test suite).
* ``gpu``: mmocr's own DBNet ResNet-18 and CRNN mini-VGG, longer, on a GPU::

    python -m train_jobs.ocr --preset gpu

The weights go to the model store as ``ocr_det_<config>`` / ``ocr_rec_<config>`` with model
cards; ``make eval-ocr`` picks the newest of each.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from livelens.ocr.train import OcrTrainConfig, run

PRESETS: dict[str, dict[str, dict]] = {
    "cpu": {
        "det": dict(model="dbnet_mobilenetv2_fpnc", source="generate", generate=3000, max_samples=3000, epochs=30,
                    max_minutes=15, batch_size=8, lr=1e-3, warmup_steps=30, det_size=320, eval_samples=60),
        "rec": dict(model="crnn_resnet_small", source="generate", generate=40000, max_samples=40000, epochs=30,
                    max_minutes=25, batch_size=32, lr=1e-3, warmup_steps=100, eval_samples=400),
    },
    "smoke": {
        "det": dict(model="dbnet_mobilenetv2_fpnc", source="generate", generate=8, max_samples=8, epochs=1,
                    batch_size=4, det_size=128, warmup_steps=1, eval_samples=2),
        "rec": dict(model="crnn_resnet_small", source="generate", generate=32, max_samples=32, epochs=1,
                    batch_size=16, warmup_steps=1, eval_samples=8),
    },
    "gpu": {
        "det": dict(model="dbnet_resnet18_fpnc", source="generate", generate=20000, max_samples=20000, epochs=40,
                    batch_size=16, det_size=640, eval_samples=200, use_gpu=True),
        "rec": dict(model="crnn_minivgg", source="generate", generate=200000, max_samples=200000, epochs=20,
                    batch_size=256, eval_samples=1000, use_gpu=True),
    },
}
_FIELDS = {f.name: f.type for f in fields(OcrTrainConfig)}


def parse_args(argv: list[str] | None = None) -> tuple[list[str], argparse.Namespace]:
    """Flags; returns the tasks to run and the parsed namespace."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["det", "rec", "both"], default="both")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--model", default=None, help="mm_configs name (per task, so only with --task det|rec)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None, help="training-loop budget per task (0 = none)")
    p.add_argument("--max-samples", type=int, default=None, help="also the number generated")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--det-size", type=int, default=None)
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--source", choices=["auto", "manifest", "generate"], default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--gpu", action="store_true", default=None, dest="use_gpu")
    p.add_argument("--store", default=None)
    args = p.parse_args(argv)
    if args.model and args.task == "both":
        p.error("--model names one config: use it with --task det or --task rec")
    return (["det", "rec"] if args.task == "both" else [args.task]), args


def task_config(task: str, a: argparse.Namespace) -> OcrTrainConfig:
    """The preset for ``task`` with the flags that were given laid over it."""
    kw = dict(PRESETS[a.preset][task])
    for key in _FIELDS.keys() - {"task"}:
        val = getattr(a, key, None)
        if val is not None:
            kw[key] = val
    if a.max_samples is not None:
        kw["generate"] = a.max_samples
    return OcrTrainConfig(task=task, **kw)


def main(argv: list[str] | None = None) -> int:
    tasks, a = parse_args(argv)
    for task in tasks:
        out = run(task_config(task, a))
        print(json.dumps({"task": task, "ref": out["ref"], "metrics": out["metrics"]}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
