"""Face recall on real photos: the served persons stage against the offline baselines.

The photos of ``../shared/data/faces/testing.xml`` (PASCAL VOC group shots, 25 boxes) are the
held-out test set: no livelens training step reads them. Each detector runs through
:meth:`PersonsEngine.detect`, the code ``/v1/persons`` runs, with the served settings. Their
whole-person boxes are hand-labelled in ``livelens/resources/person_boxes.json``
(:func:`person_boxes`), so a detector that finds people is scored on them too.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from livelens.errors import ConfigError
from livelens.imageio import load_image
from livelens.persons.boxes import face_holder
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


#: Hand-labelled person boxes of the test photos: one per face of their XML, in its order.
PERSON_BOXES = Path(__file__).resolve().parents[1] / "resources" / "person_boxes.json"


def person_boxes(path: str | Path = PERSON_BOXES) -> dict[str, list[list[float]]]:
    """Hand-labelled whole-person boxes ``[x0, y0, x1, y1]`` by photo file name (see the file's ``about``).

    Raises:
        ConfigError: The file is not such a table.
    """
    import json

    try:
        table = json.loads(Path(path).read_text())["photos"]
        out = {str(name): [[float(v) for v in box] for box in boxes] for name, boxes in table.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"bad person-box labels {path}: {exc}") from exc
    for name, boxes in out.items():
        if any(len(b) != 4 or b[2] <= b[0] or b[3] <= b[1] for b in boxes):
            raise ConfigError(f"bad person-box labels {path}: {name} has a box that is not [x0, y0, x1, y1]")
    return out


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
    # Person labels count only where every photo of the set has them (another XML has none).
    labelled = person_boxes()
    people_truth = [labelled.get(r["attributes"]["file"]) for r in rows]
    if any(t is None for t in people_truth):
        people_truth = []
    for name in detectors:
        engine = PersonsEngine(PersonsSettings(**{**settings.__dict__, "detector": name, "attributes": False}))
        tp = n_pred = held = n_people = with_face = people_tp = 0
        t0 = time.perf_counter()
        sees_people = False
        for k, (rgb, truth) in enumerate(images):
            faces, people = engine.detect_all(rgb)
            boxes = [f.box for f in faces]
            n_pred += len(boxes)
            tp += match(boxes, truth, iou_thr)
            if people is not None:
                sees_people = True
                pboxes = [p.box for p in people]
                held += sum(face_holder(t, pboxes) is not None for t in truth)
                n_people += len(pboxes)
                with_face += sum(any(face_holder(t, [p]) is not None for t in truth) for p in pboxes)
                if people_truth:
                    people_tp += match(pboxes, people_truth[k], iou_thr)
        ms = (time.perf_counter() - t0) * 1000 / max(1, len(images))
        res = {"ref": engine.detector.ref, "recall": round(tp / max(1, out["faces"]), 4),
               "precision": round(tp / max(1, n_pred), 4), "found": n_pred, "matched": tp,
               "ms_per_image": round(ms, 1)}
        if sees_people:
            # The faces stand in for people too: a true face held by a found person box is a person
            # found, and a person box holding no true face is at most a false one (a person seen
            # from behind has no face box either).
            res["people"] = {"found": n_people, "faces_held": held, "faces_held_share": round(held / max(1, out["faces"]), 4),
                             "holding_a_true_face": with_face}
            if people_truth:  # and against the hand-labelled person boxes, one-to-one at iou_thr
                n_true = sum(len(t) for t in people_truth)
                res["people"] |= {"labelled": n_true, "matched": people_tp,
                                  "recall": round(people_tp / max(1, n_true), 4),
                                  "precision": round(people_tp / max(1, n_people), 4)}
        out["detectors"][name] = res
    return out


def _pr(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    return {"recall": round(tp / max(1, tp + fn), 4), "precision": round(tp / max(1, tp + fp), 4),
            "positives": tp + fn, "predicted": tp + fp}


def attribute_scores(engine: PersonsEngine, variants: int = 4, seed: int = 0) -> dict[str, Any]:
    """Each attribute's figures on the real held-out faces (``faces/testing.xml``'s photos), as served.

    Every variant draws glasses and a hat, each with probability 1/2, on every face of each test
    photo (seeded), and runs :meth:`PersonsEngine.analyze` on the whole photo: the detector finds
    the faces and the attribute reader sees the crops the service would. A face the detector misses
    counts as answered "no" for glasses and hat, and is not counted for gender and age.

    * glasses, hat: recall and precision against what was drawn, or worn (hand labels);
    * gender: accuracy, and per-class recall and precision against the hand labels;
    * age: no true age is known, so the band and the years are compared with the teacher's on the
      clean face (agreement, not accuracy), and P(minor) ≥ 0.5 is counted.

    Returns:
        ``{"faces", "instances", "matched", "glasses", "hat", "gender", "age", "ref"}``.
    """
    import numpy as np

    from livelens.persons.attrdata import composite, real_faces
    from livelens.persons.teachers import age_gender_teacher

    photos, faces = real_faces("test")
    teacher = age_gender_teacher()
    clean = {}
    for i, f in enumerate(faces):
        x0, y0, x1, y1 = (round(v) for v in f.box)
        clean[i] = teacher.predict(photos[f.photo][y0:y1, x0:x1])["age"]
    counts = {k: [0, 0, 0] for k in ("glasses", "hat")}  # tp, fp, fn
    gender_ok: dict[str, list[int]] = {"female": [0, 0], "male": [0, 0]}  # right, hand-labelled
    said: dict[str, int] = {}  # answers per gender, over the hand-labelled faces (for precision)
    band_ok = minors = matched = instances = 0
    years = []
    for v in range(variants):
        for p, name in enumerate(sorted(photos)):
            rng = np.random.default_rng([seed, v, p])
            rgb, truth = photos[name], []
            for i, f in enumerate(faces):
                if f.photo != name:
                    continue
                g, h = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
                rgb, _ = composite(rgb, f, g, h, rng)
                truth.append((i, f, g or f.glasses, h or f.hat))
            answer = engine.analyze(rgb)["faces"]
            for i, f, g, h in truth:
                instances += 1
                best = max(answer, key=lambda a: iou(a["box"], list(f.box)), default=None)
                attrs = (best or {}).get("attributes") if best and iou(best["box"], list(f.box)) >= 0.5 else None
                for key, want in (("glasses", g), ("hat", h)):
                    got = bool(attrs and key in attrs and attrs[key]["value"])
                    counts[key][0] += want and got
                    counts[key][1] += got and not want
                    counts[key][2] += want and not got
                if attrs is None:
                    continue
                matched += 1
                if f.gender:
                    gender_ok[f.gender][0] += attrs["gender"]["value"] == f.gender
                    gender_ok[f.gender][1] += 1
                    said[attrs["gender"]["value"]] = said.get(attrs["gender"]["value"], 0) + 1
                band_ok += attrs["age"]["band"] == clean[i]["band"]
                years.append(abs(attrs["age"]["value"] - clean[i]["value"]))
                minors += attrs["age"]["p_minor"] >= 0.5
    n_gender = sum(n for _, n in gender_ok.values())
    return {
        "set": "faces/testing.xml photos", "ref": engine.attributes_ref, "faces": len(faces), "variants": variants,
        "instances": instances, "matched": matched,
        **{k: _pr(*c) for k, c in counts.items() if engine.attribute_model is not None},
        "gender": {"accuracy": round(sum(ok for ok, _ in gender_ok.values()) / max(1, n_gender), 4),
                   **{f"recall_{k}": round(ok / max(1, n), 4) for k, (ok, n) in gender_ok.items()},
                   # NaN where a class was never answered: undefined, not perfect or zero.
                   **{f"precision_{k}": round(ok / said[k], 4) if said.get(k) else math.nan
                      for k, (ok, _) in gender_ok.items()}},
        "age": {"band_agreement_with_teacher": round(band_ok / max(1, matched), 4),
                "mean_abs_years_from_teacher": round(float(np.mean(years)) if years else 0.0, 2),
                "p_minor_over_half": minors},
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m livelens.persons.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--xml", default=str(Path(__file__).resolve().parents[3] / "shared/data/faces/testing.xml"))
    p.add_argument("--detectors", default="mtcnn,haar")
    p.add_argument("--iou", type=float, default=0.5)
    p.add_argument("--attributes", default="",
                   help="instead of face recall: score these attribute readers (teacher, persons_attr@N) "
                        "on the test faces, side by side")
    p.add_argument("--variants", type=int, default=4, help="with --attributes: drawn variants per test photo")
    opts = p.parse_args(argv)
    if opts.attributes:
        res = {}
        for name in opts.attributes.split(","):
            engine = PersonsEngine(PersonsSettings(attribute_model=name))
            t0 = time.perf_counter()
            res[name] = attribute_scores(engine, opts.variants)
            res[name]["seconds"] = round(time.perf_counter() - t0, 1)
    else:
        res = face_recall(opts.xml, tuple(opts.detectors.split(",")), iou_thr=opts.iou)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
