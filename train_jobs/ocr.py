"""``make train-ocr``: train the mmocr detector (DBNet) and recogniser (CRNN) with Ray Train.

Presets (flags override any field):

* ``cpu`` (default, ``make train-ocr``): what converges on 2 CPU cores in about 40 minutes.
  DBNet on an ImageNet MobileNetV2 (15 min) and a narrow-ResNet CRNN (25 min), on scene text
  generated in memory, each scored on held-out generated samples at the end.
* ``smoke``: a few batches, to check that the job runs end to end (the test suite).
* ``gpu``: mmocr's own DBNet ResNet-18 and CRNN mini-VGG, longer, on a GPU::

    python -m train_jobs.ocr --preset gpu

The weights go to the model store as ``ocr_det_<config>`` / ``ocr_rec_<config>`` with model
cards; ``make eval-ocr`` picks the newest of each. Every field of ``OcrTrainConfig`` (and of its
``loop``) is a flag; rerunning with the same ``--run-name`` resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json

from livelens.cli_config import apply_flat, config_from_args, config_parser
from livelens.ocr.train import OcrTrainConfig, run

#: Per preset and task, the settings that differ from ``OcrTrainConfig``'s defaults (flat names, as flags).
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


def preset_config(preset: str, task: str) -> OcrTrainConfig:
    """The preset's config for ``task``."""
    return apply_flat(OcrTrainConfig(task=task), PRESETS[preset][task])


def parse_args(argv: list[str] | None = None) -> tuple[list[str], argparse.Namespace]:
    """Flags; returns the tasks to run and the parsed namespace."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["det", "rec", "both"], default="both")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    config_parser(OcrTrainConfig, parser=p, exclude=("task",))
    args = p.parse_args(argv)
    if getattr(args, "cfg:model", None) and args.task == "both":
        p.error("--model names one config: use it with --task det or --task rec")
    return (["det", "rec"] if args.task == "both" else [args.task]), args


def task_config(task: str, a: argparse.Namespace) -> OcrTrainConfig:
    """The preset for ``task`` with the flags that were given laid over it (``--max-samples`` also sets ``generate``)."""
    cfg = config_from_args(preset_config(a.preset, task), a)
    if hasattr(a, "cfg:max_samples") and not hasattr(a, "cfg:generate"):
        cfg = apply_flat(cfg, {"generate": cfg.max_samples})
    return cfg


def main(argv: list[str] | None = None) -> int:
    tasks, a = parse_args(argv)
    for task in tasks:
        out = run(task_config(task, a))
        print(json.dumps({"task": task, "ref": out["ref"], "metrics": out["metrics"]}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
