"""Grad-CAM heatmaps and weakly supervised boxes from them.

Grad-CAM (Selvaraju et al., ICCV 2017) weights the last convolutional feature map by the
spatially averaged gradient of a class score and keeps the positive part. Because every
pooling in :mod:`livelens.models.pooling` is differentiable in the feature map, the same
code explains avg, max, gated, tree, bilinear and compact-bilinear models.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from livelens.errors import InvalidArgumentError

Box = tuple[float, float, float, float, float]  # x0, y0, x1, y1 (exclusive), score


def grad_cam(model: nn.Module, x: torch.Tensor, head: str, class_index: int) -> np.ndarray:
    """The Grad-CAM heatmap of one class for one image.

    Args:
        model: A model with ``forward_features`` and ``forward_head`` (DDP-unwrapped).
        x: The preprocessed input, (1, 3, H, W) or (3, H, W); only the first image is used.
        head: Head name.
        class_index: Output index within the head.

    Returns:
        A float32 (H, W) heatmap in [0, 1] at the input's resolution (all zeros when the
        class has no positive evidence).
    """
    model = getattr(model, "module", model)
    if x.ndim == 3:
        x = x[None]
    x = x[:1]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # Detach so frozen backbones (no parameter needs grad) still give a graph from here on.
            feats = model.forward_features(x.detach().clone()).detach().requires_grad_(True)
            logits = model.forward_head(feats)
            if head not in logits:
                raise InvalidArgumentError(f"model has no head {head!r}; heads are {list(logits)}")
            out = logits[head]
            if not 0 <= class_index < out.shape[1]:
                raise InvalidArgumentError(f"class index {class_index} outside head {head!r} of size {out.shape[1]}")
            (grads,) = torch.autograd.grad(out[0, class_index], feats)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * feats).sum(dim=1, keepdim=True)).detach()
        cam = _upsample_to_input(cam.float(), *x.shape[-2:])[0, 0]
    finally:
        model.train(was_training)
    peak = float(cam.max())
    return (cam / peak).numpy().astype(np.float32) if peak > 0 else np.zeros(tuple(x.shape[-2:]), np.float32)


def _upsample_to_input(cam: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinearly resize a (1, 1, h, w) map to the input size, cell j centred on pixel j·stride.

    Every stride-2 layer of the torchvision backbones pads by (k − 1) / 2, so feature cell j
    looks at input pixel j·stride, not at (j + ½)·stride as a plain ``interpolate`` assumes;
    the plain resize shifts the heatmap half a cell (16 px on a 224 px mobilenet input)
    towards the bottom right.
    """
    h, w = cam.shape[-2:]

    def coords(n_out: int, n_cells: int) -> torch.Tensor:
        cells = torch.arange(n_out, dtype=torch.float32) * (n_cells / n_out)
        return cells * 2 / (n_cells - 1) - 1 if n_cells > 1 else torch.zeros(n_out)

    gy, gx = torch.meshgrid(coords(height, h), coords(width, w), indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None]
    return F.grid_sample(cam, grid, mode="bilinear", padding_mode="border", align_corners=True)


def boxes_from_heatmap(heatmap: np.ndarray, threshold: float = 0.5, max_boxes: int = 3,
                       min_area: int = 4) -> list[Box]:
    """Weak boxes: normalise, threshold, and take the enclosing rectangle of each hot region.

    Args:
        heatmap: (H, W) non-negative heat.
        threshold: Fraction of the peak that counts as hot.
        max_boxes: Most boxes returned, hottest first.
        min_area: Smallest hot region, in pixels, that gives a box.

    Returns:
        ``(x0, y0, x1, y1, score)`` in heatmap pixels (x1, y1 exclusive): the smallest
        rectangle containing each hot region, scored by the region's mean heat (relative to
        the global peak), so a large lukewarm region ranks below a small very hot one.
    """
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    if heat.ndim != 2 or heat.size == 0:
        raise InvalidArgumentError(f"heatmap must be 2-D, got shape {heat.shape}")
    peak = float(heat.max())
    if peak <= 0:
        return []
    norm = heat / peak
    mask = (norm >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    boxes: list[Box] = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area:
            continue
        boxes.append((float(x), float(y), float(x + w), float(y + h), float(norm[labels == i].mean())))
    boxes.sort(key=lambda b: (-b[4], -(b[2] - b[0]) * (b[3] - b[1])))
    return boxes[:max_boxes]


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x0, y0, x1, y1, ...) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
