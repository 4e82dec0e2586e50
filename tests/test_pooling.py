"""Pooling layers: widths, gradients, and the reference math of each paper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from livelens.errors import ConfigError
from livelens.models import list_pools
from livelens.models.pooling import (
    BilinearPool,
    CompactBilinearPool,
    GatedPool,
    GatedPool2d,
    TreePool,
    bilinear_reference,
    create_pool,
    expected_sketch_error,
    replace_max_pooling,
)


@pytest.mark.parametrize("kind", list_pools())
@pytest.mark.parametrize("hw", [(5, 7), (1, 1)])
def test_pool_width_and_gradient(kind: str, hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    pool, width = create_pool(kind, 16, reduce_dim=6 if kind == "bilinear" else None,
                              sketch_dim=128 if kind == "compact_bilinear" else None)
    x = torch.randn(3, 16, *hw, requires_grad=True)
    z = pool(x)
    assert z.shape == (3, width)
    assert torch.isfinite(z).all()
    z.pow(2).sum().backward()
    # Grad-CAM needs the gradient at the feature map.
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_reported_widths() -> None:
    assert create_pool("avg", 1280)[1] == 1280
    assert create_pool("gated", 512)[1] == 512
    assert create_pool("bilinear", 1280, reduce_dim=64)[1] == 64 * 64
    assert create_pool("bilinear", 32, reduce_dim=0)[1] == 32 * 32
    assert create_pool("compact_bilinear", 1280, sketch_dim=8192)[1] == 8192


def test_bilinear_matches_explicit_outer_products() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    raw = BilinearPool(8, reduce_dim=None, normalize=False).double()(x)
    ref = bilinear_reference(x)
    torch.testing.assert_close(raw, ref)
    # Signed square root, then L2 normalisation, written out element by element.
    signed = torch.tensor([[math.copysign(math.sqrt(abs(v)), v) for v in row] for row in ref.tolist()],
                          dtype=torch.float64)
    expected = signed / signed.norm(dim=1, keepdim=True)
    got = BilinearPool(8, reduce_dim=None).double()(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_two_stream_bilinear_is_outer_product_of_two_projections() -> None:
    torch.manual_seed(2)
    pool = BilinearPool(8, reduce_dim=4, two_stream=True, normalize=False).eval()
    x = torch.randn(2, 8, 3, 3)
    ref = bilinear_reference(pool.proj_a(x), pool.proj_b(x))
    torch.testing.assert_close(pool(x), ref, atol=1e-5, rtol=1e-5)


def test_compact_bilinear_approximates_bilinear_inner_products() -> None:
    """Tensor Sketch: ⟨TS(x), TS(y)⟩ estimates ⟨B(x), B(y)⟩ with error ~ sqrt(2/d)·‖B(x)‖‖B(y)‖."""
    torch.manual_seed(0)
    channels, d = 32, 4096
    x = torch.randn(8, channels, 3, 3)
    full = bilinear_reference(x)
    sigma = expected_sketch_error(d)
    errors = []
    for seed in range(3):
        sketch = CompactBilinearPool(channels, sketch_dim=d, normalize=False, seed=seed)(x)
        for i in range(0, 8, 2):
            approx = float(sketch[i] @ sketch[i + 1])
            exact = float(full[i] @ full[i + 1])
            errors.append((approx - exact) / (float(full[i].norm() * full[i + 1].norm()) * sigma))
    # Each error is within 4 standard errors, and they average out (the sketch is unbiased).
    assert max(abs(e) for e in errors) < 4.0, errors
    assert abs(sum(errors) / len(errors)) < 1.5, errors
    # And a sketch of a vector with itself recovers the squared norm closely.
    self_sketch = CompactBilinearPool(channels, sketch_dim=d, normalize=False)(x)
    ratio = (self_sketch.pow(2).sum(1) / full.pow(2).sum(1))
    assert torch.all((ratio - 1).abs() < 4 * sigma * 2), ratio


def test_gated_pool_interpolates_between_max_and_avg() -> None:
    x = torch.rand(2, 4, 6, 6)
    pool = GatedPool(4)
    mx, av = x.amax(dim=(2, 3)), x.mean(dim=(2, 3))
    torch.testing.assert_close(pool(x), 0.5 * mx + 0.5 * av)  # zero mask → σ(0) = ½
    with torch.no_grad():
        pool.bias.fill_(50.0)
    torch.testing.assert_close(pool(x), mx)
    with torch.no_grad():
        pool.bias.fill_(-50.0)
    torch.testing.assert_close(pool(x), av)
    # The gate depends on the region's content through the learned mask.
    with torch.no_grad():
        pool.bias.zero_()
        pool.mask.fill_(1.0)
    assert not torch.allclose(pool.gate(x), pool.gate(2 * x))


def test_local_gated_pool_and_stem_replacement() -> None:
    x = torch.rand(2, 3, 8, 8)
    pool = GatedPool2d(2)
    out = pool(x)
    assert out.shape == (2, 3, 4, 4)
    torch.testing.assert_close(out, 0.5 * F.max_pool2d(x, 2) + 0.5 * F.avg_pool2d(x, 2))
    with torch.no_grad():
        pool.mask.fill_(100.0)  # positive inputs → gate ≈ 1 → max pooling
    torch.testing.assert_close(pool(x + 0.1), F.max_pool2d(x + 0.1, 2))
    import torchvision

    net = torchvision.models.resnet18(num_classes=3)
    assert replace_max_pooling(net) == 1
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, 3)


def test_tree_pool_starts_near_avg_and_learns_filters() -> None:
    x = torch.rand(2, 5, 8, 8)
    for depth in (2, 3):
        pool = TreePool(5, depth=depth)
        assert pool.leaves.shape[0] == 2 ** (depth - 1) and pool.gates.shape[0] == 2 ** (depth - 1) - 1
        with torch.no_grad():
            pool.leaves.fill_(1.0 / 16)  # uniform leaf filters on the 4×4 grid = average pooling
        torch.testing.assert_close(pool(x), x.mean(dim=(2, 3)))
    # Gates route between different leaves: a leaf that looks at one corner only wins with a big gate.
    pool = TreePool(5, depth=2)
    with torch.no_grad():
        pool.leaves.zero_()
        pool.leaves[0, 0] = 1.0
        pool.gate_bias.fill_(50.0)
    torch.testing.assert_close(pool(x), F.adaptive_avg_pool2d(x, 4).flatten(2)[..., 0])
    with pytest.raises(ConfigError):
        TreePool(5, depth=1)


def test_bad_pool_configs_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown pooling"):
        create_pool("median", 8)
    with pytest.raises(ConfigError, match="bad options"):
        create_pool("gated", 8, sketch_dim=4)
    with pytest.raises(ConfigError, match="no options"):
        create_pool("avg", 8, grid=2)
    with pytest.raises(ConfigError):
        create_pool("bilinear", 8, reduce_dim=0, two_stream=True)
