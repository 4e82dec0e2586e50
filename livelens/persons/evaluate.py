"""Face recall on real photos: the served persons stage against the offline baselines.

The photos of ``../shared/data/faces/testing.xml`` (PASCAL VOC group shots, 25 boxes) are the
held-out test set: no livelens training step reads them. Each detector runs through
:meth:`PersonsEngine.detect`, the code ``/v1/persons`` runs, with the served settings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from livelens.imageio import load_image
from livelens.persons.engine import PersonsEngine, PersonsSettings


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(pred: list[list[float]], truth: list[list[float]], thr: float = 0.5) -> int:
    """Greedy one-to-one matches at IoU ≥ ``thr``, best pairs first: the true positives."""
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)), reverse=True)
    used_p, used_t, tp = set(), set(), 0
    for v, i, j in pairs:
        if v < thr:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            tp += 1
    return tp


def face_recall(xml_file: str | Path, detectors: tuple[str, ...] = ("mtcnn", "haar"),
                settings: PersonsSettings = PersonsSettings(), iou_thr: float = 0.5) -> dict[str, Any]:
    """Recall, precision and ms per image of each detector on a dlib imglab XML set.

    dlib's boxes are tight around eyes, nose and mouth, MTCNN's include the forehead and chin:
    the same face can sit below IoU 0.5. ``iou_thr`` is reported with the figures, never tuned.
    """
    from livelens.data.importers import import_dlib_xml

    rows = import_dlib_xml(xml_file)
    images = [(load_image(r["image_bytes"]), r["attributes"]["faces"]) for r in rows]
    out: dict[str, Any] = {"set": str(xml_file), "images": len(images),
                           "faces": sum(len(t) for _, t in images), "iou": iou_thr, "detectors": {}}
    for name in detectors:
        engine = PersonsEngine(PersonsSettings(**{**settings.__dict__, "detector": name, "attributes": False}))
        tp = n_pred = 0
        t0 = time.perf_counter()
        for rgb, truth in images:
            boxes = [f.box for f in engine.detect(rgb)]
            n_pred += len(boxes)
            tp += match(boxes, truth, iou_thr)
        ms = (time.perf_counter() - t0) * 1000 / max(1, len(images))
        out["detectors"][name] = {"ref": engine.detector.ref, "recall": round(tp / max(1, out["faces"]), 4),
                                  "precision": round(tp / max(1, n_pred), 4), "found": n_pred, "matched": tp,
                                  "ms_per_image": round(ms, 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m livelens.persons.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--xml", default=str(Path(__file__).resolve().parents[3] / "shared/data/faces/testing.xml"))
    p.add_argument("--detectors", default="mtcnn,haar")
    p.add_argument("--iou", type=float, default=0.5)
    opts = p.parse_args(argv)
    res = face_recall(opts.xml, tuple(opts.detectors.split(",")), iou_thr=opts.iou)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
