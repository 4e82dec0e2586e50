"""Whole-person cut-outs from real photos, for compositing people (not only faces) onto frames.

Each face of the training photos (:func:`livelens.persons.detdata.face_photos`: ``faces/training.xml``,
scikit-image's astronaut, matplotlib's ``grace_hopper.jpg``, insightface's group photo…; not the
headshot grid of :data:`COLLAGES`) seeds a window around it, and
mediapipe's selfie segmentation (Apache-2.0, offline in its wheel) gives the person's mask there
(:mod:`livelens.persons.mp_segment`). mediapipe 0.10.21 needs ``protobuf<5``, which Ray's stack
cannot share, so it runs in ``.venv-mp`` (made by ``make setup``) as a subprocess. A cut-out is
the window, its mask (the alpha of a paste), the face box and the body box: the mask's extent, so
a person cut by the photo's edge keeps the part the photo shows. ``faces/testing.xml`` never
enters: its photos are the persons stage's real test set.

``make cutouts`` writes each cut-out as an RGBA PNG and a summary to ``runs/persons/cutouts`` for
a reviewer to look at.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from livelens.errors import ConfigError, LivelensError
from livelens.persons.boxes import holds

ROOT = Path(__file__).resolve().parents[2]
#: The segmentation script, run by the side virtualenv's Python.
SCRIPT = Path(__file__).with_name("mp_segment.py")
#: Alpha (0-255) counted as the person when the body box is taken.
BODY_ALPHA = 128
#: A cut-out's mask must hold this share of its own face box (a mask that lost the head is a
#: torso, not a person) and at most this share of any other face's (two people are not one box).
MIN_FACE_COVER, MAX_OTHER_COVER = 0.5, 0.2
#: Photos that are grids of headshots: their faces are real, but a person's window spans the
#: tiles around it, so its mask is part of another tile's background.
COLLAGES = frozenset({"shared/faces/bald_guys.jpg"})


def mp_python() -> Path:
    """The Python of the mediapipe virtualenv (``LIVELENS_MP_PYTHON``, else ``.venv-mp``)."""
    return Path(os.environ.get("LIVELENS_MP_PYTHON") or ROOT / ".venv-mp" / "bin" / "python")


@dataclass
class Cutout:
    """One person: a window of a photo, the person's mask in it, the face and body boxes in it.

    Attributes:
        photo: Source photo name.
        rgb: The window, ``(h, w, 3)`` uint8.
        alpha: The person's mask, ``(h, w)`` uint8 (soft edges).
        face: The face box in the window.
        body: The box of the mask (alpha ≥ :data:`BODY_ALPHA`) in the window.
        origin: The window's top-left corner in the photo.
    """

    photo: str
    rgb: np.ndarray
    alpha: np.ndarray
    face: list[float]
    body: list[float]
    origin: tuple[int, int] = (0, 0)


def _body_box(alpha: np.ndarray) -> list[float] | None:
    ys, xs = np.nonzero(alpha >= BODY_ALPHA)
    if not len(xs):
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def segment_people(photos: Sequence[tuple[str, np.ndarray, Sequence[Sequence[float]]]],
                   timeout_s: float = 600.0) -> list[Cutout]:
    """The person around each face of ``photos`` (``(name, rgb, face boxes)``), where one is found.

    In a group photo each face keeps only its own share of the mask (:func:`own_share`). A face
    whose mask does not hold the face (:data:`MIN_FACE_COVER`), holds another face
    (:data:`MAX_OTHER_COVER`), or is no larger than the face gives no cut-out.

    Raises:
        ConfigError: No ``.venv-mp`` (run ``make setup``).
        LivelensError: The segmentation process failed (its error is in the message).
    """
    py = mp_python()
    if not py.is_file():
        raise ConfigError(f"no mediapipe virtualenv at {py}: run `make setup` (it makes .venv-mp)")
    with tempfile.TemporaryDirectory(prefix="ll-cut-") as tmp:
        job = []
        for i, (_, rgb, faces) in enumerate(photos):
            name = f"p{i:03d}.png"
            cv2.imwrite(str(Path(tmp) / name), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
            job.append({"image": name, "faces": [[float(v) for v in f[:4]] for f in faces]})
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        # GLOG quiets mediapipe's start-up lines; the child gets only what it needs.
        env = {"PATH": os.environ.get("PATH", ""), "GLOG_minloglevel": "2", "HOME": os.environ.get("HOME", tmp)}
        try:
            done = subprocess.run([str(py), str(SCRIPT), tmp], capture_output=True, text=True, timeout=timeout_s,
                                  env=env, check=False)
        except subprocess.TimeoutExpired:
            raise LivelensError(f"person segmentation took over {timeout_s:.0f} s") from None
        if done.returncode != 0:
            raise LivelensError(f"person segmentation failed ({done.returncode}): {done.stderr[-2000:]}")
        result = json.loads((Path(tmp) / "result.json").read_text())
        out = []
        for (name, rgb, faces), per_face in zip(photos, result, strict=True):
            for k, (face, r) in enumerate(zip(faces, per_face, strict=True)):
                if "mask" not in r:
                    continue
                x0, y0, x1, y1 = r["window"]
                alpha = own_share(cv2.imread(str(Path(tmp) / r["mask"]), cv2.IMREAD_GRAYSCALE), r["window"],
                                  faces, k)
                local = [face[0] - x0, face[1] - y0, face[2] - x0, face[3] - y0]
                body = _body_box(alpha)
                others = [[f[0] - x0, f[1] - y0, f[2] - x0, f[3] - y0] for j, f in enumerate(faces) if j != k]
                if body is None or not holds(body, local) or _covered(alpha, local) < MIN_FACE_COVER or \
                        any(_covered(alpha, o) > MAX_OTHER_COVER for o in others) or \
                        (alpha >= BODY_ALPHA).sum() <= (local[2] - local[0]) * (local[3] - local[1]):
                    continue
                out.append(Cutout(name, np.ascontiguousarray(rgb[y0:y1, x0:x1]), alpha, local, body, (x0, y0)))
    return out


def own_share(alpha: np.ndarray, window: Sequence[float], faces: Sequence[Sequence[float]], k: int) -> np.ndarray:
    """``alpha`` kept only where face ``k`` is the nearest face, and only its connected part.

    Segmentation masks every person of a group photo as one region. A body hangs below its head,
    so each pixel goes to the face nearest across (in that face's widths), and a pixel above a
    face's top counts against that face (it is someone else's head or shoulder behind).
    """
    h, w = alpha.shape
    xs = np.arange(w, dtype=np.float32)[None, :] + float(window[0])
    ys = np.arange(h, dtype=np.float32)[:, None] + float(window[1])
    dist = []
    for f in faces:
        fw, fh = max(f[2] - f[0], 1.0), max(f[3] - f[1], 1.0)
        above = np.maximum(0.0, f[1] - ys) / fh  # rows above this head: unlikely to be its body
        dist.append(np.abs(xs - (f[0] + f[2]) / 2) / fw + 2.0 * above)
    mine = np.argmin(np.stack(np.broadcast_arrays(*dist)), axis=0) == k
    own = np.where(mine, alpha, 0).astype(np.uint8)
    n, comp = cv2.connectedComponents((own >= BODY_ALPHA).astype(np.uint8), connectivity=8)
    f = faces[k]
    fx0, fy0 = max(0, int(f[0] - window[0])), max(0, int(f[1] - window[1]))
    ids, counts = np.unique(comp[fy0:int(f[3] - window[1]) + 1, fx0:int(f[2] - window[0]) + 1], return_counts=True)
    keep = ids != 0
    if n < 2 or not keep.any():
        return np.zeros_like(own)
    # Soft edges stay, around the kept component only.
    near = cv2.dilate((comp == ids[keep][np.argmax(counts[keep])]).astype(np.uint8), np.ones((5, 5), np.uint8))
    return np.where(near > 0, own, 0).astype(np.uint8)


def _covered(alpha: np.ndarray, box: Sequence[float]) -> float:
    """The share of ``box``'s pixels (inside the window) that the mask holds; 0 outside it."""
    h, w = alpha.shape
    x0, y0 = max(0, round(float(box[0]))), max(0, round(float(box[1])))
    x1, y1 = min(w, round(float(box[2]))), min(h, round(float(box[3])))
    if x1 <= x0 or y1 <= y0:
        return 0.0
    return float((alpha[y0:y1, x0:x1] >= BODY_ALPHA).mean())


def person_cutouts(shared: str | None = None) -> list[Cutout]:
    """Every person of the training photos (:func:`livelens.persons.detdata.face_photos`), less
    :data:`COLLAGES`."""
    from livelens.persons.detdata import face_photos

    return segment_people([p for p in face_photos(shared) if p[0] not in COLLAGES])


def main(argv: list[str] | None = None) -> int:
    """``make cutouts``: each cut-out as an RGBA PNG, and ``summary.json``."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/persons/cutouts")
    a = p.parse_args(argv)
    try:
        cuts = person_cutouts()
    except LivelensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for i, c in enumerate(cuts):
        name = f"{i:02d}_{Path(c.photo).stem}.png"
        rgba = np.dstack([cv2.cvtColor(c.rgb, cv2.COLOR_RGB2BGR), c.alpha])
        cv2.imwrite(str(out / name), rgba)
        summary.append({"file": name, "photo": c.photo, "face": c.face, "body": c.body,
                        "window": list(c.rgb.shape[1::-1])})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(cuts)} cut-outs of {len({c.photo for c in cuts})} photos in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
