"""``make train-ocr``: train the mmocr detector (DBNet) and recogniser (CRNN) with Ray Train.

The default is a small CPU run (a few minutes): generated scene text, a few epochs. The
weights go to the model store as ``ocr_det_dbnet_resnet18_fpnc`` / ``ocr_rec_crnn_minivgg``
with model cards. A longer run on a GPU::

    python -m train_jobs.ocr --gpu --epochs 40 --max-samples 20000 --det-size 640
"""

from __future__ import annotations

import argparse
import json

from livelens.ocr.train import OcrTrainConfig, run


def parse_args(argv: list[str] | None = None) -> tuple[list[str], argparse.Namespace]:
    """Flags; returns the tasks to run and the parsed namespace."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["det", "rec", "both"], default="both")
    p.add_argument("--epochs", type=int, default=None, help="default: 2")
    p.add_argument("--max-samples", type=int, default=None, help="default: 256 (rec), 24 (det)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--det-size", type=int, default=320)
    p.add_argument("--rec-model", default="crnn_minivgg", choices=["crnn_minivgg", "svtr_tiny"])
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--store", default="runs/model_store")
    args = p.parse_args(argv)
    return (["det", "rec"] if args.task == "both" else [args.task]), args


def main(argv: list[str] | None = None) -> int:
    tasks, a = parse_args(argv)
    small = {"det": dict(epochs=2, max_samples=24, generate=24, batch_size=4, lr=1e-3),
             "rec": dict(epochs=2, max_samples=256, generate=256, batch_size=32, lr=1e-3)}
    for task in tasks:
        kw = dict(small[task])
        for key, val in (("epochs", a.epochs), ("max_samples", a.max_samples), ("batch_size", a.batch_size)):
            if val is not None:
                kw[key] = val
        kw["generate"] = kw["max_samples"]
        cfg = OcrTrainConfig(task=task, model="" if task == "det" else a.rec_model, det_size=a.det_size,
                             num_workers=a.num_workers, use_gpu=a.gpu, store=a.store, **kw)
        out = run(cfg)
        print(json.dumps({"task": task, "ref": out["ref"], "metrics": out["metrics"]}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
