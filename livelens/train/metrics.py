"""Evaluation metrics for multi-head classifiers: per-label P/R/F1/AUC/accuracy and a confusion PNG.

Heads are described by anything with ``kind`` ('softmax'|'sigmoid') and ``classes`` (the
negative first), so this module works for the taxonomy heads and for the single ``main``
head the quality and OCR jobs use.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score


class HeadLike(Protocol):
    """What the metrics need to know about a head."""

    kind: str
    classes: tuple[str, ...]


def _binary(probs: np.ndarray, target: np.ndarray, head: HeadLike,
            thresholds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (true, predicted, score) indicator matrices of shape (N, K).

    Without ``thresholds`` a softmax head predicts its argmax and a sigmoid head every class at
    0.5. With them (one per class; the negative's is ignored), a class is predicted when its score
    reaches its threshold, and the negative when no other class is: the rule of the served answer.
    """
    n, k = probs.shape
    if head.kind == "softmax":
        y_true = np.zeros((n, k), dtype=bool)
        y_true[np.arange(n), target.astype(int)] = True
    else:
        y_true = target.astype(bool)
    if thresholds is not None:
        y_pred = probs >= np.asarray(thresholds, np.float64)[None, :]
        y_pred[:, 0] = ~y_pred[:, 1:].any(1)
    elif head.kind == "softmax":
        y_pred = np.zeros((n, k), dtype=bool)
        y_pred[np.arange(n), probs.argmax(1)] = True
    else:
        y_pred = probs >= 0.5
    return y_true, y_pred, probs


def served_thresholds(tax: Any, head: HeadLike) -> np.ndarray:
    """Per class of a taxonomy head, the score from which the service acts on it (:meth:`Taxonomy.raise_threshold`)."""
    return np.array([np.nan] + [tax.raise_threshold(c) if c in tax.labels else 0.5 for c in head.classes[1:]])


