"""Second-pass recognition of small targets (the seed's 小目标二次识别).

A small violation covers little of the frame, so its total evidence can lose to the large
normal background in the first pass, yet Grad-CAM still localises it. The second pass
enlarges each heatmap box 1.5×, crops it from the *original full-resolution* frame (not the
downscaled model input), re-classifies the crop, and merges the scores with the first pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from livelens.models.heads import predict
from livelens.models.transforms import preprocess


def expand_box(box: Sequence[float], scale: float, width: int, height: int,
               min_side: float = 0.0) -> tuple[int, int, int, int]:
    """Scale a box about its centre and clip it to the frame (integer pixel bounds)."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw = max((x1 - x0) * scale, min_side) / 2
    hh = max((y1 - y0) * scale, min_side) / 2
    nx0, ny0 = max(0, int(np.floor(cx - hw))), max(0, int(np.floor(cy - hh)))
    nx1, ny1 = min(width, int(np.ceil(cx + hw))), min(height, int(np.ceil(cy + hh)))
    return nx0, ny0, max(nx1, nx0 + 1), max(ny1, ny0 + 1)


def merge_passes(first: Mapping[str, np.ndarray], crops: Sequence[Mapping[str, np.ndarray]]
                 ) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """Positive classes keep their highest score over all passes; the negative (index 0) its lowest.

    Returns:
        The merged scores per head, and per head the class indices that the second pass raised.
    """
    merged, raised = {}, {}
    for head, p in first.items():
        stack = np.stack([np.asarray(p, np.float32)] + [np.asarray(c[head], np.float32) for c in crops])
        m = stack.max(axis=0)
        m[0] = stack[:, 0].min()
        merged[head] = m
        raised[head] = [int(j) for j in range(1, len(m)) if m[j] > float(p[j]) + 1e-6]
    return merged, raised


def second_pass(model: nn.Module, frame: np.ndarray, boxes: Sequence[Sequence[float]], scale: float = 1.5,
                first_probs: Mapping[str, np.ndarray] | None = None, input_size: int | None = None,
                min_side: float = 16.0) -> dict[str, Any]:
    """Re-classify 1.5× crops of evidence boxes from the full-resolution frame and merge.

    Args:
        model: The classifier.
        frame: The original RGB uint8 frame (H, W, 3).
        boxes: Boxes in frame pixels, ``(x0, y0, x1, y1[, score])``.
        scale: Box enlargement before cropping.
        first_probs: First-pass probabilities per head (one frame); computed when None.
        input_size: Model input side; defaults to the model's ``default_cfg``.
        min_side: Smallest crop side in frame pixels (tiny boxes get some context).

    Returns:
        ``{"first": probs, "crops": [{"box", "probs"}], "merged": probs, "raised": {head: [idx]}}``.
    """
    h, w = frame.shape[:2]
    size = input_size or int(getattr(model, "default_cfg", {}).get("input_size", (3, 224, 224))[-1])
    if first_probs is None:
        first_probs = {k: v[0].numpy() for k, v in predict(model, preprocess([frame], size)).items()}
    windows = [expand_box(b, scale, w, h, min_side) for b in boxes]
    crops: list[dict[str, Any]] = []
    if windows:
        batch = preprocess([frame[y0:y1, x0:x1] for x0, y0, x1, y1 in windows], size)
        with torch.inference_mode():
            probs = predict(model, batch)
        for i, win in enumerate(windows):
            crops.append({"box": list(win), "probs": {k: v[i].numpy() for k, v in probs.items()}})
    merged, raised = merge_passes(first_probs, [c["probs"] for c in crops])
    return {"first": dict(first_probs), "crops": crops, "merged": merged, "raised": raised}
