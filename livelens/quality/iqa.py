"""Learned no-reference image quality (NR-IQA): natural-scene-statistics features + a small MLP.

The design follows the BRISQUE/CORNIA line: distortions change the statistics of locally
contrast-normalised (MSCN) luminance in characteristic ways. Each frame becomes a
:data:`N_FEATURES`-vector — MSCN moments and neighbour-product moments at three scales (BRISQUE-style)
plus the classical measures (directional Crete blur, Laplacian variance, noise sigma,
blockiness, luminance statistics, gradient/spectral sharpness, colourfulness) — and an ensemble of five small MLPs regresses the score in [0, 100]
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
        members: Independently initialised MLPs whose scores are averaged. One MLP's held-out
            SROCC varied by ±0.02 between seeds here; the average of five is steadier and higher.
        side: Long side the frame is resized to before features are computed.
    """

    in_features: int = 0
    hidden: int = 64
    members: int = 5
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


def _sharpness(gray: np.ndarray, half: np.ndarray) -> list[float]:
    """Gradient and spectrum statistics: blur and JPEG remove high frequencies at different rates.

    Sobel magnitude percentiles (log), the share of spectral power beyond a quarter and half of
    the Nyquist radius (log), and the Laplacian energy ratio between full and half resolution.
    """
    g = gray.astype(np.float32)
    mag = cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3))
    grads = [float(np.log1p(v)) for v in np.percentile(mag, [50, 90, 99])]
    win = np.outer(np.hanning(g.shape[0]), np.hanning(g.shape[1])).astype(np.float32)
    power = np.abs(np.fft.fftshift(np.fft.fft2((g - g.mean()) * win))) ** 2
    h, w = power.shape
    yy, xx = np.ogrid[-(h // 2) : h - h // 2, -(w // 2) : w - w // 2]
    radius = np.sqrt((yy / (h / 2)) ** 2 + (xx / (w / 2)) ** 2)
    total = float(power.sum()) + 1e-8
    spectral = [float(np.log10(power[radius > r].sum() / total + 1e-10)) for r in (0.25, 0.5)]
    lap_half = cv2.Laplacian(half.astype(np.float32), cv2.CV_32F).var()
    ratio = np.log10((cv2.Laplacian(g, cv2.CV_32F).var() + 1e-3) / (lap_half + 1e-3))
    return grads + spectral + [float(ratio)]


def _colour(rgb: np.ndarray, gray: np.ndarray) -> list[float]:
    """Luminance entropy, saturation mean/std and Hasler–Süsstrunk colourfulness.

    Over- and under-exposure wash colours out and collapse the histogram before pixels clip.
    """
    hist = np.bincount(gray.reshape(-1), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum()) / 8.0
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32) / 255.0
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    colourful = (np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)) / 100.0
    return [entropy, float(sat.mean()), float(sat.std()), float(colourful)]


def _exposure_flat(rgb: np.ndarray, gray: np.ndarray) -> list[float]:
    """Exposure and flat-region statistics.

    Over-exposure lifts the *dark channel* (the 7×7 minimum of min(R, G, B)), which stays near 0 in
    almost every well-exposed natural photo (He et al.'s dark-channel prior); under-exposure pulls
    the bright channel down. Occluders (blocks, stickers, an out-of-focus hand) are large
    texture-free regions, so the flat share and the largest flat component grow with their size.
    """
    k = np.ones((7, 7), np.uint8)
    dark = cv2.erode(rgb.min(axis=2), k).astype(np.float32) / 255.0
    bright = cv2.dilate(rgb.max(axis=2), k).astype(np.float32) / 255.0
    g = gray.astype(np.float32) / 255.0
    local_std = np.sqrt(np.maximum(cv2.blur(g * g, (7, 7)) - cv2.blur(g, (7, 7)) ** 2, 0.0))
    flat = (local_std < 0.008).astype(np.uint8)
    n, _labels, stats, _ = cv2.connectedComponentsWithStats(flat, connectivity=4)
    largest = float(stats[1:, cv2.CC_STAT_AREA].max()) / flat.size if n > 1 else 0.0
    return [float(dark.mean()), *np.percentile(dark, [10, 50]).tolist(), *np.percentile(bright, [10, 50]).tolist(),
            float((rgb.max(axis=2) >= 250).mean()), *np.percentile(g, [1, 99]).tolist(), float(flat.mean()),
            largest, float(np.log(local_std.mean() + 1e-4))]


