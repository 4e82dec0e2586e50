"""Real face crops for the attribute network, with glasses and hats composited on them.

Two photo-disjoint pools of real faces (found by the MTCNN teacher, which gives the landmarks):

* ``train``: every photo in ../shared/data/faces except those of ``testing.xml`` (the four
  ``training.xml`` photos, ``Tom_Cruise_avp_2014_4.jpg``, ``bald_guys.jpg``; 42 faces), plus
  scikit-image's astronaut and camera, matplotlib's ``grace_hopper.jpg`` and insightface's group
  photo ``t1.jpg`` (six faces; read where the package is installed).
* ``test``: the five photos of ``faces/testing.xml`` (25 faces): no training step reads them.

Labels: glasses and hats are true by construction where they were drawn
(:func:`livelens.persons.attributes.draw_glasses` / ``draw_hat``), and hand-labelled where a real
face wears them (``resources/face_attributes.json``, which also holds the test faces' gender).
Gender and age targets for training are the teacher's probabilities on the clean face:
distillation, not truth.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livelens.errors import ConfigError
from livelens.persons.attributes import CROP_SIZE, attr_crop, crop_matrix, draw_glasses, draw_hat

SPLITS = ("train", "test")
#: Faces the teacher detector scores below this are not used (no landmarks to draw on).
MIN_TEACHER_SCORE = 0.95


@dataclass(frozen=True)
class RealFace:
    """One real face: where it is, and what is known of it.

    Attributes:
        photo: The photo's name (a key of the pool's photos).
        box: MTCNN's ``[x0, y0, x1, y1]``.
        landmarks: MTCNN's five points.
        glasses: The face wears glasses (hand label).
        hat: The face wears a hat (hand label).
        gender: Hand-labelled gender (test faces), else None.
    """

    photo: str
    box: tuple[float, ...]
    landmarks: tuple[tuple[float, float], ...]
    glasses: bool = False
    hat: bool = False
    gender: str | None = None


def hand_labels() -> list[dict[str, Any]]:
    """The hand labels of ``resources/face_attributes.json``."""
    text = (resources.files("livelens") / "resources" / "face_attributes.json").read_text()
    return json.loads(text)["faces"]


def _photos(split: str, shared: Path | None) -> dict[str, np.ndarray]:
    from livelens.imageio import load_image

    if shared is None or not (shared / "faces" / "testing.xml").is_file():
        raise ConfigError("the attribute data needs ../shared/data/faces (set LIVELENS_SHARED)")
    faces_dir = shared / "faces"
    test_files = set(_xml_files(faces_dir / "testing.xml"))
    if split == "test":
        return {f: load_image(faces_dir / f) for f in sorted(test_files)}
    import matplotlib.cbook
    import skimage.data

    out = {p.name: load_image(p) for p in sorted(faces_dir.glob("*.jpg")) if p.name not in test_files}
    out["astronaut"] = skimage.data.astronaut()
    out["camera"] = np.repeat(skimage.data.camera()[:, :, None], 3, axis=2)
    out["grace_hopper"] = load_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    from livelens.evaluation import package_photo_paths
    from livelens.persons.detdata import PACKAGE_PEOPLE_PHOTOS

    found = package_photo_paths()  # read where the package is installed, never copied
    out.update({n: load_image(found[n]) for n in PACKAGE_PEOPLE_PHOTOS if n in found})
    return out


def _xml_files(xml: Path) -> list[str]:
    import xml.etree.ElementTree as ET

    return [img.get("file") for img in ET.parse(xml).getroot().iter("image")]


@functools.lru_cache(maxsize=2)
def real_faces(split: str, shared: str | None = None) -> tuple[dict[str, np.ndarray], tuple[RealFace, ...]]:
    """The photos of ``split`` and their faces, with the hand labels attached.

    Args:
        split: ``train`` or ``test``.
        shared: ../shared/data (default: the one :mod:`livelens.data.render` finds).

    Raises:
        ConfigError: Unknown split, or no ../shared/data.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    from livelens.data.render import shared_data_dir
    from livelens.persons.teachers import MtcnnFaces

    photos = _photos(split, Path(shared) if shared else shared_data_dir())
    labels = [h for h in hand_labels() if h["photo"] in photos]
    detector = MtcnnFaces()
    faces = []
    for name, rgb in photos.items():
        for f in detector.detect(rgb):
            if f.score < MIN_TEACHER_SCORE:
                continue
            cx, cy, w = (f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2, f.box[2] - f.box[0]
            near = [h for h in labels if h["photo"] == name
                    and abs(h["center"][0] - cx) < w / 2 and abs(h["center"][1] - cy) < w / 2]
            h = near[0] if near else {}
            faces.append(RealFace(name, tuple(f.box), tuple(tuple(p) for p in f.landmarks),
                                  bool(h.get("glasses")), bool(h.get("hat")), h.get("gender")))
    return photos, tuple(faces)


@functools.lru_cache(maxsize=256)
def _teacher_probs(split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    from livelens.persons.teachers import age_gender_teacher

    photos, faces = real_faces(split)
    f = faces[index]
    x0, y0, x1, y1 = (round(v) for v in f.box)
    return age_gender_teacher().probabilities(photos[f.photo][y0:y1, x0:x1])


@functools.lru_cache(maxsize=1)
def face_weights() -> np.ndarray:
    """Sampling weights of the train faces: each gender (the teacher's) drawn equally often.

    Most train faces are men (``bald_guys.jpg`` alone has 24); drawn uniformly, the student saw
    women in under a third of its samples and learned to answer "male".
    """
    _, faces = real_faces("train")
    male = np.array([int(np.argmax(_teacher_probs("train", i)[0])) for i in range(len(faces))])
    w = np.where(male == 1, 1.0 / max(1, male.sum()), 1.0 / max(1, (1 - male).sum()))
    return w / w.sum()


def composite(rgb: np.ndarray, face: RealFace, glasses: bool, hat: bool, rng: np.random.Generator
              ) -> tuple[np.ndarray, list[float]]:
    """``rgb`` with glasses and/or a hat drawn on ``face``, and the face box (for evaluation photos)."""
    if glasses:
        rgb = draw_glasses(rgb, face.landmarks, rng)
    if hat:
        rgb = draw_hat(rgb, face.landmarks, rng)
    return rgb, list(face.box)


def _augment(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = crop
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.35:  # a small face in the frame: few real pixels, scaled up
        s = int(rng.integers(20, 64))
        out = cv2.resize(cv2.resize(np.ascontiguousarray(out), (s, s), interpolation=cv2.INTER_AREA),
                         out.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    f = out.astype(np.float32) * rng.uniform(0.6, 1.35) * rng.uniform(0.85, 1.15, 3) + rng.uniform(-20, 20)
    if rng.random() < 0.1:
        f[:] = f.mean(axis=2, keepdims=True)
    out = np.clip(f, 0, 255).astype(np.uint8)
    if rng.random() < 0.2:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 1.5))
    if rng.random() < 0.4:
        _, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 95))])
        out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return np.ascontiguousarray(out)


