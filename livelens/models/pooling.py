"""Global pooling layers, chosen by string; each reports its output width.

All poolings map a feature map (B, C, H, W) to a vector (B, D) for any H, W, and are
differentiable in the feature map, so Grad-CAM works through every one of them.

- ``avg``, ``max``: the usual.
- ``gated``: gated max-average pooling (Lee, Gallagher & Tu, "Generalizing Pooling Functions
  in CNNs: Mixed, Gated, and Tree", AISTATS 2016). A learned gate, computed from the pooled
  region itself, mixes max and average per sample and channel.
- ``tree``: tree pooling (same paper): learned pooling filters at the leaves of a binary
  tree, combined by learned gates at its internal nodes.
- ``bilinear``: bilinear pooling (Lin, RoyChowdhury & Maji, "Bilinear CNN Models for
  Fine-grained Visual Recognition", ICCV 2015): the average outer product of two feature
  streams, then signed square root and L2 normalisation. Width C² (or d² after reduction).
- ``compact_bilinear``: Tensor Sketch (Gao, Beijbom, Zhang & Darrell, "Compact Bilinear
  Pooling", CVPR 2016): a d-dimensional random projection whose inner products approximate
  those of full bilinear features, at a fraction of the width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from livelens.errors import ConfigError
from livelens.registry import Registry


class AvgPool(nn.Module):
    """Global average pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class MaxPool(nn.Module):
    """Global max pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


class AvgMaxPool(nn.Module):
    """Global average and global max pooling, concatenated (2 × channels).

    The average speaks for what covers the frame, the maximum for what one cell shows strongly:
    a small overlay (a QR code in a corner) barely moves the average of a 7×7 map.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def _positive_int(value: object, what: str) -> int:
    """``value`` as an int >= 1, or a ConfigError naming the option (configs arrive as JSON)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _region(x: torch.Tensor, grid: int) -> torch.Tensor:
    """The pooling region on a fixed grid, (B, C, grid²), so learned masks fit any input size."""
    return F.adaptive_avg_pool2d(x, grid).flatten(2)


class GatedPool(nn.Module):
    """Gated max-average pooling over the whole map.

    ``f(x) = σ(ωᵀx) · max(x) + (1 − σ(ωᵀx)) · avg(x)`` where ``ωᵀx`` is a learned mask
    over the region (on a ``grid``×``grid`` summary, shared by all channels, as in the
    paper's "one gate per layer" variant, plus a per-channel bias).

    Args:
        channels: Input channels.
        grid: Size of the region summary the gating mask sees.
    """

    def __init__(self, channels: int, grid: int = 4):
        super().__init__()
        self.grid = grid = _positive_int(grid, "gated pooling grid")
        self.mask = nn.Parameter(torch.zeros(grid * grid))
        self.bias = nn.Parameter(torch.zeros(channels))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate σ(ωᵀx), (B, C)."""
        return torch.sigmoid(_region(x, self.grid) @ self.mask + self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        return g * x.amax(dim=(2, 3)) + (1.0 - g) * x.mean(dim=(2, 3))


class GatedPool2d(nn.Module):
    """Local gated max-average pooling (2×2, stride 2 by default), a drop-in for ``nn.MaxPool2d``.

    The paper's layer as used *inside* a network: for every pooling region the gate
    ``σ(ωᵀx)`` is computed from that region's own values (ω is a learned ``k×k`` mask,
    shared by all channels — one gate mask per layer), and mixes the region's max and average.

    Args:
        kernel_size: Side of the pooling region.
        stride: Step between regions (defaults to ``kernel_size``).
    """

    def __init__(self, kernel_size: int = 2, stride: int | None = None):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride or kernel_size
        self.mask = nn.Parameter(torch.zeros(1, 1, kernel_size, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # The same region mask for every channel: a grouped conv with shared weights is ωᵀx per region.
        gate = torch.sigmoid(F.conv2d(x.reshape(b * c, 1, h, w), self.mask, stride=self.stride))
        gate = gate.reshape(b, c, *gate.shape[-2:])
        mx = F.max_pool2d(x, self.kernel_size, self.stride)
        av = F.avg_pool2d(x, self.kernel_size, self.stride)
        return gate * mx + (1.0 - gate) * av


def replace_max_pooling(module: nn.Module) -> int:
    """Swap every ``nn.MaxPool2d`` in ``module`` (e.g. ResNet's stem) for :class:`GatedPool2d`.

    Returns:
        How many layers were replaced.
    """
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.MaxPool2d):
            k = child.kernel_size if isinstance(child.kernel_size, int) else child.kernel_size[0]
            s = child.stride if isinstance(child.stride, int) else child.stride[0]
            if child.padding not in (0, (0, 0)):
                # Padded max pooling (ResNet's 3×3/2 stem) keeps its geometry with a padded gated pool.
                setattr(module, name, nn.Sequential(nn.ZeroPad2d(child.padding if isinstance(child.padding, int)
                                                                 else child.padding[0]), GatedPool2d(k, s)))
            else:
                setattr(module, name, GatedPool2d(k, s))
            count += 1
        else:
            count += replace_max_pooling(child)
    return count


class TreePool(nn.Module):
    """Tree pooling: learned pooling filters at the leaves, learned gates inside.

    A complete binary tree of ``depth`` levels has 2^(depth-1) leaves. Leaf m pools the
    region with a learned filter ``v_mᵀx``; each internal node j mixes its children with
    ``σ(ω_jᵀx)``. Leaves start as average pooling with small distinct perturbations, so the
    layer begins as avg pooling and learns from there.

    Args:
        channels: Input channels.
        depth: Tree depth (2 → 2 leaves and 1 gate; 3 → 4 leaves and 3 gates).
        grid: Size of the region summary the filters see.
    """

    def __init__(self, channels: int, depth: int = 2, grid: int = 4):
        super().__init__()
        if _positive_int(depth, "tree pooling depth") < 2:
            raise ConfigError(f"tree pooling needs depth ≥ 2, got {depth}")
        grid = _positive_int(grid, "tree pooling grid")
        self.depth, self.grid = depth, grid
        n_leaves, n_nodes = 2 ** (depth - 1), 2 ** (depth - 1) - 1
        g = torch.Generator().manual_seed(0)
        leaves = torch.full((n_leaves, grid * grid), 1.0 / (grid * grid))
        self.leaves = nn.Parameter(leaves + 0.01 * torch.randn(leaves.shape, generator=g))
        self.gates = nn.Parameter(torch.zeros(n_nodes, grid * grid))
        self.gate_bias = nn.Parameter(torch.zeros(n_nodes, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = _region(x, self.grid)  # (B, C, R)
        values = list((r @ self.leaves.t()).unbind(-1))  # leaf responses, (B, C) each
        node = len(self.gates) - 1
        # Combine bottom-up: each level halves the list; node indices run from the root (0) down.
        while len(values) > 1:
            merged = []
            for i in range(len(values) - 2, -1, -2):
                gate = torch.sigmoid(r @ self.gates[node] + self.gate_bias[node])
                merged.append(gate * values[i] + (1.0 - gate) * values[i + 1])
                node -= 1
            values = merged[::-1]
        return values[0]


def signed_sqrt_l2(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Signed square root then L2 normalisation, the B-CNN normalisation."""
    z = torch.sign(z) * torch.sqrt(z.abs() + eps)
    return F.normalize(z, dim=1)


class BilinearPool(nn.Module):
    """Bilinear pooling: ``vec(1/N Σ_n a_n b_nᵀ)``, signed sqrt, L2 normalisation.

    With ``two_stream`` the two feature extractors of a B-CNN are two learned 1×1
    projections of the shared backbone map (cheap, and the outer product is asymmetric);
    otherwise the stream is used with itself (symmetric B-CNN).

    Args:
        channels: Input channels C.
        reduce_dim: Project to this many channels first (1×1 conv + BN + ReLU); the width
            becomes reduce_dim², which keeps 1280-channel backbones tractable (1280² ≈ 1.6 M).
            0 or None keeps C (through :func:`create_pool`, which drops None options, pass 0).
        two_stream: Use two different projections (needs ``reduce_dim``).
        normalize: Apply signed sqrt and L2 normalisation.
    """

    def __init__(self, channels: int, reduce_dim: int | None = 64, two_stream: bool = False, normalize: bool = True):
        super().__init__()
        reduce_dim = _positive_int(reduce_dim, "bilinear reduce_dim") if reduce_dim else None
        if two_stream and reduce_dim is None:
            raise ConfigError("two_stream bilinear pooling needs reduce_dim")
        self.normalize = normalize
        self.dim = reduce_dim or channels

        def proj() -> nn.Module:
            return nn.Sequential(nn.Conv2d(channels, self.dim, 1, bias=False), nn.BatchNorm2d(self.dim), nn.ReLU())

        self.proj_a = proj() if reduce_dim else nn.Identity()
        self.proj_b = proj() if two_stream else None

    @property
    def out_features(self) -> int:
        return self.dim * self.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.proj_a(x).flatten(2)  # (B, d, N)
        b = self.proj_b(x).flatten(2) if self.proj_b is not None else a
        z = torch.bmm(a, b.transpose(1, 2)) / a.shape[-1]  # (B, d, d)
        z = z.flatten(1)
        return signed_sqrt_l2(z) if self.normalize else z


class CompactBilinearPool(nn.Module):
    """Compact bilinear pooling with Tensor Sketch.

    Each location's feature x is count-sketched twice, ``Ψ_k(x)[h_k(c)] += s_k(c) x_c``, and
    ``TS(x) = IFFT(FFT(Ψ_1(x)) ∘ FFT(Ψ_2(x)))``; the sketches are averaged over locations.
    ``E⟨TS(x), TS(y)⟩ = ⟨x, y⟩²``, so inner products approximate those of full bilinear
    pooling. The hash functions are fixed random buffers (saved with the model).

    Args:
        channels: Input channels C.
        sketch_dim: Output width d.
        normalize: Apply signed sqrt and L2 normalisation.
        seed: Seed of the hash functions.
    """

    def __init__(self, channels: int, sketch_dim: int = 2048, normalize: bool = True, seed: int = 0):
        super().__init__()
        sketch_dim = _positive_int(sketch_dim, "compact bilinear sketch_dim")
        self.sketch_dim, self.normalize = sketch_dim, normalize
        g = torch.Generator().manual_seed(seed)
        for k in (1, 2):
            h = torch.randint(sketch_dim, (channels,), generator=g)
            s = torch.randint(2, (channels,), generator=g).float() * 2 - 1
            sketch = torch.zeros(channels, sketch_dim)
            sketch[torch.arange(channels), h] = s
            self.register_buffer(f"sketch{k}", sketch)

    @property
    def out_features(self) -> int:
        return self.sketch_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = x.flatten(2).transpose(1, 2).float()  # (B, N, C); FFTs want fp32 under autocast
        f1 = torch.fft.rfft(feats @ self.sketch1, dim=-1)
        f2 = torch.fft.rfft(feats @ self.sketch2, dim=-1)
        z = torch.fft.irfft(f1 * f2, n=self.sketch_dim, dim=-1).mean(dim=1)
        return signed_sqrt_l2(z) if self.normalize else z


def _no_options(module: type[nn.Module]):
    def build(channels: int, **kw) -> tuple[nn.Module, int]:
        if kw:
            raise ConfigError(f"{module.__name__} takes no options, got {sorted(kw)}")
        return module(), channels

    return build


#: Pooling builders by name: ``(channels, **options) -> (module, output width)``.
POOL_BUILDERS: Registry = Registry("pooling")
POOL_BUILDERS.register("avg", _no_options(AvgPool))
POOL_BUILDERS.register("max", _no_options(MaxPool))
POOL_BUILDERS.register("avgmax", lambda channels, **kw: (_no_options(AvgMaxPool)(channels, **kw)[0], 2 * channels))
POOL_BUILDERS.register("gated", lambda channels, **kw: (GatedPool(channels, **kw), channels))
POOL_BUILDERS.register("tree", lambda channels, **kw: (TreePool(channels, **kw), channels))
POOL_BUILDERS.register("bilinear", lambda channels, **kw: _with_width(BilinearPool(channels, **kw)))
POOL_BUILDERS.register("compact_bilinear", lambda channels, **kw: _with_width(CompactBilinearPool(channels, **kw)))
POOLS = tuple(POOL_BUILDERS.names())


def create_pool(kind: str, channels: int, **kw) -> tuple[nn.Module, int]:
    """Build a pooling layer by name.

    Args:
        kind: One of :data:`POOLS`.
        channels: Channels of the feature map it pools.
        **kw: Options of that pooling (``grid``, ``depth``, ``reduce_dim``, ``two_stream``,
            ``sketch_dim``, ``normalize``); None values fall back to its defaults.

    Returns:
        The module and its output width, so a head never has to guess it.

    Raises:
        ConfigError: Unknown kind or options.
    """
    kw = {k: v for k, v in kw.items() if v is not None}
    build = POOL_BUILDERS.get(kind)
    try:
        return build(channels, **kw)
    except TypeError as exc:
        raise ConfigError(f"bad options for {kind} pooling: {exc}") from exc


def _with_width(module: BilinearPool | CompactBilinearPool) -> tuple[nn.Module, int]:
    return module, module.out_features


def bilinear_reference(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Direct bilinear features ``vec(1/N Σ_n x_n y_nᵀ)`` by explicit loops, for tests."""
    y = x if y is None else y
    b, c, h, w = x.shape
    out = torch.zeros(b, c * y.shape[1], dtype=x.dtype)
    for i in range(b):
        acc = torch.zeros(c, y.shape[1], dtype=x.dtype)
        for r in range(h):
            for s in range(w):
                acc += torch.outer(x[i, :, r, s], y[i, :, r, s])
        out[i] = (acc / (h * w)).flatten()
    return out


def expected_sketch_error(sketch_dim: int) -> float:
    """Rough relative standard error of Tensor Sketch inner products, ~sqrt(2/d)."""
    return math.sqrt(2.0 / sketch_dim)