def features(image: Any, side: int = IQA_SIDE) -> np.ndarray:
    """The NR-IQA feature vector of one image (float32, length :data:`N_FEATURES`)."""
    rgb = m._resize_long(m.to_rgb(image), side)
    if min(rgb.shape[:2]) < 16:
        # Too small for neighbourhood statistics: upscale so every input gets a defined score.
        rgb = cv2.resize(rgb, (max(16, rgb.shape[1]), max(16, rgb.shape[0])), interpolation=cv2.INTER_LINEAR)
    gray = m.luminance(rgb)
    half = cv2.resize(gray, (max(8, gray.shape[1] // 2), max(8, gray.shape[0] // 2)), interpolation=cv2.INTER_AREA)
    quarter = cv2.resize(half, (max(8, half.shape[1] // 2), max(8, half.shape[0] // 2)), interpolation=cv2.INTER_AREA)
    crete = m.crete_blur(gray)
    g = gray.astype(np.float32) / 255.0
    lum = [float(g.mean()), float(g.std()), *np.percentile(g, [5, 50, 95]).tolist(),
           float((g < 0.02).mean()), float((g > 0.98).mean())]
    classical = [*crete.values(), float(np.log10(m.laplacian_variance(gray) + 1.0)),
                 m.noise(gray)["sigma"] / 25.0, m.blockiness(gray)["ratio"]]
    return np.asarray(_nss(gray) + _nss(half) + _nss(quarter) + classical + lum + _sharpness(gray, half)
                      + _colour(rgb, gray) + _exposure_flat(rgb, gray), np.float32)


N_FEATURES = 3 * (4 + 2 * len(_PAIRS)) + 7 + 7 + 6 + 4 + 11


class IqaNet(nn.Module):
    """Standardise features → an ensemble of small MLPs → mean score in [0, 100].

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
        h = self.arch.hidden
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(n, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
            for _ in range(max(1, self.arch.members)))

    def set_normaliser(self, x: np.ndarray) -> None:
        """Fit the feature standardisation on training features (N, F)."""
        self.feat_mean.copy_(torch.from_numpy(x.mean(0).astype(np.float32)))
        self.feat_std.copy_(torch.from_numpy(x.std(0).astype(np.float32) + 1e-6))

    def member_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's scores (M, B) in [0, 100] from features (B, F)."""
        z = ((x - self.feat_mean) / self.feat_std).clamp(-8.0, 8.0)
        return 100.0 * torch.stack([torch.sigmoid(m(z).squeeze(1)) for m in self.mlps])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B,) in [0, 100] from features (B, F): the members' mean."""
        return self.member_scores(x).mean(0)


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
    """L1 between predicted and reference score (robust to a few odd references).

    Each ensemble member is fitted to the reference on its own (the mean of per-member losses),
    not the average to it, so the members stay independent estimates and averaging cuts variance.
    """
    net = model.module if hasattr(model, "module") else model  # DDP wraps the net
    scores = net.member_scores(batch["x"])
    return torch.nn.functional.l1_loss(scores, batch["y"].expand_as(scores))


@torch.no_grad()
def evaluate_features(net: IqaNet, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """SROCC, LCC and mean absolute error on feature rows."""
    was_training = net.training
    net.eval()
    pred = net(torch.from_numpy(x)).numpy()
    net.train(was_training)
    return {"srocc": srocc(pred, y), "lcc": lcc(pred, y), "mae": float(np.mean(np.abs(pred - y)))}
