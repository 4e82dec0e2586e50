"""``make eval-quality``: per-measure accuracy/precision/recall on held-out photos, classical
baselines side by side, real motion blur (scikit-image ``clock`` vs ``camera``), and SROCC/LCC of
the learned score.

Usage::

    python -m livelens.quality.evaluate --out runs/eval-quality [--max-photos 12]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from skimage import data as skd

from livelens.quality import assess
from livelens.quality import distort as D
from livelens.quality.dataset import photo_split, real_photos
from livelens.quality.measures import laplacian_variance, luminance

# Positives and negatives per measure, planted on held-out photos. Negatives include *other*
# distortions, so a measure that fires on everything scores badly on precision.
CASES: dict[str, list[tuple[str, Callable[[np.ndarray, int], np.ndarray], bool]]] = {
    "blur": [
        ("gauss_s2", lambda im, s: D.gaussian_blur(im, 2.0), True),
        ("gauss_s3.5", lambda im, s: D.gaussian_blur(im, 3.5), True),
        ("motion_l12", lambda im, s: D.motion_blur(im, 12, angle_deg=20.0 * s), True),
        ("motion_l20", lambda im, s: D.motion_blur(im, 20, angle_deg=35.0 * s), True),
        ("clean", lambda im, s: im, False),
        ("noise_s10", lambda im, s: D.gaussian_noise(im, 10, seed=s), False),
        ("jpeg_q30", lambda im, s: D.jpeg(im, 30), False),
        ("dark_g0.6", lambda im, s: D.exposure(im, 0.6), False),
    ],
    "dark": [
        ("gain_0.15", lambda im, s: D.exposure(im, 0.15), True),
        ("gamma_3", lambda im, s: D.gamma(im, 3.0), True),
        ("clean", lambda im, s: im, False),
        ("gain_1.3", lambda im, s: D.exposure(im, 1.3), False),
    ],
    "bright": [
        ("gain_3.5", lambda im, s: D.exposure(im, 3.5), True),
        ("gamma_0.2", lambda im, s: D.gamma(im, 0.2), True),
        ("clean", lambda im, s: im, False),
        ("gain_0.7", lambda im, s: D.exposure(im, 0.7), False),
    ],
    "occlusion": [
        ("block", lambda im, s: D.plant_occluder(im, 0.12, "block", seed=s)[0], True),
        ("sticker", lambda im, s: D.plant_occluder(im, 0.12, "sticker", seed=s)[0], True),
        ("hand", lambda im, s: D.plant_occluder(im, 0.2, "hand", seed=s)[0], True),
        ("clean", lambda im, s: im, False),
        ("gauss_s2", lambda im, s: D.gaussian_blur(im, 2.0), False),
    ],
    "black": [
        ("black", lambda im, s: D.exposure(im, 0.0) + np.uint8(s % 5), True),
        ("gain_0.1", lambda im, s: D.exposure(im, 0.1), False),
        ("clean", lambda im, s: im, False),
    ],
    "noise": [
        ("noise_s12", lambda im, s: D.gaussian_noise(im, 12, seed=s), True),
        ("noise_s25", lambda im, s: D.gaussian_noise(im, 25, seed=s), True),
        ("clean", lambda im, s: im, False),
        ("jpeg_q30", lambda im, s: D.jpeg(im, 30), False),
    ],
    "compression": [
        ("jpeg_q8", lambda im, s: D.jpeg(im, 8), True),
        ("jpeg_q4", lambda im, s: D.jpeg(im, 4), True),
        ("clean", lambda im, s: im, False),
        ("noise_s10", lambda im, s: D.gaussian_noise(im, 10, seed=s), False),
    ],
}


def _flag(result: dict[str, Any], measure: str) -> bool:
    if measure in ("dark", "bright"):
        return bool(result["brightness"][measure])
    return bool(result[measure]["flag"])


def prf(pred: list[bool], truth: list[bool]) -> dict[str, float]:
    """Accuracy, precision and recall of boolean predictions."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    return {"n": len(p), "accuracy": float((p == t).mean()), "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0}


def _best_threshold(values: list[float], truth: list[bool], higher_is_positive: bool) -> float:
    """The baseline's threshold that maximises accuracy on the *training* photos."""
    v = np.asarray(values)
    t = np.asarray(truth, bool)
    best, best_acc = float(v[0]), -1.0
    for c in np.unique(v):
        pred = v >= c if higher_is_positive else v <= c
        acc = float((pred == t).mean())
        if acc > best_acc:
            best, best_acc = float(c), acc
    return best


