"""Held-out evaluation of the service's answers: per-label precision and recall at the served thresholds.

What is measured is what ``/v1/analyze`` answers: :class:`livelens.analyzer.LocalAnalyzer` runs the
deployments' engines and the gateway's fusion on each frame of a manifest split. A label counts as
predicted when the answer acts on it (:func:`livelens.fusion.fires`: the review threshold, or the
tag threshold of informational groups). Besides the fused answer, each source is scored alone and
each is left out in turn, so the table shows what every source adds.

    python -m train_jobs.eval_safety            # make eval-safety

:func:`real_photo_false_positives` puts every real photo available offline that has no overlay
through the same analyser and counts, per label, how often a review or block label fires.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from livelens import fusion
from livelens.errors import ManifestError

#: Labels no single frame can show (temporal): left out of per-frame truth and predictions.
TEMPORAL_LABELS = ("quality_frozen",)
GOAL = 0.95


def label_metrics(truth: Sequence[set[str]], pred: Sequence[set[str]], labels: Iterable[str]) -> dict[str, dict]:
    """Per label: precision, recall, F1, support, and the TP/FP/FN counts behind them.

    Precision of a label never predicted, and recall of a label with no support, are NaN
    (undefined), not 0 or 1: an empty column must not read as a success or as a failure.
    """
    if len(truth) != len(pred):
        raise ValueError(f"{len(truth)} truth sets for {len(pred)} predictions")
    out = {}
    for lab in sorted(set(labels)):
        tp = sum(lab in t and lab in p for t, p in zip(truth, pred, strict=True))
        fp = sum(lab not in t and lab in p for t, p in zip(truth, pred, strict=True))
        fn = sum(lab in t and lab not in p for t, p in zip(truth, pred, strict=True))
        precision = tp / (tp + fp) if tp + fp else math.nan
        recall = tp / (tp + fn) if tp + fn else math.nan
        f1 = 2 * precision * recall / (precision + recall) if tp else (0.0 if tp + fp + fn else math.nan)
        out[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn, "predicted": tp + fp,
                    "tp": tp, "fp": fp, "fn": fn}
    return out


def meets_goal(m: Mapping[str, float], goal: float = GOAL) -> bool:
    """Recall and precision both at least ``goal`` (NaN never meets it)."""
    return bool(m.get("precision", math.nan) >= goal and m.get("recall", math.nan) >= goal)


def _by_source(labels: Iterable[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for lab in labels:
        out.setdefault(fusion.source_of(lab), []).append(lab)
    return out


def frame_predictions(tax: Any, parts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One frame's predicted label sets: fused, each source alone, and the fusion without each source."""
    by_cap = {cap: list(res.get("labels", [])) for cap, res in parts.items()}
    regions = fusion.regions_ran(parts.get("ocr"))
    fused, _ = fusion.fuse(tax, by_cap, regions)
    sources = _by_source(lab for labs in by_cap.values() for lab in labs)
    without = {}
    for src in sources:
        caps = {cap: [lab for lab in labs if fusion.source_of(lab) != src] for cap, labs in by_cap.items()}
        # Without the regions is as if the region model were not served: it overrules nothing then.
        without[src] = fusion.fired(tax, fusion.fuse(tax, caps, regions and src != "regions")[0])
    return {"fused": fusion.fired(tax, fused), "alone": {s: fusion.fired(tax, labs) for s, labs in sources.items()},
            "without": without, "labels": fused}


