"""Training of the text-region classifier (:mod:`livelens.evidence.regions`) on generated frames.

The proposals are the text detector's own boxes, not the generator's ground-truth boxes, so the
head learns from exactly what serving gives it (a detector box covers a logo's name, not its
icon; a banner's line, not its strip). A box whose centre lies inside an ad overlay takes that
overlay's label; one inside no ad overlay is a negative (HUD text, scene text, decoys); one
inside an ad overlay that a text box cannot stand for (a QR code, a picture-in-picture) is left
out. The backbone is frozen, so its features are computed once per box and the head is fitted
on them in seconds; per-label thresholds are then chosen on the validation split, and the test
split is only ever used for the reported figures.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from livelens.errors import ManifestError
from livelens.evidence.regions import (
    FUSE_LABELS,
    RegionClassifier,
    box_decisions,
    contact_flags,
    crop_regions,
    geometry_features,
)
from livelens.store import user_store

Detector = Callable[[np.ndarray], list[tuple[float, float, float, float]]]
#: ``(frame, boxes) -> per box, whether OCR read a contact entity in it`` (see ``box_decisions``).
Reader = Callable[[np.ndarray, Sequence[Sequence[float]]], list[bool]]
IGNORE = -1


def ppocr_detector(engine: Any | None = None) -> Detector:
    """``frame -> boxes`` with the PP-OCR detector the OCR deployment uses (offline ONNX)."""
    if engine is None:
        from livelens.ocr import create_engine

        engine = create_engine("ppocr")

    def detect(frame: np.ndarray) -> list[tuple[float, float, float, float]]:
        return [tuple(float(v) for v in b.box) for b in engine.detect([frame])[0]]

    return detect


def ppocr_reader(engine: Any | None = None) -> Reader:
    """``(frame, boxes) -> contact flags``: read each box and extract entities with serving's own rules."""
    from livelens.ocr import create_engine, crop_line
    from livelens.ocr.pipeline import TEXT_SCORE, frame_entities, lines_from_detections
    from livelens.ocr.types import box_to_polygon

    engine = create_engine("ppocr") if engine is None else engine

    def read(frame: np.ndarray, boxes: Sequence[Sequence[float]]) -> list[bool]:
        if not len(boxes):
            return []
        # The cache keeps axis boxes, so the crops are of those (serving crops the detector's quads).
        dets = [{"polygon": box_to_polygon(b[:4]), "score": 1.0} for b in boxes]
        texts = engine.recognize([crop_line(frame, d["polygon"]) for d in dets])
        lines = lines_from_detections(dets, [list(b[:4]) for b in boxes], texts, TEXT_SCORE)
        return contact_flags(boxes, [e["box"] for e in frame_entities(frame, lines, qr=False)])

    return read


def box_targets(boxes: Sequence[Sequence[float]], overlays: Sequence[dict[str, Any]], classes: Sequence[str]
                ) -> list[int]:
    """Class index per detected box from the frame's ground-truth overlay boxes.

    Args:
        boxes: Detected boxes ``(x0, y0, x1, y1)``.
        overlays: The manifest's ``boxes`` (dicts with ``label``, ``x0``..``y1``).
        classes: Region classes, the negative first.

    Returns:
        An index into ``classes``, 0 for a box in no ad overlay, :data:`IGNORE` for one in an
        ad overlay that is not a region class.
    """
    index = {c: j for j, c in enumerate(classes)}
    out = []
    for b in boxes:
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        target = 0
        # The smallest overlay containing the centre wins: a phone pill inside a banner is a phone.
        inside = [o for o in overlays if o["x0"] <= cx <= o["x1"] and o["y0"] <= cy <= o["y1"]
                  and str(o["label"]).startswith("ads_")]
        if inside:
            o = min(inside, key=lambda o: (o["x1"] - o["x0"]) * (o["y1"] - o["y0"]))
            target = index.get(o["label"], IGNORE)
        out.append(target)
    return out


