"""Held-out evaluation of the whole moderation path: classifier, OCR entities and QR decoding, fused.

A frozen-backbone classifier at 128 px cannot read a phone number that is 10 px tall in a
960×540 frame; the service does not ask it to. ``/v1/analyze`` merges the classifier's labels with
the ``ads_*`` labels that OCR entities (phones, URLs, WeChat/QQ ids) and decoded QR codes raise
(``serve_apps.gateway``: union by label, strongest score). This module measures exactly that
fusion on a manifest split, so the per-label figures are the ones a user of ``/v1/analyze`` gets,
next to the classifier alone and OCR alone.

    python -m train_jobs.eval_safety            # make eval-safety
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from livelens.errors import ManifestError
from livelens.ocr.entities import AUTHORITATIVE_LABELS
from livelens.taxonomy import Taxonomy, load_taxonomy
from livelens.train.classification import heads_for, preprocess_batch
from livelens.train.metrics import head_metrics
from livelens.train.targets import target_key

#: ``image -> {source: labels}`` (a plain set counts as one source, ``ocr``).
OcrLabeler = Callable[[np.ndarray], "set[str] | Mapping[str, set[str]]"]


def make_ocr_labeler(engine: Any | None = None, decode_qr: bool = True,
                     region_model: Any | None = None) -> OcrLabeler:
    """``image -> {source: ads labels}`` as the OCR deployment computes them.

    Sources: ``entities`` (lines → phones, URLs, ids, + QR codes) and, with ``region_model``,
    ``regions`` (every detected text box classified by :mod:`livelens.evidence.regions`).

    Args:
        engine: An OCR engine with ``detect``/``recognize``; PP-OCR (offline ONNX) when None.
        decode_qr: Also decode QR codes (OpenCV), as the deployment does by default.
        region_model: A :class:`~livelens.evidence.regions.RegionClassifier`, or None.
    """
    from livelens.ocr import TextLine, crop_line
    from livelens.ocr.qr import frame_entities

    if engine is None:
        from livelens.ocr import create_engine

        engine = create_engine("ppocr")
    min_score = float(getattr(engine, "text_score", 0.0) or 0.0)

    def labels(image: np.ndarray) -> dict[str, set[str]]:
        # Detect once: the regions use every box, the entities only lines with readable text
        # (what the deployment does too).
        boxes = engine.detect([image])[0]
        texts = engine.recognize([crop_line(image, b.polygon) for b in boxes]) if boxes else []
        lines = [TextLine(b.polygon, b.box, t, s) for b, (t, s) in zip(boxes, texts, strict=True)
                 if t.strip() and s >= min_score]
        found = frame_entities(image, lines, qr=decode_qr)
        out = {"entities": {e.label for e in found if e.label}}
        if region_model is not None:
            from livelens.evidence.regions import contact_flags, frame_labels, region_hits

            axis = [b.box for b in boxes]
            flags = contact_flags(axis, [e.box for e in found if e.kind != "qrcode"])
            out["regions"] = set(frame_labels(region_hits(region_model, image, axis, contacts=flags)))
        return out

    return labels


def fuse_sigmoid(probs: np.ndarray, classes: Sequence[str], extra: Sequence[set[str]],
                 authoritative: Sequence[str] = ()) -> np.ndarray:
    """Union of a sigmoid head's predictions with labels found by another model, as the gateway merges.

    A found label scores 1.0 (max with the classifier); the negative class (column 0, e.g.
    ``ads_none``) drops to 0 for a frame where anything was found, so "no ads" and an OCR phone
    number never co-exist in the answer.

    Args:
        probs: (N, K) sigmoid probabilities, the negative class first.
        classes: The K class names.
        extra: Per row, the label names found by the other model (unknown names are ignored).
        authoritative: Labels the other model decides alone: the classifier's score for them is
            dropped (the gateway's ``overrule_unread``), so only a found one is positive.
    """
    if len(extra) != len(probs):
        raise ValueError(f"{len(extra)} label sets for {len(probs)} rows")
    out = np.array(probs, dtype=np.float64, copy=True)
    col = {c: j for j, c in enumerate(classes)}
    ruled = [col[name] for name in authoritative if name in col and col[name] > 0]
    if ruled:
        out[:, ruled] = 0.0
    for i, found in enumerate(extra):
        hits = [col[name] for name in found if name in col and col[name] > 0]
        if hits:
            out[i, hits] = 1.0
            out[i, 0] = 0.0
    return out


def _label_accuracy(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return {lab: {k: float(m[k]) for k in ("accuracy", "precision", "recall", "f1", "support")}
            for lab, m in metrics["labels"].items()}


def evaluate_fused(model: nn.Module, manifest: str, *, groups: Sequence[str], size: int,
                   ocr_labeler: OcrLabeler, split: str = "test", fuse_group: str = "ads",
                   taxonomy: str | None = None, limit: int | None = None, batch_size: int = 16,
                   authoritative: Sequence[str] = AUTHORITATIVE_LABELS,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Per-label accuracy on ``split`` for the classifier, for OCR alone, and for their fusion.

    Args:
        model: A taxonomy classifier whose heads include ``fuse_group``.
        manifest: Manifest directory (or URI) holding ``split``.
        groups: The model's taxonomy groups (its card's ``groups``).
        size: The model's input size.
        ocr_labeler: ``image -> {labels}`` (see :func:`make_ocr_labeler`).
        split: Manifest split to evaluate; ``test`` is held out from training and model selection.
        fuse_group: The sigmoid head OCR labels are merged into.
        authoritative: Labels OCR decides alone when it ran (the gateway's rule); ``()`` for a
            plain union.
        taxonomy: Taxonomy path (default: the bundled one).
        limit: Evaluate only the first ``limit`` rows of the split (for smoke runs).
        progress: Called with (done, total) after each batch.

    Returns:
        ``{"rows", "split", "seconds", "classifier": {label: {...}}, "ocr": …, "fused": …,
        "other_heads": {head: {label: {...}}}}``: every entry holds accuracy, precision, recall,
        F1 and support.

    Raises:
        ManifestError: The split is empty or the model has no ``fuse_group`` head.
    """
    from livelens.data import decode_batch, read_manifest
    from livelens.models import predict

    tax: Taxonomy = load_taxonomy(taxonomy)
    heads = heads_for(tax, groups)
    if fuse_group not in heads or heads[fuse_group].kind != "sigmoid":
        raise ManifestError(f"the model has no sigmoid {fuse_group!r} head (heads: {sorted(heads)})")
    table = read_manifest(manifest, columns=["id", "split", "image_bytes", "image_uri", "labels"])
    rows = [r for r in table.to_pylist() if r["split"] == split][: limit or None]
    if not rows:
        raise ManifestError(f"{manifest} has no rows in split {split!r}")
    probs: dict[str, list[np.ndarray]] = {h: [] for h in heads}
    targets: dict[str, list[np.ndarray]] = {h: [] for h in heads}
    found: list[dict[str, set[str]]] = []
    t0 = time.perf_counter()
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = {k: [r[k] for r in chunk] for k in ("id", "image_bytes", "image_uri", "labels")}
        pre = preprocess_batch(batch, size=size, groups=groups, taxonomy=taxonomy, train=False)
        with torch.no_grad():
            p = predict(model, torch.from_numpy(pre["x"]))
        for h in heads:
            probs[h].append(p[h].float().numpy())
            targets[h].append(pre[target_key(h)])
        for image in decode_batch(batch)["image"]:
            got = ocr_labeler(np.asarray(image))
            found.append(dict(got) if isinstance(got, Mapping) else {"ocr": set(got)})
        if progress:
            progress(min(start + batch_size, len(rows)), len(rows))
    P = {h: np.concatenate(v) for h, v in probs.items()}
    T = {h: np.concatenate(v) for h, v in targets.items()}
    head = heads[fuse_group]
    union = [set().union(*f.values()) if f else set() for f in found]
    ocr_only = fuse_sigmoid(np.zeros_like(P[fuse_group]), head.classes, union)
    ocr_only[:, 0] = np.where(ocr_only[:, 1:].max(1) > 0, 0.0, 1.0)  # OCR alone: "none" when it found nothing
    ruled = tuple(authoritative)

    def fuse(sets: Sequence[set[str]]) -> np.ndarray:
        out = fuse_sigmoid(P[fuse_group], head.classes, sets, ruled)
        # The API has no "ads_none" label: a frame is ads-free when no ads label is positive.
        out[:, 0] = np.where(out[:, 1:].max(1) >= 0.5, 0.0, 1.0)
        return out

    fused = fuse(union)

    def acc(probs: np.ndarray) -> dict[str, dict[str, float]]:
        return _label_accuracy(head_metrics(probs, T[fuse_group], head, fuse_group))

    sources = sorted({s for f in found for s in f})
    # Each source left out in turn: what it adds to the answer (e.g. the text regions).
    without = {s: acc(fuse([set().union(*(v for k, v in f.items() if k != s)) for f in found]))
               for s in sources if len(sources) > 1}
    return {
        "rows": len(rows), "split": split, "seconds": round(time.perf_counter() - t0, 1), "group": fuse_group,
        "sources": sources, "authoritative": sorted(ruled),
        "classifier": acc(P[fuse_group]), "ocr": acc(ocr_only), "fused": acc(fused), "fused_without": without,
        "other_heads": {h: _label_accuracy(head_metrics(P[h], T[h], heads[h], h)) for h in heads if h != fuse_group},
    }


def format_fused_table(result: Mapping[str, Any], min_support: int = 1) -> str:
    """Markdown: one row per label with support, accuracy and recall for classifier, OCR and fused."""
    without = result.get("fused_without") or {}
    extra = "".join(f" fused w/o {s} acc |" for s in without)
    lines = ["| label | support | classifier acc | OCR acc |" + extra + " fused acc | classifier recall | fused recall |",
             "|---|---|---|---|" + "---|" * len(without) + "---|---|---|"]
    for lab, c in result["classifier"].items():
        if c["support"] < min_support:
            continue
        o, f = result["ocr"][lab], result["fused"][lab]
        cols = "".join(f" {w[lab]['accuracy']:.3f} |" for w in without.values())
        lines.append(f"| {lab} | {int(c['support'])} | {c['accuracy']:.3f} | {o['accuracy']:.3f} |{cols} "
                     f"{f['accuracy']:.3f} | {c['recall']:.3f} | {f['recall']:.3f} |")
    for labs in result["other_heads"].values():
        for lab, c in labs.items():
            if c["support"] >= min_support:
                lines.append(f"| {lab} | {int(c['support'])} | {c['accuracy']:.3f} | - |" + " - |" * len(without)
                             + f" {c['accuracy']:.3f} | {c['recall']:.3f} | {c['recall']:.3f} |")
    return "\n".join(lines)
