"""The small adapter between livelens and mmocr: build models, batch inputs, losses, inference.

Everything mmocr-specific (its registry, data samples, preprocessors) stays in this module;
the rest of livelens sees plain ``nn.Module``s, numpy images and :mod:`livelens.ocr.types`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from livelens.errors import ConfigError
from livelens.imageio import DEFAULT_LIMITS, ImageLimits
from livelens.ocr import mm_configs
from livelens.ocr.engine import as_rgb, crop_line
from livelens.ocr.types import TextBox, TextLine


@functools.lru_cache(maxsize=1)
def _registry() -> Any:
    """mmocr's MODELS registry, with mmocr's (and mmdet's) modules registered once."""
    from mmocr.registry import MODELS
    from mmocr.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    # mmengine logs every parameter at INFO during init_weights; keep only real warnings.
    from mmengine.logging import MMLogger

    MMLogger.get_current_instance().setLevel(logging.WARNING)
    return MODELS


def build_model(cfg: dict[str, Any] | str) -> nn.Module:
    """Build an mmocr model from a config dict (or a name in :mod:`livelens.ocr.mm_configs`)."""
    if isinstance(cfg, str):
        cfg = mm_configs.get(cfg)
    try:
        model = _registry().build(cfg)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"cannot build mmocr model {cfg.get('type')!r}: {exc}") from exc
    model.init_weights()
    return model


def build_detector(name: str = "dbnet_resnet18_fpnc", pretrained: bool = False) -> nn.Module:
    """A DBNet detector; ``pretrained`` starts its backbone from ImageNet where the config has one."""
    model = build_model(mm_configs.get(name))
    if pretrained:
        imagenet_init(model, name)
    return model