@dataclass
class RegionSet:
    """Cached features of every proposal of a split, and the frames they came from."""

    feats: np.ndarray          # (N, C) float32 pooled backbone features
    geometry: np.ndarray       # (N, G) float32
    targets: np.ndarray        # (N,) int64 class index or IGNORE
    frame: np.ndarray          # (N,) int64 index into frame_labels
    boxes: np.ndarray          # (N, 4) float32
    frame_labels: list[set[str]] = field(default_factory=list)  # ads labels of each frame
    seconds: float = 0.0
    contacts: np.ndarray | None = None  # (N,) bool: OCR read a contact entity in the box (None: not read)

    def __len__(self) -> int:
        return len(self.targets)


class BoxCache:
    """Detected boxes by frame id, kept in a JSON file so a re-run skips the detector (~0.3 s a frame).

    Frame ids are content hashes, so a cache can never hand one frame's boxes to another; the
    file name should still carry the detector's identity (see :func:`run`).
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.boxes: dict[str, list[list[float]]] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.boxes = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.boxes = {}  # a torn cache is only lost time, never wrong boxes
        self._dirty = False

    def get(self, key: str) -> list[tuple[float, ...]] | None:
        got = self.boxes.get(key)
        return None if got is None else [tuple(b) for b in got]

    def put(self, key: str, boxes: Sequence[Sequence[float]]) -> None:
        self.boxes[key] = [[round(float(v), 2) for v in b[:4]] for b in boxes]
        self._dirty = True

    def get_flags(self, key: str) -> list[bool] | None:
        got = self.boxes.get(f"{key}#contacts")
        return None if got is None else [bool(v) for v in got]

    def put_flags(self, key: str, flags: Sequence[bool]) -> None:
        self.boxes[f"{key}#contacts"] = [int(bool(v)) for v in flags]
        self._dirty = True

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.boxes))
        tmp.replace(self.path)
        self._dirty = False


def build_region_set(model: RegionClassifier, manifest: str, split: str, detector: Detector,
                     limit: int | None = None, progress: Callable[[int, int], None] | None = None,
                     cache: BoxCache | None = None, reader: Reader | None = None,
                     flag_cache: BoxCache | None = None) -> RegionSet:
    """Detect text in every frame of ``split``, label the boxes, and cache their features.

    With ``reader``, each box also gets its contact flag (what serving reads in it), which
    :func:`frame_scores` then uses as serving does.

    Raises:
        ManifestError: The split has no rows.
    """
    from livelens.data import read_manifest

    table = read_manifest(manifest, columns=["id", "split", "image_bytes", "labels", "boxes"])
    rows = [r for r in table.to_pylist() if r["split"] == split][: limit or None]
    if not rows:
        raise ManifestError(f"{manifest} has no rows in split {split!r}")
    feats, geo, targets, frame_of, all_boxes, frame_labels, contacts = [], [], [], [], [], [], []
    t0 = time.perf_counter()
    for i, r in enumerate(rows):
        if r["image_bytes"] is None:
            raise ManifestError(f"row {r['id']} has no image bytes")
        img = np.asarray(Image.open(io.BytesIO(r["image_bytes"])).convert("RGB"))
        frame_labels.append({lab for lab in (r["labels"] or []) if lab.startswith("ads_")})
        boxes = cache.get(r["id"]) if cache is not None else None
        if boxes is None:
            boxes = detector(img)
            if cache is not None:
                cache.put(r["id"], boxes)
        if boxes and reader is not None:
            flags = flag_cache.get_flags(r["id"]) if flag_cache is not None else None
            if flags is None or len(flags) != len(boxes):
                flags = reader(img, boxes)
                if flag_cache is not None:
                    flag_cache.put_flags(r["id"], flags)
            contacts.extend(flags)
        if boxes:
            h, w = img.shape[:2]
            feats.append(model.features(crop_regions(img, boxes, model.crop_hw)).numpy())
            geo.append(geometry_features(boxes, w, h))
            targets.extend(box_targets(boxes, r["boxes"] or [], model.classes))
            frame_of.extend([i] * len(boxes))
            all_boxes.append(np.asarray(boxes, np.float32))
        if (i + 1) % 25 == 0 or i + 1 == len(rows):
            for c in (cache, flag_cache):
                if c is not None:
                    c.save()
            if progress:
                progress(i + 1, len(rows))
    c = model.channels
    return RegionSet(
        feats=np.concatenate(feats) if feats else np.zeros((0, c), np.float32),
        geometry=np.concatenate(geo) if geo else np.zeros((0, geometry_features([], 1, 1).shape[1]), np.float32),
        targets=np.asarray(targets, np.int64), frame=np.asarray(frame_of, np.int64),
        boxes=np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), np.float32),
        frame_labels=frame_labels, seconds=round(time.perf_counter() - t0, 1),
        contacts=np.asarray(contacts, bool) if reader is not None else None)


def fit_head(model: RegionClassifier, data: RegionSet, epochs: int = 60, lr: float = 2e-3, batch_size: int = 256,
             weight_decay: float = 1e-4, seed: int = 0) -> list[float]:
    """Fit ``model.head`` on cached features with class-balanced cross-entropy.

    Returns:
        Mean training loss per epoch.

    Raises:
        ManifestError: No labelled proposals, or no positive one.
    """
    keep = data.targets != IGNORE
    x = torch.from_numpy(data.feats[keep]).float()
    g = torch.from_numpy(data.geometry[keep]).float()
    y = torch.from_numpy(data.targets[keep])
    if len(y) == 0 or int((y > 0).sum()) == 0:
        raise ManifestError("no labelled text regions to train on (did the detector find any text?)")
    counts = torch.bincount(y, minlength=len(model.classes)).float()
    # 1/sqrt(frequency): the negative class outnumbers each ad several times over, and plain
    # inverse frequency overshoots on classes with a handful of examples.
    weight = torch.where(counts > 0, counts.clamp(min=1).rsqrt(), torch.zeros_like(counts))
    weight = weight / weight[counts > 0].mean()
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    history = []
    model.head.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        total = 0.0
        for s in range(0, len(y), batch_size):
            idx = perm[s:s + batch_size]
            loss = loss_fn(model.head(x[idx], g[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        history.append(total / len(y))
    model.head.eval()
    return history


def region_probs(model: RegionClassifier, data: RegionSet) -> np.ndarray:
    """Softmax probabilities (N, K) of every cached proposal."""
    with torch.inference_mode():
        logits = model.head(torch.from_numpy(data.feats).float(), torch.from_numpy(data.geometry).float())
    return torch.softmax(logits, dim=1).numpy()


def frame_scores(model: RegionClassifier, data: RegionSet, probs: np.ndarray | None = None) -> np.ndarray:
    """(frames, K) best score per class over each frame's regions, counting a region only for its decided class.

    This is exactly what :func:`livelens.evidence.regions.region_hits` reports before thresholds,
    with the set's contact flags when it has them (see :func:`~livelens.evidence.regions.box_decisions`).
    """
    probs = region_probs(model, data) if probs is None else probs
    out = np.zeros((len(data.frame_labels), len(model.classes)), np.float32)
    index = {c: j for j, c in enumerate(model.classes)}
    for (name, score), f in zip(box_decisions(model.classes, probs, data.contacts), data.frame, strict=True):
        j = index[name]
        out[f, j] = max(out[f, j], score)
    return out


def choose_thresholds(model: RegionClassifier, data: RegionSet, labels: Sequence[str] = FUSE_LABELS,
                      grid: Sequence[float] = tuple(np.round(np.arange(0.3, 0.96, 0.05), 2))) -> dict[str, float]:
    """Per label, the score threshold with the best frame-level accuracy on ``data`` (a validation split).

    Ties go to the middle of the best plateau. With a few dozen positives per label, many
    thresholds score the same on val; the highest of them (the earlier rule) sat at the edge of
    the plateau, 0.95 for logos, and missed half the logos of unseen frames scoring 0.74–0.90.
    """
    scores = frame_scores(model, data)
    out = {}
    for lab in labels:
        j = model.classes.index(lab)
        truth = np.array([lab in fl for fl in data.frame_labels])
        out[lab] = plateau_threshold(scores[:, j], truth, grid)
    return out


def plateau_threshold(scores: np.ndarray, truth: np.ndarray, grid: Sequence[float]) -> float:
    """The grid threshold in the middle of those with the best accuracy of ``scores >= t`` against ``truth``."""
    acc = [float(np.mean((np.asarray(scores) >= t) == np.asarray(truth, bool))) for t in grid]
    best = [t for t, a in zip(grid, acc, strict=True) if a >= max(acc) - 1e-12]
    return float(best[len(best) // 2])


def frame_metrics(model: RegionClassifier, data: RegionSet, labels: Sequence[str] = FUSE_LABELS) -> dict[str, dict]:
    """Frame-level accuracy, precision, recall and support per label, regions alone, at ``model.thresholds``."""
    scores = frame_scores(model, data)
    out = {}
    for lab in labels:
        j = model.classes.index(lab)
        truth = np.array([lab in fl for fl in data.frame_labels])
        pred = scores[:, j] >= model.thresholds.get(lab, 0.5)
        tp = int((pred & truth).sum())
        out[lab] = {"accuracy": float(np.mean(pred == truth)), "precision": tp / max(int(pred.sum()), 1),
                    "recall": tp / max(int(truth.sum()), 1), "support": int(truth.sum())}
    return out


def region_accuracy(model: RegionClassifier, data: RegionSet) -> float:
    """Box-level accuracy over labelled proposals."""
    keep = data.targets != IGNORE
    if not keep.any():
        return float("nan")
    return float(np.mean(region_probs(model, data)[keep].argmax(1) == data.targets[keep]))


@dataclass(frozen=True)
class RegionTrainConfig:
    """``make train-regions``.

    Attributes:
        manifest: Frames manifest (``make data``).
        train_limit: Train frames to detect text in (None: all); detection costs ~0.3 s a frame on 2 cores.
        val_limit: Validation frames (thresholds are chosen on them).
        test_limit: Held-out frames for the reported figures; 0 skips the test split.
        epochs: Head epochs over the cached features.
        lr: Head learning rate.
        backbone: Frozen ImageNet backbone for the crops.
        model_store: Where ``model_name`` is registered.
        model_name: Store name.
        register: Publish into the store.
        cache_dir: Where detected boxes are kept between runs ("" for no cache).
    """

    manifest: str = "runs/data/frames"
    train_limit: int | None = None
    val_limit: int | None = None
    test_limit: int | None = None
    epochs: int = 60
    lr: float = 2e-3
    backbone: str = "mobilenet_v2"
    model_store: str = field(default_factory=user_store)
    model_name: str = "ads_regions"
    register: bool = True
    cache_dir: str = "runs/regions/cache"

    def validate(self) -> None:
        """Raises ConfigError for values no run could use."""
        from livelens.errors import ConfigError

        for name in ("train_limit", "val_limit", "test_limit"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"{name} must be >= 0 or None, got {v}")
        if self.epochs < 1 or self.lr <= 0:
            raise ConfigError(f"epochs must be >= 1 and lr > 0, got {self.epochs} and {self.lr}")


def run(cfg: RegionTrainConfig, detector: Detector | None = None,
        progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Detect, cache features, fit the head, choose thresholds on val, report val and test, register.

    Args:
        cfg: The run.
        detector: ``frame -> boxes``; PP-OCR's detector when None.
        progress: Called with (split, done, total).

    Returns:
        A summary: proposal counts, box accuracy, per-label frame metrics on val and test, the
        thresholds, timings and the registered ``ref``.
    """
    from livelens.data import load_card
    from livelens.store import ModelStore
    from livelens.taxonomy import load_taxonomy
    from livelens.train.classification import dataset_id

    cfg.validate()
    t0 = time.perf_counter()
    cache = flag_cache = None
    reader = None
    if detector is None:
        from livelens.ocr import create_engine

        engine = create_engine("ppocr")
        detector, reader = ppocr_detector(engine), ppocr_reader(engine)
        if cfg.cache_dir:
            from importlib.metadata import version

            # Boxes are the PP-OCR detector's; its weights ship in the rapidocr wheel.
            cache = BoxCache(Path(cfg.cache_dir) / f"ppocr-det-rapidocr-{version('rapidocr')}.json")
            # Contact flags also depend on the recogniser and on the entity rules, which change
            # more often than the detector: their file is keyed by the rules' source.
            import hashlib
            import inspect

            from livelens.evidence import regions as regions_mod
            from livelens.ocr import entities as entities_mod

            rules = inspect.getsource(entities_mod) + inspect.getsource(regions_mod.contact_flags)
            key = hashlib.sha256(rules.encode()).hexdigest()[:12]
            flag_cache = BoxCache(Path(cfg.cache_dir) / f"contacts-rapidocr-{version('rapidocr')}-{key}.json")
    model = RegionClassifier(cfg.backbone)

    def build(split: str, limit: int | None, read: bool = True) -> RegionSet:
        # The head learns appearance only; the reading matters where decisions are taken.
        return build_region_set(model, cfg.manifest, split, detector, limit=limit, cache=cache,
                                reader=reader if read else None, flag_cache=flag_cache,
                                progress=(lambda d, n: progress(split, d, n)) if progress else None)

    train = build("train", cfg.train_limit, read=False)
    val = build("val", cfg.val_limit)
    history = fit_head(model, train, epochs=cfg.epochs, lr=cfg.lr)
    model.thresholds = choose_thresholds(model, val)
    summary: dict[str, Any] = {
        "proposals": {"train": len(train), "val": len(val)},
        "positives": {"train": int((train.targets > 0).sum()), "val": int((val.targets > 0).sum())},
        "frames": {"train": len(train.frame_labels), "val": len(val.frame_labels)},
        "loss": [round(history[0], 4), round(history[-1], 4)],
        "box_accuracy": {"train": region_accuracy(model, train), "val": region_accuracy(model, val)},
        "thresholds": model.thresholds, "val": frame_metrics(model, val),
        "detect_seconds": {"train": train.seconds, "val": val.seconds},
    }
    if cfg.test_limit != 0:
        test = build("test", cfg.test_limit)
        summary["test"] = frame_metrics(model, test)
        summary["frames"]["test"] = len(test.frame_labels)
        summary["box_accuracy"]["test"] = region_accuracy(model, test)
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    if cfg.register:
        card = {"task": "ads_regions", "datasets": [dataset_id(load_card(cfg.manifest))],
                "taxonomy_version": load_taxonomy().version, "backbone": cfg.backbone,
                "fuse_labels": list(FUSE_LABELS), "proposals": "PP-OCR text detection",
                "decisions": "a contact class (phone, URL, ids) that the OCR reading refutes falls back to the "
                             "best fused class, scored 1 - p(region_none) (livelens.evidence.regions.box_decisions)",
                "eval_split": "test" if "test" in summary else "val",
                "metrics": {k: summary[k] for k in ("val", "test", "box_accuracy") if k in summary},
                "train": {"epochs": cfg.epochs, "lr": cfg.lr, "train_frames": len(train.frame_labels),
                          "proposals": len(train)},
                "wall_time_s": summary["wall_time_s"]}
        from livelens.evidence.regions import save_region_model

        summary["ref"] = save_region_model(ModelStore(cfg.model_store), cfg.model_name, model, card)
    return summary
