"""Text-region recognition: OCR boxes as proposals for a second, region-level classifier.

The seed's second pass re-classifies a crop around a small target so that it is seen at full
resolution. For overlays that carry text (watermarks, logos, banners) the best proposals are
not Grad-CAM boxes — a 128 px first pass barely reacts to a semi-transparent corner watermark,
so its heatmap points nowhere — but the text detector's boxes, which the OCR stage computes
anyway. This is the detection → OCR → classification composition of the design card: each
detected text box is widened to take in its surroundings (a logo's icon, a banner's strip, the
scene showing through a watermark), cropped from the original frame, and classified by a
frozen ImageNet backbone plus a small head that also sees where the box sits in the frame
(watermarks sit in corners, banners span the width). A frame's score for a label is its best
region's.

The head is trained on the generated frames by :mod:`livelens.train.regions`
(``make train-regions``); regions whose box centre falls in no ad overlay are its negatives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from livelens.errors import ConfigError
from livelens.models.factory import IMAGENET_MEAN, IMAGENET_STD, create_model

#: Region classes: the negative first, then the ads labels a text box can carry.
REGION_CLASSES = ("region_none", "ads_watermark", "ads_logo", "ads_text_banner", "ads_phone", "ads_url",
                  "ads_wechat_id", "ads_qq_id")
#: Labels whose frame verdict the regions raise by default. Phones, URLs and ids come from OCR
#: entities, whose regular expressions are more precise than any appearance model.
FUSE_LABELS = ("ads_watermark", "ads_logo", "ads_text_banner")
GEOMETRY_DIM = 9
CROP_HW = (96, 288)


def region_window(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The crop for a text box: one box height of context above and below, two at the sides.

    Two heights at the side take in a logo's icon (about twice the text height, left of the
    name); a fixed ×1.5 would give a short brand name almost no context.
    """
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    h = max(y1 - y0, 1.0)
    side = max(2.0 * h, 0.25 * (x1 - x0))
    nx0, ny0 = max(0, int(np.floor(x0 - side))), max(0, int(np.floor(y0 - h)))
    nx1, ny1 = min(width, int(np.ceil(x1 + side))), min(height, int(np.ceil(y1 + h)))
    return nx0, ny0, max(nx1, nx0 + 1), max(ny1, ny0 + 1)


def geometry_features(boxes: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """Where each box sits: centre, size, aspect, distance to the nearest corner and edges.

    Returns:
        (N, :data:`GEOMETRY_DIM`) float32, every feature scaled to about [0, 1] (aspect: log/4).
    """
    out = np.zeros((len(boxes), GEOMETRY_DIM), np.float32)
    if width <= 0 or height <= 0:
        raise ConfigError(f"frame size must be positive, got {width}x{height}")
    for i, b in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) for v in b[:4])
        cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        w, h = max(x1 - x0, 1.0) / width, max(y1 - y0, 1.0) / height
        dx, dy = min(cx, 1 - cx), min(cy, 1 - cy)
        corner = min(np.hypot(px - cx, py - cy) for px in (0, 1) for py in (0, 1)) / np.sqrt(2)
        aspect = np.log(max(x1 - x0, 1.0) / max(y1 - y0, 1.0)) / 4
        out[i] = (cx, cy, w, h, dx, dy, corner, aspect, float(width >= height))
    return out


