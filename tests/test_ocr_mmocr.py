"""The mmocr adapter: both models build from mm_configs, run forward + loss on CPU, and learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def rec_batch(rng: np.random.Generator):
    crops = [(rng.random((32, 96, 3)) * 255).astype(np.uint8) for _ in range(3)]
    return mm.rec_inputs(crops, ["韩国小馆", "VX123", "直播间"])


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
def test_dbnet_resnet18_fpnc_loss_and_step() -> None:
    torch.manual_seed(0)
    model = mm.build_detector()
    assert type(model).__name__ == "DBNet" and type(model.neck).__name__ == "FPNC"
    assert model.backbone.depth == 18
    batch = det_batch(np.random.default_rng(0))
    before, after = one_step_lowers_loss(model, batch, lr=1e-3)
    assert after < before
    # Inference: predictions come back in original image pixels.
    model.eval()
    (pred,) = mm.predict(model, mm.det_inputs([np.full((96, 128, 3), 200, np.uint8)], size=DET_SIZE))
    assert hasattr(pred.pred_instances, "polygons")


def test_crnn_ctc_with_zh_en_dictionary_loss_and_step() -> None:
    torch.manual_seed(0)
    model = mm.build_recognizer("crnn_minivgg")
    d = model.decoder.dictionary
    assert d.num_classes >= 3500 + 62 and d.char2idx("韩") != d.unknown_idx and d.char2idx("Q") != d.unknown_idx
    before, after = one_step_lowers_loss(model, rec_batch(np.random.default_rng(0)), lr=1e-3)
    assert after < before


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