def head_metrics(probs: np.ndarray, target: np.ndarray, head: HeadLike, name: str = "main",
                 thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """Metrics of one head.

    Args:
        probs: (N, K) probabilities (softmax rows or independent sigmoids).
        target: (N,) class indices for softmax heads, (N, K) multi-hot for sigmoid heads.
        head: The head's kind and class names.
        name: Head name used in the flat metric keys.
        thresholds: Per class, the score at which it counts as predicted (see :func:`_binary`).

    Returns:
        ``{"accuracy": …, "labels": {label: {precision, recall, f1, auc, accuracy, support}}}``;
        AUC is NaN for a label whose target is constant in this set. For softmax heads
        accuracy is argmax accuracy; for sigmoid heads it is exact-match accuracy.
    """
    probs = np.asarray(probs, dtype=np.float64)
    target = np.asarray(target)
    y_true, y_pred, score = _binary(probs, target, head, thresholds)
    prec, rec, f1, support = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    labels: dict[str, dict[str, float]] = {}
    for j, cls in enumerate(head.classes):
        t = y_true[:, j]
        auc = float(roc_auc_score(t, score[:, j])) if 0 < t.sum() < len(t) else math.nan
        labels[cls] = {"precision": float(prec[j]), "recall": float(rec[j]), "f1": float(f1[j]), "auc": auc,
                       "accuracy": float((y_pred[:, j] == t).mean()) if len(t) else math.nan,
                       "support": int(support[j])}
    if head.kind == "softmax":
        acc = float((probs.argmax(1) == target).mean()) if len(target) else math.nan
    else:
        acc = float((y_pred == y_true).all(1).mean()) if len(target) else math.nan
    return {"head": name, "kind": head.kind, "accuracy": acc, "labels": labels}


def multihead_metrics(probs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                      heads: Mapping[str, HeadLike], thresholds: Mapping[str, np.ndarray] | None = None
                      ) -> dict[str, Any]:
    """Metrics of every head, plus flat scalars for ``ray.train.report``.

    Returns:
        ``{"heads": {head: head_metrics}, "scalars": {"val_accuracy": mean head accuracy,
        "val_macro_f1": mean F1 over positive labels with support, "val_min_recall",
        "val_min_precision": the worst positive label with support, "acc/<head>", "label_acc/<label>",
        and "precision/<label>", "recall/<label>" for each positive label with support}}``.
    """
    thresholds = thresholds or {}
    per_head = {h: head_metrics(probs[h], targets[h], heads[h], h, thresholds.get(h)) for h in heads}
    scalars: dict[str, float] = {}
    f1s, recalls, precisions = [], [], []
    for h, m in per_head.items():
        scalars[f"acc/{h}"] = m["accuracy"]
        for j, (label, lm) in enumerate(m["labels"].items()):
            scalars[f"label_acc/{label}"] = lm["accuracy"]
            if j > 0 and lm["support"] > 0:
                scalars[f"precision/{label}"] = lm["precision"]
                scalars[f"recall/{label}"] = lm["recall"]
                f1s.append(lm["f1"])
                recalls.append(lm["recall"])
                precisions.append(lm["precision"])
    accs = [m["accuracy"] for m in per_head.values() if not math.isnan(m["accuracy"])]
    scalars["val_accuracy"] = float(np.mean(accs)) if accs else math.nan
    scalars["val_macro_f1"] = float(np.mean(f1s)) if f1s else math.nan
    scalars["val_min_recall"] = float(min(recalls)) if recalls else math.nan
    scalars["val_min_precision"] = float(min(precisions)) if precisions else math.nan
    return {"heads": per_head, "scalars": scalars}


def confusion_png(probs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                  heads: Mapping[str, HeadLike], title: str = "",
                  thresholds: Mapping[str, np.ndarray] | None = None) -> bytes:
    """A PNG with one confusion panel per head.

    Softmax heads get the K×K matrix (rows true, columns predicted); sigmoid heads get one
    row per label with its TN/FP/FN/TP counts, since their labels are not exclusive.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: workers and CI have no display
    import matplotlib.pyplot as plt

    names = list(heads)
    cols = min(3, len(names)) or 1
    rows = math.ceil(len(names) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.8 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, h in zip(axes.flat, names, strict=False):
        head, p, t = heads[h], np.asarray(probs[h]), np.asarray(targets[h])
        if head.kind == "softmax":
            k = len(head.classes)
            mat = confusion_matrix(t.astype(int), p.argmax(1), labels=list(range(k)))
            xt, yt = list(head.classes), list(head.classes)
        else:
            y_true, y_pred, _ = _binary(p, t, head, (thresholds or {}).get(h))
            mat = np.stack([((~y_true) & (~y_pred)).sum(0), ((~y_true) & y_pred).sum(0),
                            (y_true & ~y_pred).sum(0), (y_true & y_pred).sum(0)], axis=1)
            xt, yt = ["TN", "FP", "FN", "TP"], list(head.classes)
        ax.imshow(mat, cmap="Blues")
        ax.set_xticks(range(len(xt)), xt, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(yt)), yt, fontsize=7)
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=7,
                    color="white" if v > mat.max() / 2 else "black")
        ax.set_title(f"{h} ({head.kind})", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def format_label_table(metrics: Mapping[str, Any], positives_only: bool = True) -> str:
    """A Markdown table of per-label metrics (from :func:`multihead_metrics`)."""
    lines = ["| head | label | support | precision | recall | F1 | AUC | accuracy |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for h, m in metrics["heads"].items():
        for j, (label, lm) in enumerate(m["labels"].items()):
            if positives_only and (j == 0 or lm["support"] == 0):
                continue
            lines.append(f"| {h} | {label} | {lm['support']} | {lm['precision']:.3f} | {lm['recall']:.3f} | "
                         f"{lm['f1']:.3f} | {lm['auc']:.3f} | {lm['accuracy']:.3f} |")
    return "\n".join(lines)