def imagenet_init(model: nn.Module, name: str) -> int:
    """Copy torchvision's ImageNet weights into the backbone of config ``name``.

    mmdet's MobileNetV2 builds its layers in the order of torchvision's ``features`` (stem,
    seven inverted-residual stages, the 1×1 head), so the tensors pair up one to one; every
    pair's shape is checked, so a different layout fails loudly instead of loading garbage.

    Returns:
        The number of tensors copied.

    Raises:
        ConfigError: The config has no ImageNet initialisation, the offline weights are missing,
            or the layouts do not match.
    """
    arch = mm_configs.IMAGENET_INIT.get(name)
    if arch is None:
        raise ConfigError(f"mmocr config {name!r} has no ImageNet initialisation; "
                          f"known: {sorted(mm_configs.IMAGENET_INIT)}")
    from livelens.models.factory import create_backbone

    src = [(k, v) for k, v in create_backbone(arch, pretrained=True).state_dict().items()
           if not k.endswith("num_batches_tracked")]
    dst_state = model.backbone.state_dict()
    dst = [k for k in dst_state if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ConfigError(f"{arch} has {len(src)} tensors, the {name} backbone {len(dst)}")
    for (sk, sv), dk in zip(src, dst, strict=True):
        if sv.shape != dst_state[dk].shape:
            raise ConfigError(f"{arch}.{sk} {tuple(sv.shape)} does not fit {dk} {tuple(dst_state[dk].shape)}")
        dst_state[dk] = sv.clone()
    model.backbone.load_state_dict(dst_state)
    return len(src)


def build_recognizer(name: str = "crnn_minivgg", dict_file: str | None = None) -> nn.Module:
    """A CTC recogniser (CRNN or SVTR) over the Chinese + English dictionary."""
    return build_model(mm_configs.get(name, dict_file=dict_file))


# -- detection batches -----------------------------------------------------------------
def resize_for_det(rgb: np.ndarray, size: int = mm_configs.DET_SIZE) -> tuple[np.ndarray, float]:
    """Resize so the long side is ``size`` (rounded to /32 by the preprocessor's padding)."""
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    out = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return out, scale


def det_inputs(images: Sequence[np.ndarray], polygons: Sequence[Sequence[np.ndarray]] | None = None,
               ignored: Sequence[Sequence[bool]] | None = None, size: int = mm_configs.DET_SIZE) -> dict[str, Any]:
    """A raw DBNet batch (before the model's data preprocessor).

    Args:
        images: RGB uint8 images.
        polygons: Per image, ground-truth polygons as flat ``[x0, y0, x1, y1, ...]`` arrays
            in original pixels (training); ``None`` for inference.
        ignored: Per image, per polygon, whether it is a "don't care" region.
        size: Long side after resizing.
    """
    from mmengine.structures import InstanceData
    from mmocr.structures import TextDetDataSample

    inputs, samples = [], []
    for i, rgb in enumerate(images):
        small, scale = resize_for_det(rgb, size)
        if polygons is not None:
            # DBNet's loss builds its targets at img_shape and compares them with maps of the
            # padded batch, so training images are padded to one square size (as mmocr's Pad).
            canvas = np.zeros((size, size, 3), np.uint8)
            canvas[: small.shape[0], : small.shape[1]] = small
            small_shape, small = small.shape[:2], canvas
        inputs.append(torch.from_numpy(np.ascontiguousarray(small.transpose(2, 0, 1))))
        sample = TextDetDataSample(metainfo=dict(
            img_shape=small.shape[:2], ori_shape=rgb.shape[:2], scale_factor=(scale, scale)))
        if polygons is not None:
            sample.set_metainfo(dict(valid_shape=small_shape))
        if polygons is not None:
            polys = [np.asarray(p, dtype=np.float32).reshape(-1) * scale for p in polygons[i]]
            flags = list(ignored[i]) if ignored is not None else [False] * len(polys)
            inst = InstanceData()
            inst.polygons = polys
            inst.ignored = torch.tensor(flags, dtype=torch.bool)
            inst.labels = torch.zeros(len(polys), dtype=torch.long)
            inst.bboxes = torch.tensor(
                np.array([[p[0::2].min(), p[1::2].min(), p[0::2].max(), p[1::2].max()] for p in polys],
                         dtype=np.float32).reshape(-1, 4))
            sample.gt_instances = inst
        samples.append(sample)
    return {"inputs": inputs, "data_samples": samples}


# -- recognition batches ---------------------------------------------------------------
def rec_inputs(crops: Sequence[np.ndarray], texts: Sequence[str] | None = None, channels: int = 1,
               height: int = mm_configs.REC_HEIGHT, max_width: int = mm_configs.REC_MAX_WIDTH,
               fixed_width: int | None = None) -> dict[str, Any]:
    """A raw recogniser batch: crops resized to ``height``, right-padded to the widest.

    ``valid_ratio`` tells the CTC decoder how much of each padded row is real text.
    """
    from mmocr.structures import TextRecogDataSample

    resized = []
    for crop in crops:
        img = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)[:, :, None] if channels == 1 else crop
        h, w = img.shape[:2]
        new_w = fixed_width or int(min(max_width, max(height, math.ceil(w * height / max(1, h) / 4) * 4)))
        img = cv2.resize(img, (new_w, height), interpolation=cv2.INTER_AREA if h > height else cv2.INTER_CUBIC)
        resized.append(img.reshape(height, new_w, channels))
    width = max((r.shape[1] for r in resized), default=height)
    inputs, samples = [], []
    for i, img in enumerate(resized):
        pad = np.zeros((height, width, channels), np.uint8)
        pad[:, : img.shape[1]] = img
        inputs.append(torch.from_numpy(np.ascontiguousarray(pad.transpose(2, 0, 1))))
        sample = TextRecogDataSample(metainfo=dict(
            img_shape=(height, img.shape[1]), valid_ratio=img.shape[1] / width, ori_shape=crops[i].shape[:2]))
        if texts is not None:
            from mmengine.structures import LabelData

            sample.gt_text = LabelData(item=texts[i])
        samples.append(sample)
    return {"inputs": inputs, "data_samples": samples}


