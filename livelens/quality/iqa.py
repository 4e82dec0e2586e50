"""Learned no-reference image quality (NR-IQA): natural-scene-statistics features + a small MLP.

The design follows the BRISQUE/CORNIA line: distortions change the statistics of locally
contrast-normalised (MSCN) luminance in characteristic ways. Each frame becomes a
:data:`N_FEATURES`-vector — MSCN moments and neighbour-product moments at two scales (BRISQUE-style)
plus the classical measures (directional Crete blur, Laplacian variance, noise sigma,
blockiness, luminance statistics) — and a ~7 k-parameter MLP regresses the score in [0, 100]
(100 = pristine). The feature normaliser is part of the state dict, so a stored model is
self-contained.

A Kang et al. (2014) patch CNN was tried first; on this project's 2 shared CPU cores one epoch
over 45 k patches took ~6 min, too slow for the ~10 min training budget (see docs/quality.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from livelens.errors import ConfigError
from livelens.quality import measures as m

IQA_SIDE = 384
MODEL_NAME = "quality_iqa"
_PAIRS = ((0, 1), (1, 0), (1, 1), (1, -1))  # (dy, dx): horizontal, vertical, two diagonals


@dataclass(frozen=True)
class IqaArch:
    """Architecture, stored in the model card so the model can be rebuilt.

    Attributes:
        in_features: Length of the feature vector.
        hidden: Width of the two hidden layers.
        side: Long side the frame is resized to before features are computed.
    """

    in_features: int = 0
    hidden: int = 64
    side: int = IQA_SIDE

    def __post_init__(self) -> None:
        if self.in_features == 0:
            object.__setattr__(self, "in_features", N_FEATURES)


def mscn(gray: np.ndarray, c: float = 1.0) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients ``(I − μ) / (σ + c)`` (7×7 Gaussian, 0–255 input)."""
    g = gray.astype(np.float32)
    mu = cv2.GaussianBlur(g, (7, 7), 7.0 / 6.0, borderType=cv2.BORDER_REFLECT)
    var = cv2.GaussianBlur(g * g, (7, 7), 7.0 / 6.0, borderType=cv2.BORDER_REFLECT) - mu * mu
    return (g - mu) / (np.sqrt(np.maximum(var, 0.0)) + c)


def _moments(x: np.ndarray) -> list[float]:
    x = x.reshape(-1).astype(np.float64)
    mean, var = float(x.mean()), float(x.var()) + 1e-8
    return [mean, float(np.abs(x).mean()), float(np.log(var)), float(((x - mean) ** 4).mean() / var**2) / 10.0]


