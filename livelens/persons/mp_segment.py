"""Person masks from mediapipe's selfie segmentation; run in ``.venv-mp``, never imported by livelens.

mediapipe 0.10.21 ships its tflite models offline (Apache-2.0) but needs ``protobuf<5``, which
Ray's stack cannot share, so ``make setup`` gives it a virtualenv of its own and
:func:`livelens.persons.cutouts.segment_people` calls this file there. It imports only NumPy,
OpenCV and mediapipe.

Usage::

    .venv-mp/bin/python livelens/persons/mp_segment.py JOB_DIR

``JOB_DIR/job.json`` lists ``{"image": "<png file>", "faces": [[x0, y0, x1, y1], ...]}``; for each
face this writes ``<image stem>_<k>.png`` (the person's mask, 0-255, in the window around the
face) and ``JOB_DIR/result.json`` (per face: the window and the mask file, or why none).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

#: The window segmented around a face, in face widths (sides) and heights (above, below): a
#: head-and-torso shot fills it; more below takes in a standing body.
SIDE, ABOVE, BELOW = 2.5, 0.8, 6.0
#: Mask probability counted as the person.
CUT = 0.5


def window(face: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """The crop around ``face`` that is segmented, clipped to the image."""
    x0, y0, x1, y1 = face
    fw, fh = x1 - x0, y1 - y0
    return (max(0, int(x0 - SIDE * fw)), max(0, int(y0 - ABOVE * fh)),
            min(width, int(np.ceil(x1 + SIDE * fw))), min(height, int(np.ceil(y1 + BELOW * fh))))


def person_mask(prob: np.ndarray, face: list[float]) -> np.ndarray | None:
    """The soft mask (0-255) of the connected person region holding the face's centre, or None."""
    hard = (prob >= CUT).astype(np.uint8)
    n, comp = cv2.connectedComponents(hard, connectivity=8)
    cx, cy = int((face[0] + face[2]) / 2), int((face[1] + face[3]) / 2)
    if n < 2 or not (0 <= cy < comp.shape[0] and 0 <= cx < comp.shape[1]):
        return None
    label = comp[cy, cx]
    if label == 0:
        # The centre fell in a hole (an open mouth, glasses): take the component covering most of the face.
        fx0, fy0 = max(0, int(face[0])), max(0, int(face[1]))
        ids, counts = np.unique(comp[fy0:int(face[3]) + 1, fx0:int(face[2]) + 1], return_counts=True)
        keep = ids != 0
        if not keep.any():
            return None
        label = ids[keep][np.argmax(counts[keep])]
    return np.where(comp == label, np.clip(prob * 255.0, 0, 255), 0).astype(np.uint8)


def main(job_dir: str) -> int:
    import mediapipe as mp

    root = Path(job_dir)
    job = json.loads((root / "job.json").read_text())
    out = []
    with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as seg:
        for item in job:
            bgr = cv2.imread(str(root / item["image"]), cv2.IMREAD_COLOR)
            if bgr is None:
                out.append([{"error": f"cannot read {item['image']}"} for _ in item["faces"]])
                continue
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            h, w = rgb.shape[:2]
            per_face = []
            for k, face in enumerate(item["faces"]):
                x0, y0, x1, y1 = window(face, w, h)
                crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
                prob = seg.process(crop).segmentation_mask
                local = [face[0] - x0, face[1] - y0, face[2] - x0, face[3] - y0]
                mask = None if prob is None else person_mask(np.asarray(prob, np.float32), local)
                if mask is None:
                    per_face.append({"window": [x0, y0, x1, y1], "error": "no person region at the face"})
                    continue
                name = f"{Path(item['image']).stem}_{k}.png"
                cv2.imwrite(str(root / name), mask)
                per_face.append({"window": [x0, y0, x1, y1], "mask": name})
            out.append(per_face)
    (root / "result.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