def compute_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Run the model's preprocessor and loss; returns the total and each term as floats."""
    data = model.data_preprocessor(batch, training=True)
    losses = model.loss(data["inputs"], data["data_samples"])
    total = sum(v for v in losses.values() if isinstance(v, torch.Tensor))
    return total, {k: float(v.detach()) for k, v in losses.items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def predict(model: nn.Module, batch: dict[str, Any]) -> list[Any]:
    """Run the model's preprocessor and ``predict``: mmocr data samples with predictions."""
    data = model.data_preprocessor(batch, training=False)
    return model.predict(data["inputs"], data["data_samples"])


# -- engine ----------------------------------------------------------------------------
class MmocrEngine:
    """DBNet + CTC recogniser behind the same interface as :class:`~livelens.ocr.engine.PpOcrEngine`.

    Args:
        det: Detector: a model-store ref (``name@version``), a state dict, or ``None`` for
            random weights (useful only for tests).
        rec: Recogniser, the same way.
        det_name: Detector config name in :mod:`livelens.ocr.mm_configs`; a stored model's card
            names its own config, which wins.
        rec_name: Recogniser config name, the same way.
        store: Model store root for refs; default: the store chain of :mod:`livelens.store`.
        rec_batch_num: Crops per recognition batch.
        text_score: Lines below this recognition score are dropped.
        min_box_score: Detections below this score are dropped.
        det_size: Detector input's long side; a stored detector's card gives the size it was
            trained at, which wins (text seen at twice its training size is text it never saw).
        device: Torch device.
        limits: Image limits.
    """

    name = "mmocr"

    def __init__(self, det: str | dict | None = None, rec: str | dict | None = None, *,
                 det_name: str = "dbnet_resnet18_fpnc", rec_name: str = "crnn_minivgg",
                 store: str | None = None, rec_batch_num: int = 64, text_score: float = 0.0,
                 min_box_score: float = 0.3, det_size: int = mm_configs.DET_SIZE, device: str = "cpu",
                 limits: ImageLimits = DEFAULT_LIMITS):
        self.device = torch.device(device)
        det_stored, rec_stored = self._stored(det, store), self._stored(rec, store)
        self.det_name = _card_config(det_stored, det_name)
        self.rec_name = _card_config(rec_stored, rec_name)
        self.detector = self._load(build_detector(self.det_name), det_stored or det)
        self.recognizer = self._load(build_recognizer(self.rec_name), rec_stored or rec)
        trained_size = ((det_stored.card.get("train") or {}).get("det_size") if det_stored is not None else None)
        self.det_size = int(trained_size or det_size)
        self.rec_batch_num = rec_batch_num
        self.text_score = text_score
        self.min_box_score = min_box_score
        self.limits = limits
        self.cards: dict[str, Any] = {}
        #: ``name@version`` of each stored model (what answers name as their model).
        self.model_refs = {k: v.ref for k, v in (("det", det_stored), ("rec", rec_stored)) if v is not None}

    @classmethod
    def from_modules(cls, detector: nn.Module | None = None, recognizer: nn.Module | None = None, *,
                     det_name: str = "dbnet_resnet18_fpnc", rec_name: str = "crnn_minivgg",
                     **kwargs: Any) -> MmocrEngine:
        """An engine around models already in memory (e.g. at the end of a training run).

        The one not given is built with random weights: score only the one you pass.
        """
        eng = cls(det_name=det_name, rec_name=rec_name, **kwargs)
        if detector is not None:
            eng.detector = detector.to(eng.device).eval()
        if recognizer is not None:
            eng.recognizer = recognizer.to(eng.device).eval()
        return eng

    @staticmethod
    def _stored(src: str | dict | None, store: str | None) -> Any:
        if not isinstance(src, str):
            return None
        from livelens.store import open_in_stores

        found, ref = open_in_stores(src, [store] if store else None)
        return found.load(ref)

    def _load(self, model: nn.Module, src: Any) -> nn.Module:
        state = src if isinstance(src, dict) else getattr(src, "state_dict", None)
        if state is not None:
            model.load_state_dict(state)
        return model.to(self.device).eval()

    def detect(self, images: Sequence[Any]) -> list[list[TextBox]]:
        """Text boxes per image, in original pixels."""
        rgbs = [as_rgb(img, self.limits) for img in images]
        out: list[list[TextBox]] = [[] for _ in rgbs]
        live = [i for i, r in enumerate(rgbs) if r is not None]
        for i in live:  # one at a time: images differ in size, and padding would waste compute
            (res,) = predict(self.detector, _to_device(det_inputs([rgbs[i]], size=self.det_size), self.device))
            pred = res.pred_instances
            for poly, score in zip(pred.polygons, pred.scores, strict=True):
                poly = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
                if len(poly) >= 4 and float(score) >= self.min_box_score:
                    quad = _min_area_quad(poly)
                    h, w = rgbs[i].shape[:2]
                    quad[:, 0], quad[:, 1] = quad[:, 0].clip(0, w), quad[:, 1].clip(0, h)
                    out[i].append(TextBox.from_polygon(quad, float(score)))
        return out

    def recognize(self, crops: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """``(text, score)`` per RGB line crop."""
        out: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        valid = [i for i, c in enumerate(crops) if isinstance(c, np.ndarray) and c.ndim == 3 and min(c.shape[:2]) >= 2]
        # Similar widths per batch keep padding (and wasted compute) low.
        valid.sort(key=lambda i: crops[i].shape[1] / crops[i].shape[0])
        channels = mm_configs.REC_CHANNELS.get(self.rec_name, 1)
        fixed = mm_configs.REC_FIXED_WIDTH.get(self.rec_name)
        for s in range(0, len(valid), self.rec_batch_num):
            idx = valid[s:s + self.rec_batch_num]
            batch = rec_inputs([crops[i] for i in idx], channels=channels, fixed_width=fixed)
            for i, res in zip(idx, predict(self.recognizer, _to_device(batch, self.device)), strict=True):
                score = res.pred_text.score
                score = float(np.mean(score)) if isinstance(score, list | tuple) and score else float(score or 0.0)
                out[i] = (str(res.pred_text.item), score)
        return out

    def read(self, images: Sequence[Any]) -> list[list[TextLine]]:
        """Detect and recognise; crops of all images share recognition batches."""
        rgbs = [as_rgb(img, self.limits) for img in images]
        dets = self.detect([r if r is not None else np.zeros((0, 0, 3), np.uint8) for r in rgbs])
        crops, owners = [], []
        for i, (rgb, boxes) in enumerate(zip(rgbs, dets, strict=True)):
            for b in boxes:
                crops.append(crop_line(rgb, b.polygon))
                owners.append((i, b))
        results: list[list[TextLine]] = [[] for _ in images]
        for (i, b), (text, score) in zip(owners, self.recognize(crops), strict=True):
            if text.strip() and score >= self.text_score:
                results[i].append(TextLine(b.polygon, b.box, text, score))
        return results


def _card_config(stored: Any, default: str) -> str:
    """The mm config a stored model was trained with (its card), else ``default``."""
    if stored is None:
        return default
    return (stored.card.get("arch") or {}).get("config") or default


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {"inputs": [t.to(device) for t in batch["inputs"]], "data_samples": batch["data_samples"]}


def _min_area_quad(poly: np.ndarray) -> np.ndarray:
    """A 4-point clockwise quad (top-left first) around any polygon."""
    rect = cv2.minAreaRect(poly.astype(np.float32))
    pts = cv2.boxPoints(rect).astype(np.float64)
    # Order: top-left (min x+y), top-right, bottom-right, bottom-left.
    s, d = pts.sum(1), np.diff(pts, axis=1).ravel()
    return np.array([pts[np.argmin(s)], pts[np.argmin(d)], pts[np.argmax(s)], pts[np.argmax(d)]])


# -- mmdet object detection (the persons stage) ------------------------------------------
@functools.lru_cache(maxsize=1)
def _mmdet_registry() -> Any:
    """mmdet's MODELS registry with its modules registered (mmocr's first: they import mmdet's)."""
    _registry()
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=False)  # mmocr keeps the default scope
    return MODELS


def build_object_detector(name: str = "rtmdet_mobilenetv2", pretrained: bool = False,
                          num_classes: int | None = None) -> nn.Module:
    """An mmdet detector of :data:`livelens.ocr.mm_configs.OBJECT_CLASSES` (or of ``num_classes``,
    a stored detector's own count); ``pretrained``: ImageNet backbone.

    It is built inside mmdet's registry scope, so the config's unprefixed types (and the defaults
    its modules build, such as the assigner's IoU calculator) resolve to mmdet's, not mmocr's.
    """
    from mmengine.config import ConfigDict
    from mmengine.registry import DefaultScope

    if name not in mm_configs.OBJECT_DETECTORS:
        raise ConfigError(f"unknown mmdet config {name!r}; known: {sorted(mm_configs.OBJECT_DETECTORS)}")
    registry = _mmdet_registry()  # outside the scope below: mmocr's registration sets its own default scope
    try:
        with DefaultScope.overwrite_default_scope("mmdet"):
            model = registry.build(ConfigDict(mm_configs.get(name, **({"num_classes": num_classes} if num_classes else {}))))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build mmdet model {name!r}: {exc}") from exc
    model.init_weights()
    if pretrained:
        imagenet_init(model, name)
    return model


def obj_inputs(images: Sequence[np.ndarray], boxes: Sequence[np.ndarray] | None = None,
               labels: Sequence[np.ndarray] | None = None, size: int = mm_configs.OBJ_DET_SIZE) -> dict[str, Any]:
    """A raw mmdet batch: each image resized to long side ``size``; boxes ``[x0, y0, x1, y1]`` in its pixels.

    The data preprocessor pads the batch to a multiple of 32 and records the padded shape.
    """
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    inputs, samples = [], []
    for i, rgb in enumerate(images):
        small, _ = resize_for_det(rgb, size)
        inputs.append(torch.from_numpy(np.ascontiguousarray(small.transpose(2, 0, 1))))
        sy, sx = small.shape[0] / rgb.shape[0], small.shape[1] / rgb.shape[1]
        sample = DetDataSample(metainfo=dict(img_shape=small.shape[:2], ori_shape=rgb.shape[:2],
                                             scale_factor=(sx, sy)))
        if boxes is not None:
            inst = InstanceData()
            b = np.asarray(boxes[i], np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], np.float32)
            inst.bboxes = torch.from_numpy(b)
            inst.labels = torch.as_tensor(np.asarray(labels[i] if labels is not None else []), dtype=torch.long)
            sample.gt_instances = inst
        samples.append(sample)
    return {"inputs": inputs, "data_samples": samples}