def _nss(gray: np.ndarray) -> list[float]:
    c = mscn(gray)
    feats = _moments(c)
    h, w = c.shape
    for dy, dx in _PAIRS:
        a = c[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
        b = c[max(0, dy) : max(0, dy) + a.shape[0], max(0, dx) : max(0, dx) + a.shape[1]]
        prod = a * b
        feats += [float(prod.mean()), float(np.log(prod.var() + 1e-8))]
    return feats


def features(image: Any, side: int = IQA_SIDE) -> np.ndarray:
    """The NR-IQA feature vector of one image (float32, length :data:`N_FEATURES`)."""
    rgb = m.to_rgb(image)
    gray = m._resize_long(m.luminance(rgb), side)
    if min(gray.shape) < 16:
        # Too small for neighbourhood statistics: upscale so every input gets a defined score.
        gray = cv2.resize(gray, (max(16, gray.shape[1]), max(16, gray.shape[0])), interpolation=cv2.INTER_LINEAR)
    half = cv2.resize(gray, (max(8, gray.shape[1] // 2), max(8, gray.shape[0] // 2)), interpolation=cv2.INTER_AREA)
    crete = m.crete_blur(gray)
    g = gray.astype(np.float32) / 255.0
    lum = [float(g.mean()), float(g.std()), *np.percentile(g, [5, 50, 95]).tolist(),
           float((g < 0.02).mean()), float((g > 0.98).mean())]
    classical = [*crete.values(), float(np.log10(m.laplacian_variance(gray) + 1.0)),
                 m.noise(gray)["sigma"] / 25.0, m.blockiness(gray)["ratio"]]
    return np.asarray(_nss(gray) + _nss(half) + classical + lum, np.float32)


N_FEATURES = 2 * (4 + 2 * len(_PAIRS)) + 7 + 7


class IqaNet(nn.Module):
    """Standardise features → MLP → score in [0, 100].

    Args:
        arch: Sizes.
    """

    def __init__(self, arch: IqaArch | None = None):
        super().__init__()
        self.arch = arch or IqaArch()
        n = self.arch.in_features
        # The normaliser is a buffer: it travels with the state dict, set once from training data.
        self.register_buffer("feat_mean", torch.zeros(n))
        self.register_buffer("feat_std", torch.ones(n))
        self.mlp = nn.Sequential(
            nn.Linear(n, self.arch.hidden), nn.ReLU(), nn.Linear(self.arch.hidden, self.arch.hidden), nn.ReLU(),
            nn.Linear(self.arch.hidden, 1),
        )

    def set_normaliser(self, x: np.ndarray) -> None:
        """Fit the feature standardisation on training features (N, F)."""
        self.feat_mean.copy_(torch.from_numpy(x.mean(0).astype(np.float32)))
        self.feat_std.copy_(torch.from_numpy(x.std(0).astype(np.float32) + 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B,) in [0, 100] from features (B, F)."""
        z = ((x - self.feat_mean) / self.feat_std).clamp(-8.0, 8.0)
        return 100.0 * torch.sigmoid(self.mlp(z).squeeze(1))


class IqaModel:
    """A loaded NR-IQA model: ``score(image) -> float`` in [0, 100].

    Args:
        net: The trained network.
        ref: Its model-store reference (``quality_iqa@N``), reported with every score.
    """

    def __init__(self, net: IqaNet, ref: str = "untrained"):
        self.net = net.eval()
        self.ref = ref

    @classmethod
    def from_store(cls, store: Any, ref: str = MODEL_NAME) -> IqaModel:
        """Load from a :class:`livelens.store.ModelStore` (``ModelNotFoundError`` if absent)."""
        stored = store.load(ref)
        arch = stored.card.get("arch")
        if not isinstance(arch, dict):
            raise ConfigError(f"model card of {stored.ref} has no 'arch' dict")
        net = IqaNet(IqaArch(**arch))
        net.load_state_dict(stored.state_dict)
        return cls(net, stored.ref)

    @torch.no_grad()
    def score_features(self, feats: np.ndarray) -> np.ndarray:
        """Scores of precomputed feature rows (N, F)."""
        return self.net(torch.from_numpy(np.asarray(feats, np.float32).reshape(-1, self.net.arch.in_features))).numpy()

    def score_batch(self, images: Sequence[Any]) -> list[float]:
        """Scores of several frames."""
        feats = np.stack([features(im, self.net.arch.side) for im in images])
        return [float(s) for s in self.score_features(feats)]

    def score(self, image: Any) -> float:
        """The quality score of one frame, 0 (worst) … 100 (pristine)."""
        return self.score_batch([image])[0]

    def card_arch(self) -> dict[str, Any]:
        """The ``arch`` entry of the model card."""
        return asdict(self.net.arch)


def srocc(pred: Sequence[float], target: Sequence[float]) -> float:
    """Spearman rank-order correlation."""
    from scipy.stats import spearmanr

    return float(spearmanr(pred, target).statistic)


def lcc(pred: Sequence[float], target: Sequence[float]) -> float:
    """Pearson linear correlation."""
    return float(np.corrcoef(np.asarray(pred, np.float64), np.asarray(target, np.float64))[0, 1])


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, passes: int = 1,
            shard: tuple[int, int] = (0, 1)) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled mini-batches ``{"x", "y"}`` of this worker's shard, ``passes`` times over it."""
    rank, world = shard
    rng = np.random.default_rng(seed)
    for _ in range(passes):
        order = rng.permutation(len(x))[rank::world]
        for i in range(0, len(order), batch_size):
            sel = order[i : i + batch_size]
            yield {"x": torch.from_numpy(x[sel]), "y": torch.from_numpy(y[sel])}


def l1_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """L1 between predicted and reference score (robust to a few odd references)."""
    return torch.nn.functional.l1_loss(model(batch["x"]), batch["y"])


@torch.no_grad()
def evaluate_features(net: IqaNet, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """SROCC, LCC and mean absolute error on feature rows."""
    was_training = net.training
    net.eval()
    pred = net(torch.from_numpy(x)).numpy()
    net.train(was_training)
    return {"srocc": srocc(pred, y), "lcc": lcc(pred, y), "mae": float(np.mean(np.abs(pred - y)))}
