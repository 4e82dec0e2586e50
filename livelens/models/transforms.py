"""Eval preprocessing shared by training evaluation and serving."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from livelens.models.factory import IMAGENET_MEAN, IMAGENET_STD


def preprocess(frames: Sequence[np.ndarray], size: int | tuple[int, int] = 224,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """RGB uint8 frames → a normalised (B, 3, H, W) float tensor.

    A plain resize, no centre crop: overlays and ads sit at the edges of 16:9 frames.
    """
    h, w = (size, size) if isinstance(size, int) else size
    arr = np.stack([cv2.resize(np.asarray(f), (w, h), interpolation=cv2.INTER_AREA) for f in frames])
    arr = (arr.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