def crop_regions(frame: np.ndarray, boxes: Sequence[Sequence[float]], hw: tuple[int, int] = CROP_HW) -> torch.Tensor:
    """Normalised (N, 3, H, W) crops of each box's :func:`region_window` from the full frame."""
    fh, fw = frame.shape[:2]
    if not len(boxes):
        return torch.zeros((0, 3, *hw))
    crops = []
    for b in boxes:
        x0, y0, x1, y1 = region_window(b, fw, fh)
        crops.append(cv2.resize(np.ascontiguousarray(frame[y0:y1, x0:x1]), (hw[1], hw[0]),
                                interpolation=cv2.INTER_AREA))
    arr = np.stack(crops).astype(np.float32) / 255.0
    arr = (arr - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


class RegionHead(nn.Module):
    """Pooled crop features ⊕ box geometry → region class logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, drop_rate: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features + GEOMETRY_DIM, hidden), nn.ReLU(), nn.Dropout(drop_rate),
                                 nn.Linear(hidden, num_classes))

    def forward(self, feats: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([feats, geometry], dim=1))


class RegionClassifier(nn.Module):
    """A frozen ImageNet backbone (from :func:`~livelens.models.create_model`) and a :class:`RegionHead`.

    Attributes:
        classes: Output class names, the negative first.
        crop_hw: Crop size fed to the backbone.
        thresholds: Per-label score above which a region raises its label (0.5 when absent).
    """

    def __init__(self, backbone: str = "mobilenet_v2", classes: Sequence[str] = REGION_CLASSES,
                 crop_hw: tuple[int, int] = CROP_HW, pretrained: bool = True, hidden: int = 256):
        super().__init__()
        if len(classes) < 2 or classes[0] != "region_none":
            raise ConfigError(f"region classes must start with 'region_none', got {list(classes)}")
        base = create_model(backbone, "avg", num_classes=2, pretrained=pretrained)
        self.backbone = base.backbone.eval().requires_grad_(False)
        self.backbone_name = backbone
        self.channels = base.num_features
        self.classes = tuple(classes)
        self.crop_hw = tuple(int(v) for v in crop_hw)
        self.hidden = hidden
        self.head = RegionHead(self.channels, len(self.classes), hidden)
        self.thresholds: dict[str, float] = {}

    def train(self, mode: bool = True) -> RegionClassifier:
        # The backbone stays in eval mode: its BatchNorm statistics are ImageNet's, which is
        # what lets a head-only save rebuild it from the offline weights.
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.inference_mode()
    def features(self, crops: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled backbone features of normalised crops, (N, C)."""
        if not len(crops):
            return torch.zeros((0, self.channels))
        return self.backbone(crops).mean(dim=(2, 3))

    def forward(self, crops: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(crops), geometry)

    def arch(self) -> dict[str, Any]:
        return {"kind": "region_classifier", "backbone": self.backbone_name, "classes": list(self.classes),
                "crop_hw": list(self.crop_hw), "hidden": self.hidden}

    @torch.inference_mode()
    def classify(self, frame: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        """Softmax probabilities (N, K) for each box of ``frame`` (RGB uint8, full resolution)."""
        if not len(boxes):
            return np.zeros((0, len(self.classes)), np.float32)
        h, w = frame.shape[:2]
        geo = torch.from_numpy(geometry_features(boxes, w, h))
        logits = self.head(self.features(crop_regions(frame, boxes, self.crop_hw)), geo)
        return torch.softmax(logits.float(), dim=1).numpy()


@dataclass(frozen=True)
class RegionHit:
    """One text region whose best class is an ad label above its threshold."""

    label: str
    score: float
    box: tuple[float, float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": round(self.score, 4), "box": [round(v, 1) for v in self.box]}


def contact_flags(boxes: Sequence[Sequence[float]], entity_boxes: Sequence[Sequence[float]]) -> list[bool]:
    """Per text box: whether an OCR contact entity (phone, URL, WeChat/QQ id) has its centre in it.

    Args:
        boxes: Text boxes ``(x0, y0, x1, y1)``.
        entity_boxes: Boxes of the frame's text entities (not QR codes: those are not text boxes).
    """
    centres = [((e[0] + e[2]) / 2, (e[1] + e[3]) / 2) for e in entity_boxes]
    return [any(b[0] - 2 <= cx <= b[2] + 2 and b[1] - 2 <= cy <= b[3] + 2 for cx, cy in centres) for b in boxes]


#: What a contact-looking box is when OCR read no contact in it: a text strip, i.e. a banner.
REFUTED_CONTACT = "ads_text_banner"


def box_decisions(classes: Sequence[str], probs: np.ndarray, contacts: Sequence[bool] | None = None,
                  fuse: Sequence[str] = FUSE_LABELS, refuted: str = REFUTED_CONTACT) -> list[tuple[str, float]]:
    """``(class, score)`` per box: its best class, unless the reading refutes it.

    A pill with "TOP UP NOW" on it looks like a phone pill: by appearance, a box can only say
    that it is a contact overlay, and the OCR reading says whether a contact is there. So when
    ``contacts`` says no entity was read in a box whose best class is a contact class (phone,
    URL, ids), the box is an ad strip carrying other text: ``refuted`` (a banner), scored by the
    whole ad mass ``1 − p(region_none)``. Falling back to the best of all fused classes instead
    also turned such boxes into watermarks and logos: held-out watermark accuracy fell from 0.963
    to 0.945, and the val-chosen logo threshold jumped to 0.95.

    Args:
        classes: The model's classes, the negative first.
        probs: (N, K) softmax probabilities.
        contacts: Per box, whether OCR read a contact entity in it; None leaves appearance alone.
        fuse: The classes the model reports itself (a best class outside them is a contact class).
        refuted: What a refuted contact box becomes.
    """
    out = []
    for i, p in enumerate(probs):
        j = int(np.argmax(p))
        name, score = classes[j], float(p[j])
        if contacts is not None and j != 0 and name not in fuse and refuted in classes and not contacts[i]:
            name, score = refuted, float(1.0 - p[0])
        out.append((name, score))
    return out


def region_hits(model: RegionClassifier, frame: np.ndarray, boxes: Sequence[Sequence[float]],
                labels: Sequence[str] | None = FUSE_LABELS, contacts: Sequence[bool] | None = None,
                probs: np.ndarray | None = None) -> list[RegionHit]:
    """Classify every box and keep those whose class is a (fusable) label above threshold.

    Args:
        model: The region classifier.
        frame: RGB uint8 frame at full resolution.
        boxes: Text boxes ``(x0, y0, x1, y1)`` in frame pixels (e.g. OCR lines' ``box``).
        labels: Labels to report; None for every positive class.
        contacts: Per box, whether OCR read a contact entity in it (:func:`contact_flags`); see
            :func:`box_decisions`. None judges by appearance alone.
        probs: ``model.classify(frame, boxes)`` when already computed (e.g. while the text was read).

    Returns:
        Hits, strongest first.
    """
    probs = model.classify(frame, boxes) if probs is None else probs
    hits = []
    for b, (name, score) in zip(boxes, box_decisions(model.classes, probs, contacts), strict=True):
        if name == model.classes[0] or (labels is not None and name not in labels):
            continue
        if score >= model.thresholds.get(name, 0.5):
            hits.append(RegionHit(name, score, tuple(float(v) for v in b[:4])))
    return sorted(hits, key=lambda h: -h.score)


def frame_labels(hits: Sequence[RegionHit]) -> dict[str, float]:
    """Best score per label over a frame's hits."""
    best: dict[str, float] = {}
    for h in hits:
        best[h.label] = max(best.get(h.label, 0.0), h.score)
    return best


def save_region_model(store: Any, name: str, model: RegionClassifier, card: Mapping[str, Any]) -> str:
    """Publish the head (the backbone is ImageNet's and rebuilt on load) as ``name@<next>``."""
    state = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    return store.save(name, state, {**card, "arch": model.arch(), "state": "head_only", "backbone_weights": "imagenet",
                                    "thresholds": dict(model.thresholds)})


def load_region_model(store: Any, ref: str) -> RegionClassifier:
    """Rebuild a region classifier from its card and load its head (``weights_only``, strict).

    Raises:
        ConfigError: The card is not a region classifier's or the weights do not fit it.
    """
    stored = store.load(ref)
    arch = stored.card.get("arch") or {}
    if arch.get("kind") != "region_classifier":
        raise ConfigError(f"{stored.ref} is not a region classifier (arch kind {arch.get('kind')!r})")
    model = RegionClassifier(arch["backbone"], tuple(arch["classes"]), tuple(arch["crop_hw"]), pretrained=True,
                             hidden=int(arch.get("hidden", 256)))
    head_state = {k[len("head."):]: v for k, v in stored.state_dict.items() if k.startswith("head.")}
    try:
        model.head.load_state_dict(head_state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{stored.ref}: weights do not match the architecture: {exc}") from exc
    model.thresholds = {str(k): float(v) for k, v in (stored.card.get("thresholds") or {}).items()}
    return model.eval()


def open_region_model(ref: str, stores: Sequence[str] | None = None) -> tuple[RegionClassifier, str, str]:
    """Load a region classifier from the store chain.

    Returns:
        ``(model, name@version, store root)``.

    Raises:
        ModelNotFoundError: ``ref`` is in no store of the chain.
        ConfigError: Its card is not a region classifier's.
    """
    from livelens.store import open_in_stores

    store, full = open_in_stores(ref, stores)
    return load_region_model(store, full), full, store.uri