def loss_terms(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """An mm model's loss terms on one raw batch, through the (possibly DDP-wrapped) module.

    The preprocessor runs on the inner model; the loss goes through ``model(..., mode="loss")`` so
    that DDP's gradient hooks see the forward pass.
    """
    from livelens.train.ddp import unwrap

    inner = unwrap(model)
    device = next(inner.parameters()).device
    if device.type != "cpu":
        batch = {"inputs": [t.to(device) for t in batch["inputs"]], "data_samples": batch["data_samples"]}
    data = inner.data_preprocessor(batch, training=True)
    return model(data["inputs"], data["data_samples"], mode="loss")


def obj_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The detector's total loss on one raw batch (RTMDet's terms are per-level lists)."""
    from livelens.train.ddp import unwrap

    total, _ = unwrap(model).parse_losses(loss_terms(model, batch))
    return total


@torch.no_grad()
def obj_predict(model: nn.Module, images: Sequence[np.ndarray], size: int = mm_configs.OBJ_DET_SIZE,
                min_score: float = 0.05) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(boxes [n, 4] in original pixels, scores, class ids)`` per image, one image at a time."""
    device = next(model.parameters()).device
    out = []
    for rgb in images:
        batch = _to_device(obj_inputs([rgb], size=size), device)
        data = model.data_preprocessor(batch, training=False)
        (res,) = model.predict(data["inputs"], data["data_samples"], rescale=True)
        p = res.pred_instances
        keep = p.scores >= min_score
        out.append((p.bboxes[keep].cpu().numpy(), p.scores[keep].cpu().numpy(), p.labels[keep].cpu().numpy()))
    return out