def make_sample(seed: int, slot: int, p_glasses: float = 0.45, p_hat: float = 0.45) -> dict[str, Any]:
    """One training sample, determined by ``(seed, slot)``: a train face, maybe with glasses and a hat.

    The crop is cut around a jittered box (a detector's boxes vary) and augmented.

    Returns:
        ``{"crop": uint8 (CROP_SIZE, CROP_SIZE, 3), "gender": float32 (2,), "age": float32 (81,),
        "glasses": int, "hat": int}``.
    """
    rng = np.random.default_rng([seed, slot])
    photos, faces = real_faces("train")
    i = int(rng.choice(len(faces), p=face_weights()))
    face = faces[i]
    glasses, hat = rng.random() < p_glasses, rng.random() < p_hat
    x0, y0, x1, y1 = face.box
    w, h = x1 - x0, y1 - y0
    s = rng.uniform(0.85, 1.2)
    cx, cy = (x0 + x1) / 2 + rng.uniform(-0.1, 0.1) * w, (y0 + y1) / 2 + rng.uniform(-0.1, 0.1) * h
    jittered = [cx - s * w / 2, cy - s * h / 2, cx + s * w / 2, cy + s * h / 2]
    # Cut the crop first and draw on it at twice the input size: drawing on a whole photo costs
    # far more, and the drawing is shrunk to the input size as a detector's crop would be.
    big = 2 * CROP_SIZE
    m = crop_matrix(jittered, big)
    crop = attr_crop(photos[face.photo], jittered, big)
    marks = [tuple(m[:, :2] @ np.asarray(p, np.float32) + m[:, 2]) for p in face.landmarks]
    if glasses:
        crop = draw_glasses(crop, marks, rng)
    if hat:
        crop = draw_hat(crop, marks, rng)
    crop = cv2.resize(crop, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)
    p_gender, p_age = _teacher_probs("train", i)
    return {"crop": _augment(crop, rng), "gender": p_gender, "age": p_age,
            "glasses": int(glasses or face.glasses), "hat": int(hat or face.hat)}
