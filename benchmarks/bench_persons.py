"""Milliseconds per frame of the persons stage's detectors, and per face of the attribute readers.

Each detector runs through :meth:`PersonsEngine.detect` (what ``/v1/persons`` runs) on the same
640×360 frame with three real faces; the figures are ratios against MTCNN measured in the same
run. The graph's detection stage (:func:`detection_stage`) is timed against the moderation it
runs beside. The attribute readers (the teacher, and livelens' network where the store has one) run on the
three faces of that frame as the engine does (the network in one batch, the teacher one crop at a
time); their ms per face are ratios against the teacher's. Threads are pinned to one, as the
Persons replica runs.

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
from livelens.store import find_in_stores


def frame_with_faces() -> np.ndarray:
    """A 640×360 frame with the astronaut's face at three sizes (a close-up and two small windows)."""
    face = data.astronaut()[40:200, 150:300]
    frame = cv2.resize(data.coffee(), (640, 360))
    for side, (x, y) in ((150, (40, 60)), (70, (400, 40)), (40, (560, 250))):
        frame[y:y + side, x:x + side] = cv2.resize(face, (side, side))
    return frame


def detection_stage(frame: np.ndarray, repeats: int) -> dict[str, Any]:
    """The graph's detection stage on ``frame`` with a window and a small QR code pasted in.

    Ratios: the stage (detector and QR box decoding) against the whole-frame moderation it runs
    beside; one window's second pass against that same moderation; the decoder on the detector's
    QR box against OCR's whole-frame QR decoder (tiled and zoomed); OCR's QR work when the stage
    is asked for (its whole-frame pass only: the tiled one is deferred) against OCR's QR work
    without it; the stage without probing doubtful QR boxes (``qr_probe``) against the stage; the
    stage without the window check (``window_check``, when the detector's card names one) against
    the stage.
    """
    from livelens.data import render
    from livelens.detection import DetectionEngine, decode_qr_box
    from livelens.moderation import ModerationEngine
    from livelens.ocr.qr import decode_qr

    frame = frame.copy()
    frame[20:140, 420:620] = cv2.resize(data.chelsea(), (200, 120))
    qr = np.asarray(render.qr_patch("https://example.com/live/8812", 1).convert("RGB"))
    frame[300:300 + qr.shape[0], 20:20 + qr.shape[1]] = qr
    eng = DetectionEngine("persons_det")
    mod = ModerationEngine("safety", threads=1)
    stage = _ms(lambda: eng.analyze(frame), repeats)
    whole = _ms(lambda: mod.moderate(frame, "none"), repeats)
    window = _ms(lambda: mod.classify_regions(frame, [[420, 20, 620, 140]]), repeats)
    qr_box = [20, 300, 20 + qr.shape[1], 300 + qr.shape[0]]
    box_ms = _ms(lambda: decode_qr_box(frame, qr_box), repeats)
    whole_qr = _ms(lambda: decode_qr(frame), max(3, repeats // 4))
    plain_qr = _ms(lambda: decode_qr(frame, second_pass=False), repeats)
    no_probe = DetectionEngine("persons_det", qr_probe=1.0)
    stage_no_probe = _ms(lambda: no_probe.analyze(frame), repeats)
    no_check = DetectionEngine("persons_det", window_check=False)
    stage_no_check = _ms(lambda: no_check.analyze(frame), repeats)
    return {"ref": eng.ref, "window_check": eng.window_check.ref if eng.window_check else None,
            "objects": [o["class"] for o in eng.analyze(frame)["objects"]],
            "stage_ms": round(stage, 2), "moderate_ms": round(whole, 2), "stage_vs_moderate": round(stage / whole, 3),
            "second_pass_ms_per_window": round(window, 2), "second_pass_vs_moderate": round(window / whole, 3),
            "qr_box_decode_ms": round(box_ms, 2), "qr_whole_frame_ms": round(whole_qr, 2),
            "qr_box_vs_whole_frame": round(box_ms / whole_qr, 4),
            "ocr_qr_with_stage_ms": round(plain_qr, 2), "ocr_qr_with_stage_vs_without": round(plain_qr / whole_qr, 4),
            "stage_without_probes_ms": round(stage_no_probe, 2),
            "stage_without_probes_vs_stage": round(stage_no_probe / stage, 3),
            "stage_without_window_check_ms": round(stage_no_check, 2),
            "stage_without_window_check_vs_stage": round(stage_no_check / stage, 3)}


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
    boxes = [f.box for f in PersonsEngine(PersonsSettings(attributes=False)).detect(frame)]
    readers = ["teacher"] + (["persons_attr"] if find_in_stores("persons_attr") else [])
    out["attributes"] = {}
    for name in readers:
        eng = PersonsEngine(PersonsSettings(attribute_model=name))
        if eng.attribute_model is not None:
            from livelens.persons.attributes import attr_crop

            fn = lambda e=eng: e.attribute_model.predict_crops([attr_crop(frame, b) for b in boxes])  # noqa: E731
        else:
            fn = lambda e=eng: [e.teacher.predict(frame[round(b[1]):round(b[3]), round(b[0]):round(b[2])])  # noqa: E731
                                for b in boxes]
        ms = _ms(fn, a.repeats) / max(1, len(boxes))
        out["attributes"][name] = {"ref": eng.attributes_ref, "ms_per_face": round(ms, 2), "faces": len(boxes)}
    for v in out["attributes"].values():
        v["vs_teacher"] = round(v["ms_per_face"] / out["attributes"]["teacher"]["ms_per_face"], 3)
        v["vs_mtcnn_frame"] = round(v["ms_per_face"] / base, 3)
    if find_in_stores("persons_det"):
        out["detection_stage"] = detection_stage(frame, a.repeats)
    else:
        out["note"] = "no persons_det in the model stores: run make train-persons for the mmdet figure"
    if not find_in_stores("persons_attr"):
        out["note_attributes"] = "no persons_attr in the model stores: run make train-attributes for its figure"
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
