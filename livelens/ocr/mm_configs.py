"""Every mmocr and mmdet model config livelens uses, as plain Python dicts in one place.

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

One mmdet detector serves the persons stage: ``rtmdet_mobilenetv2``, mmdet's RTMDet (its
``CSPNeXtPAFPN`` neck and anchor-free ``RTMDetSepBNHead``, as in ``rtmdet_tiny_8xb32-300e_coco.py``)
on the same ImageNet MobileNetV2 (strides 8/16/32 → 32/96/320 channels) and a 64-channel neck, for
:data:`OBJECT_CLASSES`.

The string ``type`` keys are mmocr's and mmdet's registries, used only inside
:mod:`livelens.ocr.mmocr_adapter` (mmdet configs are built in mmdet's scope there).
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


#: What the persons-stage detector finds: faces, the overlays the frame generator draws with boxes,
#: and whole people (added last, so a stored detector's class ids keep their meaning; its card's
#: ``arch.classes`` says which it has).
OBJECT_CLASSES = ("face", "qrcode", "logo", "pip", "text_overlay", "hud", "person")
#: Object detector input: the long side of a frame (short side padded to /32).
OBJ_DET_SIZE = 416


def rtmdet_mobilenetv2(num_classes: int = len(OBJECT_CLASSES)) -> dict[str, Any]:
    """RTMDet (tiny-sized neck and head) on mmdet's MobileNetV2; see the module docstring."""
    bn = dict(type="BN", momentum=0.03, eps=0.001)
    act = dict(type="SiLU", inplace=True)
    return dict(
        type="RTMDet",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=False, pad_size_divisor=32),
        backbone=dict(type="MobileNetV2", out_indices=(2, 4, 6), init_cfg=None),
        neck=dict(type="CSPNeXtPAFPN", in_channels=[32, 96, 320], out_channels=64, num_csp_blocks=1,
                  expand_ratio=0.5, norm_cfg=bn, act_cfg=act),
        bbox_head=dict(
            type="RTMDetSepBNHead", num_classes=num_classes, in_channels=64, stacked_convs=2, feat_channels=64,
            anchor_generator=dict(type="MlvlPointGenerator", offset=0, strides=[8, 16, 32]),
            bbox_coder=dict(type="DistancePointBBoxCoder"),
            loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
            loss_bbox=dict(type="GIoULoss", loss_weight=2.0),
            with_objectness=False, exp_on_reg=False, share_conv=True, pred_kernel_size=1, norm_cfg=bn, act_cfg=act),
        train_cfg=dict(assigner=dict(type="DynamicSoftLabelAssigner", topk=13), allowed_border=-1, pos_weight=-1,
                       debug=False),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.6),
                      max_per_img=100),
    )


DETECTORS: Registry = Registry("mmocr detector config")
DETECTORS.register("dbnet_resnet18_fpnc", dbnet_resnet18_fpnc)
DETECTORS.register("dbnet_mobilenetv2_fpnc", dbnet_mobilenetv2_fpnc)
RECOGNIZERS: Registry = Registry("mmocr recogniser config")
RECOGNIZERS.register("crnn_minivgg", crnn_minivgg)
RECOGNIZERS.register("crnn_resnet_small", crnn_resnet_small)
RECOGNIZERS.register("svtr_tiny", svtr_tiny)
OBJECT_DETECTORS: Registry = Registry("mmdet detector config")
OBJECT_DETECTORS.register("rtmdet_mobilenetv2", rtmdet_mobilenetv2)
# Input channels each recogniser expects (the CRNNs are grayscale).
REC_CHANNELS = {"crnn_minivgg": 1, "crnn_resnet_small": 1, "svtr_tiny": 3}
# Backbones that start from torchvision's ImageNet weights when training (config → torchvision arch).
IMAGENET_INIT = {"dbnet_mobilenetv2_fpnc": "mobilenet_v2", "rtmdet_mobilenetv2": "mobilenet_v2"}
# SVTR's encoder has a fixed input width; CRNN takes any width.
REC_FIXED_WIDTH = {"svtr_tiny": 100}


def get(name: str, **kwargs: Any) -> dict[str, Any]:
    """A fresh (deep-copied) config by name: text detector, recogniser or object detector.

    Raises:
        ConfigError: Unknown name.
    """
    table = next((t for t in (DETECTORS, RECOGNIZERS, OBJECT_DETECTORS) if name in t), None)
    if table is None:
        from livelens.errors import ConfigError

        raise ConfigError(f"unknown mm config {name!r}; known: "
                          f"{sorted([*DETECTORS, *RECOGNIZERS, *OBJECT_DETECTORS])}")
    return copy.deepcopy(table.get(name)(**kwargs))
