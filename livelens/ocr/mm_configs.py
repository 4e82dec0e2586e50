"""Every mmocr model config livelens uses, as plain Python dicts in one place.

These are mmocr's own configs (``textdet/dbnet/_base_dbnet_resnet18_fpnc.py``,
``textrecog/crnn/_base_crnn_mini-vgg.py``, ``textrecog/svtr/_base_svtr-tiny.py``), trimmed to
the model part and changed where livelens differs:

* no ``_base_`` inheritance and no pipelines: our own code resizes and batches images;
* no pretrained download (``init_cfg=None``): weights come only from the model store;
* images arrive as RGB, so the preprocessors do not swap channels;
* the recogniser uses the Chinese + English dictionary and keeps letter case.

Two configs exist for CPU training, where mmocr's defaults do not converge in a working day:
``dbnet_mobilenetv2_fpnc`` (DBNet on mmdet's MobileNetV2, initialised from torchvision's
ImageNet weights, the one pretrained backbone available offline; ResNet-18 has none here) and
``crnn_resnet_small`` (CRNN on a narrow residual CNN from mmocr's own ``ResNet``: a fifth of
mini-VGG's backbone FLOPs per crop).

The string ``type`` keys are mmocr's registry, used only inside :mod:`livelens.ocr.mmocr_adapter`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from livelens.registry import Registry

RESOURCES = Path(__file__).resolve().parents[1] / "resources"
DICT_FILE = RESOURCES / "dict_zh_en.txt"

# Input geometry shared by training, inference and evaluation.
DET_SIZE = 640  # training tiles are DET_SIZE×DET_SIZE; inference resizes the long side to this
REC_HEIGHT = 32
REC_MAX_WIDTH = 320


def dictionary(dict_file: str | Path | None = None) -> dict[str, Any]:
    """mmocr ``Dictionary`` over our character list; padding is the CTC blank."""
    return dict(type="Dictionary", dict_file=str(dict_file or DICT_FILE), with_padding=True, with_unknown=True)


def dbnet_resnet18_fpnc() -> dict[str, Any]:
    """DBNet with a ResNet-18 backbone and FPNC neck (mmocr's base DBNet config, no pretrained)."""
    return dict(
        type="DBNet",
        backbone=dict(
            type="mmdet.ResNet", depth=18, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=-1,
            norm_cfg=dict(type="BN", requires_grad=True), init_cfg=None, norm_eval=False, style="caffe",
        ),
        neck=dict(type="FPNC", in_channels=[64, 128, 256, 512], lateral_channels=256),
        det_head=dict(
            type="DBHead", in_channels=256, module_loss=dict(type="DBModuleLoss"),
            postprocessor=dict(type="DBPostprocessor", text_repr_type="quad"),
        ),
        data_preprocessor=dict(
            type="TextDetDataPreprocessor", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
            bgr_to_rgb=False, pad_size_divisor=32,
        ),
    )


def dbnet_mobilenetv2_fpnc() -> dict[str, Any]:
    """DBNet on mmdet's MobileNetV2 (strides 4/8/16/32 → 24/32/96/320 channels) with a slim FPNC.

    Same layer order as torchvision's ``mobilenet_v2.features``, so its ImageNet weights load
    (see :data:`IMAGENET_INIT`).
    """
    cfg = dbnet_resnet18_fpnc()
    cfg["backbone"] = dict(type="mmdet.MobileNetV2", out_indices=(1, 2, 4, 6), init_cfg=None)
    cfg["neck"] = dict(type="FPNC", in_channels=[24, 32, 96, 320], lateral_channels=128, out_channels=32)
    cfg["det_head"]["in_channels"] = 128
    return cfg


def crnn_minivgg(dict_file: str | Path | None = None) -> dict[str, Any]:
    """CRNN (mini-VGG + BiLSTM) with a CTC head, on 32-px-high grayscale line crops."""
    return dict(
        type="CRNN",
        preprocessor=None,
        backbone=dict(type="MiniVGG", leaky_relu=False, input_channels=1),
        encoder=None,
        decoder=dict(
            type="CRNNDecoder", in_channels=512, rnn_flag=True,
            module_loss=dict(type="CTCModuleLoss", letter_case="unchanged", zero_infinity=True),
            postprocessor=dict(type="CTCPostProcessor"),
            dictionary=dictionary(dict_file),
        ),
        data_preprocessor=dict(type="TextRecogDataPreprocessor", mean=[127], std=[127]),
    )


def crnn_resnet_small(dict_file: str | Path | None = None) -> dict[str, Any]:
    """CRNN on a narrow residual CNN (mmocr's textrecog ``ResNet``) with a per-column CTC head, grayscale.

    Strides take a 32-px crop to height 1 and width/4, as mini-VGG does, with 32→256 channels
    instead of 64→512. The decoder is mmocr's ``CRNNDecoder`` with ``rnn_flag=False`` (a 1×1
    convolution per column): with its BiLSTM, 631 steps on 2 cores (25 min) never left CTC's
    all-blank plateau (held-out character recall 0.003); without it a step costs 30 % less.
    """
    cfg = crnn_minivgg(dict_file)
    cfg["backbone"] = dict(
        type="ResNet", in_channels=1, stem_channels=[32], block_cfgs=dict(type="BasicBlock", use_conv1x1=True),
        arch_layers=[1, 2, 2, 2, 1], arch_channels=[32, 64, 128, 192, 256],
        strides=[(2, 2), (2, 2), (2, 1), (2, 1), (2, 1)],
    )
    cfg["decoder"].update(in_channels=256, rnn_flag=False)
    return cfg


def svtr_tiny(dict_file: str | Path | None = None) -> dict[str, Any]:
    """SVTR-Tiny with a CTC head on 32×100 RGB crops (the alternative CTC recogniser)."""
    return dict(
        type="SVTR",
        preprocessor=None,
        encoder=dict(
            type="SVTREncoder", img_size=[32, 100], in_channels=3, out_channels=192, embed_dims=[64, 128, 256],
            depth=[3, 6, 3], num_heads=[2, 4, 8], mixer_types=["Local"] * 6 + ["Global"] * 6,
            window_size=[[7, 11], [7, 11], [7, 11]], merging_types="Conv", prenorm=False, max_seq_len=25,
        ),
        decoder=dict(
            type="SVTRDecoder", in_channels=192,
            module_loss=dict(type="CTCModuleLoss", letter_case="unchanged", zero_infinity=True),
            postprocessor=dict(type="CTCPostProcessor"),
            dictionary=dictionary(dict_file),
        ),
        data_preprocessor=dict(type="TextRecogDataPreprocessor", mean=[127.5], std=[127.5]),
    )


DETECTORS: Registry = Registry("mmocr detector config")
DETECTORS.register("dbnet_resnet18_fpnc", dbnet_resnet18_fpnc)
DETECTORS.register("dbnet_mobilenetv2_fpnc", dbnet_mobilenetv2_fpnc)
RECOGNIZERS: Registry = Registry("mmocr recogniser config")
RECOGNIZERS.register("crnn_minivgg", crnn_minivgg)
RECOGNIZERS.register("crnn_resnet_small", crnn_resnet_small)
RECOGNIZERS.register("svtr_tiny", svtr_tiny)
# Input channels each recogniser expects (the CRNNs are grayscale).
REC_CHANNELS = {"crnn_minivgg": 1, "crnn_resnet_small": 1, "svtr_tiny": 3}
# Backbones that start from torchvision's ImageNet weights when training (config → torchvision arch).
IMAGENET_INIT = {"dbnet_mobilenetv2_fpnc": "mobilenet_v2"}
# SVTR's encoder has a fixed input width; CRNN takes any width.
REC_FIXED_WIDTH = {"svtr_tiny": 100}


def get(name: str, **kwargs: Any) -> dict[str, Any]:
    """A fresh (deep-copied) config by name, detector or recogniser.

    Raises:
        ConfigError: Unknown name.
    """
    table = DETECTORS if name in DETECTORS else RECOGNIZERS
    if name not in table:
        from livelens.errors import ConfigError

        raise ConfigError(f"unknown mmocr config {name!r}; known: {sorted([*DETECTORS, *RECOGNIZERS])}")
    return copy.deepcopy(table.get(name)(**kwargs))
