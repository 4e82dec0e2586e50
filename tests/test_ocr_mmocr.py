"""The mmocr adapter: both models build from mm_configs, run forward + loss on CPU, and learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from livelens.errors import ConfigError
from livelens.ocr import mm_configs
from livelens.ocr import mmocr_adapter as mm

DET_SIZE = 128  # small inputs keep the test fast; the geometry code is the same at 640


def det_batch(rng: np.random.Generator):
    imgs, polys = [], []
    for _ in range(2):
        img = np.full((96, 128, 3), 200, np.uint8)
        x, y = int(rng.integers(5, 60)), int(rng.integers(5, 60))
        img[y:y + 20, x:x + 60] = 20  # a dark "text" bar and its polygon
        imgs.append(img)
        polys.append([np.array([x, y, x + 60, y, x + 60, y + 20, x, y + 20], np.float32)])
    return mm.det_inputs(imgs, polys, size=DET_SIZE)


def rec_batch(rng: np.random.Generator, name: str = "crnn_minivgg"):
    crops = [(rng.random((32, 96, 3)) * 255).astype(np.uint8) for _ in range(3)]
    return mm.rec_inputs(crops, ["韩国小馆", "VX123", "直播间"], channels=mm_configs.REC_CHANNELS[name],
                         fixed_width=mm_configs.REC_FIXED_WIDTH.get(name))


def one_step_lowers_loss(model: torch.nn.Module, batch: dict, lr: float) -> tuple[float, float]:
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    before, parts = mm.compute_loss(model, batch)
    assert all(np.isfinite(v) for v in parts.values())
    opt.zero_grad()
    before.backward()
    # Every top-level part (backbone, neck, head / decoder) gets gradient from the loss.
    for name, child in model.named_children():
        params = [p for p in child.parameters() if p.requires_grad]
        if params:
            assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params), name
    opt.step()
    with torch.no_grad():
        after, _ = mm.compute_loss(model, batch)
    return float(before), float(after)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(mm_configs.DETECTORS))
def test_dbnet_loss_and_step(name: str) -> None:
    torch.manual_seed(0)
    model = mm.build_detector(name)
    assert type(model).__name__ == "DBNet" and type(model.neck).__name__ == "FPNC"
    if name == "dbnet_resnet18_fpnc":
        assert model.backbone.depth == 18
    batch = det_batch(np.random.default_rng(0))
    before, after = one_step_lowers_loss(model, batch, lr=1e-3)
    assert after < before
    # Inference: predictions come back in original image pixels.
    model.eval()
    (pred,) = mm.predict(model, mm.det_inputs([np.full((96, 128, 3), 200, np.uint8)], size=DET_SIZE))
    assert hasattr(pred.pred_instances, "polygons")


@pytest.mark.parametrize("name", sorted(mm_configs.RECOGNIZERS))
def test_ctc_recognizer_with_zh_en_dictionary_loss_and_step(name: str) -> None:
    torch.manual_seed(0)
    model = mm.build_recognizer(name)
    d = model.decoder.dictionary
    assert d.num_classes >= 3500 + 62 and d.char2idx("韩") != d.unknown_idx and d.char2idx("Q") != d.unknown_idx
    before, after = one_step_lowers_loss(model, rec_batch(np.random.default_rng(0), name), lr=1e-3)
    assert after < before


def test_crnn_resnet_small_is_cheaper_than_minivgg() -> None:
    """The CPU recogniser keeps mini-VGG's geometry (height 1, width/4) at a fraction of its compute."""
    x = torch.zeros(2, 1, 32, 160)
    small, vgg = mm.build_recognizer("crnn_resnet_small"), mm.build_recognizer("crnn_minivgg")
    (hs, ws), (hv, wv) = small.backbone(x).shape[2:], vgg.backbone(x).shape[2:]
    assert hs == hv == 1 and ws == 40 and abs(ws - wv) <= 1  # mini-VGG's last pools pad one column
    flops = {}
    for name, model in (("small", small), ("vgg", vgg)):
        with FlopCounterMode(display=False) as counter:
            model.backbone(x)
        flops[name] = counter.get_total_flops()
    assert flops["small"] < flops["vgg"] / 4


def test_imagenet_init_reproduces_torchvision_features() -> None:
    """mmdet's MobileNetV2 with the copied weights computes torchvision's ImageNet features."""
    from livelens.models.factory import create_backbone

    model = mm.build_detector("dbnet_mobilenetv2_fpnc")
    assert mm.imagenet_init(model, "dbnet_mobilenetv2_fpnc") == 312 - 52  # minus num_batches_tracked
    ref = create_backbone("mobilenet_v2", pretrained=True).eval()
    model.eval()
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.backbone(x)[-1]  # out index 6: the 320-channel stage at stride 32
        theirs = ref[:18](x)
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-4)
    with pytest.raises(ConfigError, match="no ImageNet"):
        mm.imagenet_init(mm.build_detector(), "dbnet_resnet18_fpnc")


def test_engine_interface_and_bad_config() -> None:
    eng = mm.MmocrEngine()  # random weights: shape of the output, not its quality
    crops = [(np.random.default_rng(1).random((32, 80, 3)) * 255).astype(np.uint8), np.zeros((1, 1, 3), np.uint8)]
    out = eng.recognize(crops)
    assert len(out) == 2 and isinstance(out[0][0], str) and 0.0 <= out[0][1] <= 1.0 and out[1] == ("", 0.0)
    assert eng.read([np.zeros((0, 0, 3), np.uint8), np.zeros((1, 1, 3), np.uint8)]) == [[], []]
    with pytest.raises(ConfigError):
        mm_configs.get("dbnet_resnet1000")
    bad = mm_configs.get("crnn_minivgg", dict_file="/nonexistent/dict.txt")
    with pytest.raises(ConfigError):
        mm.build_model(bad)