class ObjectDetector:
    """A stored mmdet detector: its card names the config, the classes and the input size.

    Args:
        src: A model-store ref (``name`` or ``name@version``) or an ``nn.Module`` in memory.
        store: Model store root for refs; default: the store chain of :mod:`livelens.store`.
        name: Config name when ``src`` is a module.
        size: Input long side when ``src`` is a module.
    """

    def __init__(self, src: str | nn.Module, store: str | None = None, *, name: str = "rtmdet_mobilenetv2",
                 size: int = mm_configs.OBJ_DET_SIZE, classes: Sequence[str] = mm_configs.OBJECT_CLASSES):
        if isinstance(src, nn.Module):
            self.model, self.ref, self.card = src.eval(), "in-memory", {}
            self.size, self.classes = size, tuple(classes)
            return
        from livelens.store import open_in_stores

        found, ref = open_in_stores(src, [store] if store else None)
        stored = found.load(ref)
        arch = stored.card.get("arch") or {}
        self.card, self.ref = stored.card, stored.ref
        self.size = int(arch.get("size") or size)
        self.classes = tuple(arch.get("classes") or classes)
        self.model = build_object_detector(arch.get("config") or name, num_classes=len(self.classes))
        self.model.load_state_dict(stored.state_dict)
        self.model.eval()

    def detect(self, rgb: np.ndarray, min_score: float = 0.05) -> list[dict[str, Any]]:
        """``{"class", "box", "score"}`` per object, boxes in ``rgb``'s pixels."""
        boxes, scores, labels = obj_predict(self.model, [rgb], self.size, min_score)[0]
        return [{"class": self.classes[int(c)], "box": [round(float(v), 1) for v in b], "score": float(s)}
                for b, s, c in zip(boxes, scores, labels, strict=True)]