def evaluate(max_photos: int | None = None, shared: Path | None = None) -> dict[str, Any]:
    """Run every table; returns rows and the real-blur check (and the IQA metrics if a model is stored)."""
    from skimage.measure import blur_effect

    photos = real_photos(shared, side=512)
    names = sorted(photos)
    train_names = [n for n in names if photo_split(n) == "train"][: max_photos]
    test_names = [n for n in names if photo_split(n) == "test"][: max_photos]
    rows: list[dict[str, Any]] = []
    blur_feats: dict[str, list[tuple[float, float, bool]]] = {"train": [], "test": []}
    for measure, cases in CASES.items():
        pred, truth = [], []
        for split, subset in (("train", train_names), ("test", test_names)):
            for i, name in enumerate(subset):
                for _, fn, positive in cases:
                    img = fn(photos[name], i)
                    if split == "test":
                        pred.append(_flag(assess(img), measure))
                        truth.append(positive)
                    if measure == "blur":
                        g = luminance(img)
                        blur_feats[split].append((laplacian_variance(g), float(blur_effect(g)), positive))
        rows.append({"measure": measure, "method": "livelens assess (default thresholds)", **prf(pred, truth)})
    # Classical baselines for blur: each alone, its threshold fitted on the training photos.
    for j, (method, higher) in enumerate((("Laplacian variance alone", False), ("skimage blur_effect alone", True))):
        tr = blur_feats["train"]
        thr = _best_threshold([f[j] for f in tr], [f[2] for f in tr], higher)
        te = blur_feats["test"]
        pred = [(f[j] >= thr) if higher else (f[j] <= thr) for f in te]
        rows.append({"measure": "blur", "method": f"{method} (thr {thr:.4g} fitted on train photos)",
                     **prf(pred, [f[2] for f in te])})
    clock, camera = assess(skd.clock())["blur"], assess(skd.camera())["blur"]
    real = {"clock_flagged": clock["flag"], "clock_score": clock["score"], "clock_motion": clock["motion"],
            "camera_flagged": camera["flag"], "camera_score": camera["score"]}
    return {"rows": rows, "real_blur": real, "train_photos": train_names, "test_photos": test_names,
            "iqa": evaluate_iqa()}


def evaluate_iqa() -> dict[str, Any] | None:
    """SROCC/LCC of the stored ``quality_iqa`` on the held-out photos of its cached feature set, if both exist."""
    from livelens.errors import ModelNotFoundError
    from livelens.quality.iqa import MODEL_NAME, IqaModel, lcc, srocc
    from livelens.quality.training import QualityTrainConfig
    from livelens.store import ModelStore

    cfg = QualityTrainConfig()
    try:
        model = IqaModel.from_store(ModelStore(cfg.model_store), MODEL_NAME)
    except ModelNotFoundError:
        return None
    cache = Path(cfg.features_cache)
    if not cache.is_file():
        return {"model": model.ref, "card_metrics": ModelStore(cfg.model_store).card(model.ref).get("metrics")}
    with np.load(cache) as z:
        x, y, test, dist = z["x"], z["y"], z["test"], z["distortion"]
    if x.shape[1] != model.net.arch.in_features:  # the cache is from another feature set
        return {"model": model.ref, "card_metrics": ModelStore(cfg.model_store).card(model.ref).get("metrics")}
    pred = model.score_features(x[test])
    per = {}
    for d in sorted(set(dist[test]) - {"none"}):
        sel = (dist[test] == d) | (dist[test] == "none")
        per[d] = srocc(pred[sel], y[test][sel])
    return {"model": model.ref, "n_test": int(test.sum()), "srocc": srocc(pred, y[test]), "lcc": lcc(pred, y[test]),
            "srocc_per_distortion": per}


def to_markdown(result: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    lines = ["## Quality measures on held-out photos", "",
             "| measure | method | n | accuracy | precision | recall |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['measure']} | {r['method']} | {r['n']} | {r['accuracy']:.3f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} |")
    rb = result["real_blur"]
    lines += ["", "## Real motion blur", "",
              f"- `clock` flagged: **{rb['clock_flagged']}** (score {rb['clock_score']}, motion {rb['clock_motion']})",
              f"- `camera` flagged: **{rb['camera_flagged']}** (score {rb['camera_score']})"]
    iq = result.get("iqa")
    lines += ["", "## Learned NR-IQA", ""]
    if iq is None:
        lines.append("No `quality_iqa` in the model store: run `make train-quality`.")
    else:
        lines.append(f"- model {iq['model']}, held-out n={iq.get('n_test')}: SROCC **{iq.get('srocc', 0):.3f}**, "
                     f"LCC **{iq.get('lcc', 0):.3f}** (goal SROCC ≥ 0.9)")
        for d, v in (iq.get("srocc_per_distortion") or {}).items():
            lines.append(f"  - {d}: SROCC {v:.3f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/eval-quality")
    p.add_argument("--max-photos", type=int, default=None, help="per split (default: all)")
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"))
    a = p.parse_args(argv)
    t0 = time.time()
    shared = Path(a.shared)
    result = evaluate(a.max_photos, shared if shared.is_dir() else None)
    result["wall_time_s"] = round(time.time() - t0, 1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(result)
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str))
    with (out / "measures.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["measure", "method", "n", "accuracy", "precision", "recall"])
        w.writeheader()
        w.writerows(result["rows"])
    print(md)


if __name__ == "__main__":
    main()