def evaluate_service(analyzer: Any, manifest: str, *, split: str = "test", limit: int | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     ignore: Sequence[str] = TEMPORAL_LABELS) -> dict[str, Any]:
    """Per-label precision and recall of the service's answers on a manifest split.

    Args:
        analyzer: A :class:`~livelens.analyzer.LocalAnalyzer` (or anything with ``tax`` and ``parts``).
        manifest: Manifest directory holding ``split``.
        split: ``test`` is held out from training and from every choice of threshold.
        limit: Only the first ``limit`` rows (smoke runs).
        progress: Called with (done, total) after each frame.
        ignore: Labels left out of truth and predictions.

    Returns:
        ``{"rows", "split", "seconds", "models", "annotated", "fused", "alone": {source: …},
        "without": {source: …}, "unannotated": {label: frames}}``; each of ``fused``/``alone``/
        ``without`` maps label → :func:`label_metrics` entry. Labels the manifest never annotates
        (e.g. quality flags on the frames set) are not scored; ``unannotated`` counts where they fired.

    Raises:
        ManifestError: The split has no rows.
    """
    return evaluate_services({"service": analyzer}, manifest, split=split, limit=limit, progress=progress,
                             ignore=ignore)["service"]


def evaluate_services(analyzers: Mapping[str, Any], manifest: str, *, split: str = "test",
                      limit: int | None = None, progress: Callable[[int, int], None] | None = None,
                      ignore: Sequence[str] = TEMPORAL_LABELS) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_service` of several analysers on the same frames, each frame decoded once.

    Analysers that share stages (``LocalAnalyzer(share_from=...)``: a served and a candidate
    safety model with the same OCR, quality and persons stages) run a shared stage once per
    frame, so comparing two models costs one pass of the shared stages, not two.

    Returns:
        Name → the result :func:`evaluate_service` gives for that analyser; each one's ``seconds``
        is the time spent in its own ``parts`` calls (the first to run a shared stage pays for it).

    Raises:
        ManifestError: The split has no rows.
        ValueError: No analysers.
    """
    import inspect

    from livelens.data import decode_batch, read_manifest

    if not analyzers:
        raise ValueError("evaluate_services needs at least one analyser")
    table = read_manifest(manifest, columns=["id", "split", "image_bytes", "image_uri", "labels"])
    all_rows = table.to_pylist()
    annotated = {lab for r in all_rows for lab in (r["labels"] or []) if lab not in ignore}
    rows = [r for r in all_rows if r["split"] == split][: limit or None]
    if not rows:
        raise ManifestError(f"{manifest} has no rows in split {split!r}")
    takes_memo = {name: "memo" in inspect.signature(a.parts).parameters for name, a in analyzers.items()}
    truth: list[set[str]] = []
    preds: dict[str, list[dict[str, Any]]] = {name: [] for name in analyzers}
    unannotated: dict[str, dict[str, int]] = {name: {} for name in analyzers}
    spent = dict.fromkeys(analyzers, 0.0)
    for i, r in enumerate(rows):
        image = np.asarray(decode_batch({k: [r[k]] for k in ("id", "image_bytes", "image_uri")})["image"][0])
        truth.append({lab for lab in (r["labels"] or []) if lab in annotated})
        memo: dict[int, Any] = {}
        for name, analyzer in analyzers.items():
            t0 = time.perf_counter()
            parts = analyzer.parts(image, memo=memo) if takes_memo[name] else analyzer.parts(image)
            got = frame_predictions(analyzer.tax, parts)
            spent[name] += time.perf_counter() - t0
            for lab in got["fused"] - annotated:
                unannotated[name][lab] = unannotated[name].get(lab, 0) + 1
            preds[name].append(got)
        if progress:
            progress(i + 1, len(rows))

    def result(name: str) -> dict[str, Any]:
        analyzer, pr = analyzers[name], preds[name]

        def score(sets: list[set[str]]) -> dict[str, dict]:
            return label_metrics(truth, [s & annotated for s in sets], annotated & set(analyzer.tax.labels))

        sources = sorted({s for p in pr for s in p["alone"]} | {s for p in pr for s in p["without"]})
        return {
            "rows": len(rows), "split": split, "seconds": round(spent[name], 1),
            "models": analyzer.models() if hasattr(analyzer, "models") else [],
            "threshold_rule": "served: a label counts when the answer reviews, blocks or tags it (livelens.fusion.fires)",
            "annotated": sorted(annotated), "sources": sources,
            "fused": score([p["fused"] for p in pr]),
            "alone": {s: score([p["alone"].get(s, set()) for p in pr]) for s in sources},
            "without": {s: score([p["without"].get(s, p["fused"]) for p in pr]) for s in sources},
            "unannotated": dict(sorted(unannotated[name].items())),
        }

    return {name: result(name) for name in analyzers}


def _f(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_table(result: Mapping[str, Any], alone: Sequence[str] = ("classifier",)) -> str:
    """Markdown: per label, support, the fused precision/recall/F1, each named source alone, and each left out."""
    without = [s for s in result["sources"] if s in result["without"]]
    head = "| label | support | fused P | fused R | fused F1 | goal |"
    head += "".join(f" {s} alone P / R |" for s in alone) + "".join(f" w/o {s} R |" for s in without)
    lines = [head, "|---|---:|---:|---:|---:|---|" + "---|" * (len(alone) + len(without))]
    for lab, m in result["fused"].items():
        if not m["support"] and not m["predicted"]:
            continue
        cols = "".join(f" {_f(result['alone'].get(s, {}).get(lab, {}).get('precision', math.nan))} / "
                       f"{_f(result['alone'].get(s, {}).get(lab, {}).get('recall', math.nan))} |" for s in alone)
        cols += "".join(f" {_f(result['without'][s][lab]['recall'])} |" for s in without)
        lines.append(f"| {lab} | {m['support']} | {_f(m['precision'])} | {_f(m['recall'])} | {_f(m['f1'])} | "
                     f"{'yes' if meets_goal(m) else 'no'} |{cols}")
    return "\n".join(lines)


# -- real photos without overlays ---------------------------------------------------------------

#: Photos other installed packages ship, read in place (never copied into the repository):
#: Label Studio's sample photos (in the project's ``.venv-ls``; ``kittens1``/``kittens2`` are
#: ``kittens`` with a numeral drawn on, and the test-suite images are screenshots, so they are
#: left out), imgaug's quokka and insightface's group photo ``t1.jpg`` (six people at a table; its
#: other images are mask textures and one 112 px aligned face).
PACKAGE_PHOTOS = (("label_studio", "core/static/samples", ("kittens.jpg", "sample.jpg", "trees_in_snow.jpg")),
                  ("imgaug", "", ("quokka.jpg",)),
                  ("insightface", "data/images", ("t1.jpg",)))


def package_file(package: str, sub: str, name: str) -> Path | None:
    """Where an installed package's data file ``<package>/<sub>/<name>`` is (in this interpreter's
    site-packages, or in the project's Label Studio environment ``.venv-ls``), or None."""
    import sys

    repo = Path(__file__).resolve().parents[1]
    roots = [Path(p) for p in sys.path if p.endswith("site-packages")]
    roots += sorted(repo.glob(".venv-ls/lib/python*/site-packages"))
    return next((r / package / sub / name for r in roots if (r / package / sub / name).is_file()), None)


def package_photo_paths() -> dict[str, Path]:
    """``{name: path}`` of :data:`PACKAGE_PHOTOS` that are installed here (:func:`package_file`)."""
    out = {}
    for package, sub, names in PACKAGE_PHOTOS:
        for name in names:
            found = package_file(package, sub, name)
            if found is not None:
                out[f"{package}/{name}"] = found
    return out


def real_photos(shared: str | Path | None = None, min_side: int = 64,
                packages: bool = False) -> list[tuple[str, np.ndarray]]:
    """Every real photo available offline that carries no overlay, as ``(name, RGB)``.

    scikit-image's and scikit-learn's bundled photos, matplotlib's sample photos, and the photo
    sets of ``../shared/data`` (faces, ICDAR street scenes, the OCR demo photos). Left out: synthetic
    images (scikit-image's ``checkerboard``/``colorwheel``…, matplotlib's logo), cropped text (``word_crops``,
    ``zh_text``: a text crop is not a scene) and images under ``min_side`` pixels.

    Args:
        shared: The ``../shared/data`` folder (default: beside the repository).
        min_side: Smallest side kept.
        packages: Add :func:`package_photo_paths` too. Off by default, so that the pools (and
            splits) of evaluations published before these were found stay as they were.
    """
    from livelens.imageio import load_image

    out: list[tuple[str, np.ndarray]] = []

    def add(name: str, img: Any) -> None:
        try:
            rgb = load_image(img)
        except Exception:
            return
        if min(rgb.shape[:2]) >= min_side:
            out.append((name, rgb))

    from skimage import data as skd

    # (no "cat": scikit-image's cat() is the chelsea photo again)
    for name in ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "eagle", "grass",
                 "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle_left", "page", "retina",
                 "rocket", "text"):
        fn = getattr(skd, name, None)
        if fn is None:
            continue
        try:
            img = fn()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # a data file that would need a download: under pytest
            continue  # scikit-image raises pytest's Skipped (a BaseException) instead of an error
        if isinstance(img, tuple):
            img = img[0]
        add(f"skimage/{name}", img)
    try:
        from sklearn.datasets import load_sample_images

        for i, img in enumerate(load_sample_images().images):
            add(f"sklearn/sample_{i}", img)
    except Exception:
        pass
    try:
        import matplotlib.cbook as cbook

        for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):  # (logo2.png is a logo, not a photo)
            try:
                with cbook.get_sample_data(name) as f:
                    add(f"matplotlib/{name}", f.read())
            except (OSError, ValueError):
                continue
    except Exception:
        pass
    root = Path(shared) if shared else Path(__file__).resolve().parents[2] / "shared" / "data"
    for sub in ("faces", "icdar2015_toy/imgs", "ocr_demo"):
        for p in sorted((root / sub).glob("*")):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"):
                add(f"shared/{sub}/{p.name}", p)
    if packages:
        for name, path in package_photo_paths().items():
            add(name, path)
    return out


def real_photo_false_positives(analyzer: Any, photos: Sequence[tuple[str, np.ndarray]],
                               encode: Sequence[str] = ("png", "jpeg"),
                               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """How often each label fires (review, block or tag) on photos with no overlay.

    Each photo is sent as every encoding in ``encode`` (a PNG and a JPEG of the same photo have
    answered differently), so ``n`` is photos × encodings.

    Returns:
        ``{"images", "any_rate", "per_label": {label: {"fired", "rate", "examples"}}, "decisions"}``.
    """
    from livelens.imageio import decode_image, encode_jpeg, encode_png

    tax = analyzer.tax
    per: dict[str, dict[str, Any]] = {}
    any_fired, total = 0, 0
    decisions = {"pass": 0, "review": 0, "block": 0}
    for i, (name, rgb) in enumerate(photos):
        for enc in encode:
            data = encode_png(rgb) if enc == "png" else encode_jpeg(rgb, quality=90)
            ans = analyzer.analyze(decode_image(data))
            acting = {lab["name"] for lab in ans["labels"] if lab["decision"] != "pass" and fusion.fires(tax, lab)}
            decisions[ans["decision"]] += 1
            total += 1
            any_fired += bool(acting)
            for lab in acting:
                e = per.setdefault(lab, {"fired": 0, "examples": []})
                e["fired"] += 1
                if len(e["examples"]) < 5:
                    e["examples"].append(f"{name} ({enc})")
        if progress:
            progress(i + 1, len(photos))
    for e in per.values():
        e["rate"] = e["fired"] / max(total, 1)
    return {"images": total, "photos": len(photos), "any_rate": any_fired / max(total, 1),
            "per_label": dict(sorted(per.items(), key=lambda kv: -kv[1]["fired"])), "decisions": decisions}
