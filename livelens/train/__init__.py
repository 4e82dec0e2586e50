"""Generic Ray Train utilities shared by the training jobs (safety, quality, OCR).

- :mod:`livelens.train.loop`: :class:`LoopConfig` and :func:`fit` (per-worker loop: DDP, AMP,
  comm hooks, a checkpoint every epoch, resume, failure injection).
- :mod:`livelens.train.ddp`: comm hooks (fp16, PowerSGD), autocast/GradScaler, byte counting.
- :mod:`livelens.train.metrics`: per-label P/R/F1/AUC/accuracy and a confusion-matrix PNG.
- :mod:`livelens.train.targets`: per-head targets from manifest labels via the taxonomy.
- :mod:`livelens.train.driver`: RunConfig on a path/URI, live progress, checkpoint reading.
"""

from livelens.train.loop import FitState, LoopConfig, fit, train_one_epoch

__all__ = ["FitState", "LoopConfig", "fit", "train_one_epoch"]
