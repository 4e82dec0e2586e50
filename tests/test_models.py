"""The model factory: every backbone × pooling, heads, losses, ImageNet weights offline, store round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from livelens.errors import ConfigError
from livelens.models import (
    HeadSpec,
    create_model,
    factory,
    heads_from_taxonomy,
    list_models,
    list_pools,
    multitask_loss,
    predict,
    preprocess,
)
from livelens.models.io import load_from_store, save_to_store
from livelens.store import ModelStore
from livelens.taxonomy import load_taxonomy

# Class counts other than any default, and one head of each kind.
HEADS = {"exclusive": HeadSpec("softmax", ("none", "a", "b")),
         "overlay": HeadSpec("sigmoid", ("none", "qr", "phone", "url", "logo"))}
# Small pooled widths keep 18 builds fast; the defaults are covered in test_pooling.
POOL_KW = {"bilinear": {"reduce_dim": 8}, "compact_bilinear": {"sketch_dim": 256}, "tree": {"depth": 3}}


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache, so nothing but ensure_offline_weights can put weights there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_names() -> None:
    assert {"mobilenet_v2", "resnet18", "resnet50"} <= set(list_models())
    assert list_pools() == ["avg", "max", "avgmax", "gated", "tree", "bilinear", "compact_bilinear"]


@pytest.mark.parametrize("pool", list_pools())
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "resnet50"])
def test_backbone_x_pool_builds_trains_and_every_parameter_gets_a_gradient(name: str, pool: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, pool, heads=HEADS, **POOL_KW.get(pool, {}))
    assert model.backbone_name == name and model.pool_name == pool
    assert model.default_cfg["input_size"] == (3, 224, 224)
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.ndim == 4 and feats.shape[:2] == (2, model.feature_channels)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    logits = model(x)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"exclusive": (2, 3), "overlay": (2, 5)}
    assert all(torch.isfinite(v).all() for v in logits.values())
    targets = {"exclusive": torch.tensor([0, 2]), "overlay": torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 0.]])}
    total, per_head = multitask_loss(logits, targets, model.heads)
    assert set(per_head) == {"exclusive", "overlay"} and torch.isfinite(total)
    total.backward()
    # DDP fails on parameters outside the graph; every one must receive a gradient.
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_num_classes_means_one_softmax_head() -> None:
    model = create_model("mobilenet_v2", num_classes=7)
    assert list(model.heads) == ["main"] and model.heads["main"].kind == "softmax"
    assert model(torch.randn(2, 3, 32, 32))["main"].shape == (2, 7)


def test_taxonomy_heads_match_the_taxonomy() -> None:
    tax = load_taxonomy()
    heads = heads_from_taxonomy(tax)
    assert {k: len(v.classes) for k, v in heads.items()} == tax.head_sizes()
    for name, spec in heads.items():
        group = tax.groups[name]
        assert spec.kind == ("softmax" if group.kind == "exclusive" else "sigmoid")
        assert spec.classes[0] == group.negative
    model = create_model("mobilenet_v2", "gated", taxonomy=tax, groups=["porn", "ads"])
    out = model(torch.randn(2, 3, 32, 32))
    assert {k: v.shape[1] for k, v in out.items()} == {"porn": tax.head_sizes()["porn"], "ads": tax.head_sizes()["ads"]}


def test_bad_configs_fail_before_the_backbone_is_built(monkeypatch) -> None:
    def must_not_build(pretrained: bool):
        raise AssertionError("the backbone was built before the config was checked")

    monkeypatch.setitem(factory.BACKBONES._items, "resnet50", factory.BackboneSpec(must_not_build, 2048))
    tax = load_taxonomy()
    bad = [
        dict(pool="median", num_classes=3),
        dict(pool="avg"),  # no heads at all
        dict(pool="avg", num_classes=1),
        dict(pool="avg", taxonomy=tax, groups=["porn", "not_a_group"]),
        dict(pool="avg", taxonomy={"porn": 3}),
        dict(pool="avg", num_classes=3, heads=HEADS),
        dict(pool="gated", num_classes=3, grid="x", depth=3),
        dict(pool="avg", heads={"h": {"kind": "softmax_ish", "classes": ["a", "b"]}}),
    ]
    for kw in bad:
        with pytest.raises(ConfigError):
            create_model("resnet50", **kw)
    with pytest.raises(ConfigError, match="unknown backbone 'vit_giant'"):
        create_model("vit_giant", num_classes=3)


def test_name_tables_reject_duplicates_and_unknown_names() -> None:
    from livelens.models.pooling import POOL_BUILDERS
    from livelens.ocr.engine import ENGINES
    from livelens.ocr.mm_configs import DETECTORS, RECOGNIZERS

    for table, name in ((factory.BACKBONES, "resnet18"), (POOL_BUILDERS, "gated"), (DETECTORS, "dbnet_resnet18_fpnc"),
                        (RECOGNIZERS, "crnn_minivgg"), (ENGINES, "ppocr")):
        with pytest.raises(ValueError, match="already registered"):
            table.register(name, table.get(name))
        with pytest.raises(ConfigError, match=f"unknown {table.kind} 'nope'; choose one of .*{name}"):
            table.get("nope")


def test_check_model_dry_builds_the_pooling_at_the_backbone_width(monkeypatch) -> None:
    def must_not_build(pretrained: bool):
        raise AssertionError("a dry check built the backbone")

    monkeypatch.setitem(factory.BACKBONES._items, "resnet50", factory.BackboneSpec(must_not_build, 2048))
    assert factory.check_model("resnet50", "avg") == 2048
    assert factory.check_model("resnet50", "bilinear", reduce_dim=64) == 64 * 64
    assert factory.check_model("resnet50", "compact_bilinear", sketch_dim=512) == 512
    for pool, kw in (("gated", {"grid": 0}), ("tree", {"depth": "three"}), ("avg", {"grid": 4}),
                     ("compact_bilinear", {"sketchdim": 512}), ("median", {})):
        with pytest.raises(ConfigError):
            factory.check_model("resnet50", pool, **kw)


def test_multitask_loss_weights_and_predict() -> None:
    torch.manual_seed(0)
    logits = {"exclusive": torch.randn(4, 3), "overlay": torch.randn(4, 5)}
    targets = {"exclusive": torch.tensor([0, 1, 2, 1]), "overlay": (torch.rand(4, 5) > 0.5).float()}
    total, per = multitask_loss(logits, targets, HEADS, weights={"exclusive": 2.0, "overlay": 0.5})
    ce = torch.nn.functional.cross_entropy(logits["exclusive"], targets["exclusive"])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits["overlay"], targets["overlay"])
    torch.testing.assert_close(per["exclusive"], ce)
    torch.testing.assert_close(total, 2.0 * ce + 0.5 * bce)
    # A head without targets in this batch is left out rather than failing.
    only, per_only = multitask_loss(logits, {"overlay": targets["overlay"]}, HEADS)
    assert list(per_only) == ["overlay"] and torch.equal(only, per_only["overlay"])
    with pytest.raises(ConfigError):
        multitask_loss(logits, {}, HEADS)

    model = create_model("resnet18", "max", heads=HEADS).train()
    probs = predict(model, torch.randn(2, 3, 32, 32))
    assert model.training  # restored
    torch.testing.assert_close(probs["exclusive"].sum(1), torch.ones(2))
    assert ((probs["overlay"] > 0) & (probs["overlay"] < 1)).all()


def test_reset_classifier_keeps_backbone() -> None:
    model = create_model("resnet18", num_classes=4)
    before = model.backbone.conv1.weight.clone()
    model.reset_classifier(num_classes=6, pool="bilinear", reduce_dim=4)
    assert model.num_features == 16 and model(torch.randn(2, 3, 32, 32))["main"].shape == (2, 6)
    assert torch.equal(model.backbone.conv1.weight, before)


def test_preprocess_matches_default_cfg() -> None:
    frame = np.full((90, 160, 3), 255, np.uint8)
    x = preprocess([frame, frame[:, :80]], 64)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    expected = (1.0 - torch.tensor(factory.IMAGENET_MEAN)) / torch.tensor(factory.IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 10, 10], expected)


def test_mobilenet_imagenet_weights_load_offline_and_are_real(hub_dir) -> None:
    from skimage import data

    assert not hub_dir.exists()
    model = create_model("mobilenet_v2", num_classes=3, pretrained=True)
    assert (hub_dir / "mobilenet_v2-b0353104.pth").is_file()
    # The real ImageNet classifier on the same backbone calls skimage's chelsea a cat (281–285).
    import torchvision

    reference = torchvision.models.mobilenet_v2(weights=torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1).eval()
    for a, b in zip(model.backbone.state_dict().values(), reference.features.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x = preprocess([data.chelsea()], 224)
    with torch.inference_mode():
        top = int(reference(x).argmax())
        pooled = model.eval().forward_head(model.forward_features(x), pre_logits=True)
        top_via_ours = int(reference.classifier(pooled).argmax())
    assert 281 <= top <= 285, top
    assert top_via_ours == top  # our backbone + avg pooling is exactly torchvision's trunk


def test_resnet_without_offline_weights_is_a_config_error(hub_dir) -> None:
    with pytest.raises(ConfigError, match="no offline ImageNet weights"):
        create_model("resnet18", num_classes=3, pretrained=True)
    create_model("resnet18", num_classes=3, pretrained=False)  # random init stays available


def test_store_round_trip_full(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", "compact_bilinear", heads=HEADS, sketch_dim=128).eval()
    store = ModelStore(tmp_path / "store")
    ref = save_to_store(store, "safety", model, {"task": "safety"})
    card = store.card(ref)
    assert card["arch"]["pool"] == "compact_bilinear" and card["arch"]["pool_kw"] == {"sketch_dim": 128}
    assert card["arch"]["heads"]["overlay"] == {"kind": "sigmoid", "classes": list(HEADS["overlay"].classes)}
    loaded = load_from_store(store, ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        a, b = model(x), loaded(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_store_round_trip_head_only(tmp_path, hub_dir) -> None:
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", "gated", heads=HEADS, pretrained=True).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.1)
    store = ModelStore(tmp_path / "store")
    ref = save_to_store(store, "safety", model, {"state": "head_only", "backbone_weights": "imagenet"})
    stored = store.load(ref)
    assert not any(k.startswith("backbone.") for k in stored.state_dict)
    size = sum(v.numel() * v.element_size() for v in stored.state_dict.values())
    assert size < 100_000, size  # the 14 MB backbone is not shipped
    loaded = load_from_store(store, ref)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x)["overlay"], loaded(x)["overlay"])
    # A backbone that drifted from ImageNet (BatchNorm statistics updated) cannot be saved head-only.
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ConfigError, match="head_only"):
        save_to_store(store, "safety", model, {}, head_only=True)
