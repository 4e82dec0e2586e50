"""Evidence: Grad-CAM finds a planted patch, weak boxes, the 1.5× second pass, evidence-keeping crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from livelens.errors import InvalidArgumentError
from livelens.evidence import (
    EvidenceCrop,
    box_iou,
    boxes_from_heatmap,
    expand_box,
    grad_cam,
    merge_passes,
    second_pass,
)
from livelens.models import Classifier, HeadSpec, create_model, list_pools, predict, preprocess
from livelens.models.factory import Backbone

SIZE = 64
PATCH = 16
STEPS, BATCH = 30, 16


def _small_backbone() -> Backbone:
    """A 4-layer CNN with output stride 4: a 16×16 map at 64 px, fine enough to localise a patch."""
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU()]

    layers = block(3, 16, 1) + block(16, 32, 2) + block(32, 32, 2) + block(32, 32, 1)
    return Backbone(nn.Sequential(*layers), 32)


def _scene(rng: np.random.Generator, size: int = SIZE, patch: int | None = PATCH) -> tuple[np.ndarray, tuple]:
    """Dim textured background; optionally one bright square patch at a random place."""
    img = (rng.random((size, size, 3)) * 110 + 20).astype(np.uint8)
    if patch is None:
        return img, ()
    x0, y0 = (int(v) for v in rng.integers(0, size - patch, 2))
    img[y0:y0 + patch, x0:x0 + patch] = (250, 240, 90)
    return img, (x0, y0, x0 + patch, y0 + patch)


@pytest.fixture(scope="module")
def patch_model() -> Classifier:
    """A small model trained for a few dozen seeded steps: class 1 = a bright patch is present."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = Classifier("small_cnn", _small_backbone(), "avg", {"main": HeadSpec("softmax", ("none", "patch"))})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(STEPS):
        imgs, labels = [], []
        for i in range(BATCH):
            img, _ = _scene(rng, patch=PATCH if i % 2 else None)
            imgs.append(img)
            labels.append(i % 2)
        loss = nn.functional.cross_entropy(model(preprocess(imgs, SIZE))["main"], torch.tensor(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.default_cfg["input_size"] = (3, SIZE, SIZE)
    return model.eval()


@pytest.mark.slow  # trains the module's small model (~9 s of CPU)
def test_grad_cam_peak_and_weak_box_find_the_planted_patch(patch_model: Classifier) -> None:
    rng = np.random.default_rng(123)
    ious = []
    for _ in range(5):
        img, box = _scene(rng)
        x = preprocess([img], SIZE)
        assert float(predict(patch_model, x)["main"][0, 1]) > 0.9  # the model did learn the task
        heat = grad_cam(patch_model, x, "main", 1)
        assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
        assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
        py, px = np.unravel_index(int(heat.argmax()), heat.shape)
        assert box[0] <= px < box[2] and box[1] <= py < box[3], (px, py, box)
        boxes = boxes_from_heatmap(heat, threshold=0.5)
        ious.append(box_iou(boxes[0], box))
    assert min(ious) >= 0.5, ious


@pytest.mark.parametrize("pool", list_pools())
def test_grad_cam_works_for_every_pooling(pool: str) -> None:
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", pool, num_classes=3, reduce_dim=8 if pool == "bilinear" else None,
                         sketch_dim=256 if pool == "compact_bilinear" else None)
    for p in model.backbone.parameters():
        p.requires_grad_(False)  # a frozen backbone must still give a heatmap
    img = np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    x = preprocess([img], (80, 96))
    heat = grad_cam(model.train(), x, "main", 2)
    assert model.training  # mode restored
    assert heat.shape == (80, 96) and np.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1
    with pytest.raises(InvalidArgumentError):
        grad_cam(model, x, "nope", 0)
    with pytest.raises(InvalidArgumentError):
        grad_cam(model, x, "main", 3)


def test_boxes_from_heatmap_separates_regions() -> None:
    yy, xx = np.mgrid[0:100, 0:120]
    heat = np.exp(-((xx - 30) ** 2 + (yy - 20) ** 2) / 40.0) + 0.6 * np.exp(-((xx - 90) ** 2 + (yy - 70) ** 2) / 80.0)
    boxes = boxes_from_heatmap(heat, threshold=0.3)
    assert len(boxes) == 2
    (a, b) = boxes
    assert a[0] < 30 < a[2] and a[1] < 20 < a[3]  # the hotter blob first
    assert b[0] < 90 < b[2] and b[1] < 70 < b[3]
    assert a[4] > b[4] and all(0 < bx[4] <= 1 for bx in boxes)
    assert boxes_from_heatmap(heat, threshold=0.3, max_boxes=1) == [a]
    assert boxes_from_heatmap(np.zeros((10, 10))) == []
    with pytest.raises(InvalidArgumentError):
        boxes_from_heatmap(np.zeros((2, 3, 4)))


@pytest.mark.slow
def test_second_pass_recovers_a_small_target_from_the_full_resolution_frame(patch_model: Classifier) -> None:
    rng = np.random.default_rng(7)
    frame, _ = _scene(rng, size=512, patch=None)
    x0, y0 = 300, 140
    frame[y0:y0 + PATCH, x0:x0 + PATCH] = (250, 240, 90)  # 16 px in a 512 px frame: 2 px after resizing to 64
    first = {k: v[0].numpy() for k, v in predict(patch_model, preprocess([frame], SIZE)).items()}
    assert first["main"][1] < 0.5, first
    result = second_pass(patch_model, frame, [(x0, y0, x0 + PATCH, y0 + PATCH, 0.9)], scale=1.5, min_side=40)
    crop = result["crops"][0]
    # The crop is 1.5× the box (24 px, raised to min_side 40) about its centre, in full-resolution pixels.
    assert crop["box"] == [288, 128, 328, 168]
    assert crop["probs"]["main"][1] > 0.9
    assert result["merged"]["main"][1] == pytest.approx(crop["probs"]["main"][1])
    assert result["merged"]["main"][0] == pytest.approx(min(first["main"][0], crop["probs"]["main"][0]))
    assert result["raised"] == {"main": [1]}
    np.testing.assert_allclose(result["first"]["main"], first["main"], rtol=1e-5)


def test_expand_and_merge() -> None:
    assert expand_box((10, 10, 30, 20), 1.5, 100, 100) == (5, 7, 35, 23)
    assert expand_box((0, 0, 20, 20), 1.5, 100, 100) == (0, 0, 25, 25)  # clipped to the frame
    first = {"h": np.array([0.7, 0.2, 0.1])}
    crops = [{"h": np.array([0.3, 0.1, 0.6])}, {"h": np.array([0.5, 0.4, 0.1])}]
    merged, raised = merge_passes(first, crops)
    np.testing.assert_allclose(merged["h"], [0.3, 0.4, 0.6])
    assert raised == {"h": [1, 2]}
    merged, raised = merge_passes(first, [])
    np.testing.assert_allclose(merged["h"], first["h"])
    assert raised == {"h": []}


def test_evidence_crop_always_contains_the_box() -> None:
    rng = np.random.default_rng(0)
    crop = EvidenceCrop(size=32, scale=(0.08, 1.0))
    areas = []
    for _ in range(2000):
        w, h = (int(v) for v in rng.integers(20, 200, 2))
        bw, bh = rng.uniform(1, w), rng.uniform(1, h)
        bx, by = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        box = (bx, by, bx + bw, by + bh)
        image = np.zeros((h, w, 3), np.uint8)
        out, (moved,) = crop.crop_with_boxes(image, [box], rng)
        ch, cw = out.shape[:2]
        assert moved[0] >= 0 and moved[1] >= 0 and moved[2] <= cw and moved[3] <= ch, (box, moved, out.shape)
        assert moved[2] - moved[0] == pytest.approx(bw) and moved[3] - moved[1] == pytest.approx(bh)
        areas.append(cw * ch / (w * h))
    assert min(areas) < 0.3 and max(areas) == 1.0  # still a random crop, not the whole image every time
    # In the resized output's coordinates too, and the pixels under the box are the box's pixels.
    image = np.zeros((120, 200, 3), np.uint8)
    image[40:60, 150:180] = 255
    for _ in range(50):
        out, (moved,) = crop.resized(image, [(150, 40, 180, 60)], rng)
        assert out.shape == (32, 32, 3)
        assert moved[0] >= 0 and moved[2] <= 32 and moved[1] >= 0 and moved[3] <= 32
        cx, cy = int((moved[0] + moved[2]) / 2), int((moved[1] + moved[3]) / 2)
        assert out[cy, cx, 0] > 200
    with pytest.raises(InvalidArgumentError):
        crop(image, [(10, 10, 5, 20)])
