"""Milliseconds per frame of the persons stage's detectors, and per face crop of the attribute teacher.

Each detector runs through :meth:`PersonsEngine.detect` (what ``/v1/persons`` runs) on the same
640×360 frame with three real faces; the figures are ratios against MTCNN measured in the same
run. The attribute cost per crop is given against one MTCNN frame. Threads are pinned to one, as
the Persons replica runs.

    python -m benchmarks.bench_persons [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import cv2
import numpy as np
import torch
from skimage import data

from benchmarks.bench_quality import _ms
from livelens.persons.engine import PersonsEngine, PersonsSettings
from livelens.persons.teachers import age_gender_teacher
from livelens.store import find_in_stores


def frame_with_faces() -> np.ndarray:
    """A 640×360 frame with the astronaut's face at three sizes (a close-up and two small windows)."""
    face = data.astronaut()[40:200, 150:300]
    frame = cv2.resize(data.coffee(), (640, 360))
    for side, (x, y) in ((150, (40, 60)), (70, (400, 40)), (40, (560, 250))):
        frame[y:y + side, x:x + side] = cv2.resize(face, (side, side))
    return frame


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    frame = frame_with_faces()
    detectors = ["mtcnn", "haar"] + (["persons_det"] if find_in_stores("persons_det") else [])
    out: dict[str, Any] = {"frame": list(frame.shape[:2]), "detectors": {}}
    for name in detectors:
        eng = PersonsEngine(PersonsSettings(detector=name, attributes=False))
        ms = _ms(lambda e=eng: e.detect(frame), a.repeats)
        out["detectors"][name] = {"ref": eng.detector.ref, "ms_per_frame": round(ms, 2),
                                  "faces": len(eng.detect(frame))}
    base = out["detectors"]["mtcnn"]["ms_per_frame"]
    for v in out["detectors"].values():
        v["vs_mtcnn"] = round(v["ms_per_frame"] / base, 3)
    teacher = age_gender_teacher()
    crop = data.astronaut()[62:172, 181:267]
    ms = _ms(lambda: teacher.predict(crop), a.repeats)
    out["attributes"] = {"ref": teacher.ref, "ms_per_crop": round(ms, 2), "vs_mtcnn_frame": round(ms / base, 3)}
    if not find_in_stores("persons_det"):
        out["note"] = "no persons_det in the model stores: run make train-persons for the mmdet figure"
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
