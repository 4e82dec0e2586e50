"""Fit and evaluate the learned quality flags (``quality_flags``) on graded distortions of real photos.

``make train-quality-flags`` runs :func:`run`:

1. every item of :mod:`livelens.quality.realset` is rendered and featurised in Ray tasks, with the
   same function that serving calls (:func:`livelens.quality.assess.flag_inputs`);
2. for each evaluation seed, the photos are split photo-disjoint; each flag's trees (and the
   occluder head) are fitted on the training photos, and the decision threshold is chosen on
   out-of-fold scores from a cross-validation grouped by photo, so the test photos are never
   looked at while choosing;
3. each test frame is then decoded from PNG bytes and answered by
   :meth:`livelens.quality.engine.QualityEngine.assess`, the code of ``/v1/quality``, with the
   classical flags of the same call as the "before" column;
4. the model of :attr:`FlagTrainConfig.ship_seed` is registered in the model store with its card.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from livelens.errors import ConfigError
from livelens.quality import flags as fl
from livelens.quality import realset as R
from livelens.quality.flag_checks import raised
from livelens.store import user_store


@dataclass
class FlagTrainConfig:
    """Settings of ``make train-quality-flags``.

    Attributes:
        seeds: Photo-disjoint splits to train and evaluate on (the figures are given per seed).
        ship_seed: The seed whose model is registered (its card names its test photos).
        test_share: Share of photos held out per seed.
        folds: Folds of the grouped cross-validation that chooses each flag's threshold.
        cache: Features of the rendered set, reused while the item list is unchanged; empty: none.
        model_store: Where the model is registered.
        register: Publish the ship seed's model.
        out: Where the report is written.
        max_photos: Use only this many photos (tests); 0: all.
        hard_negative_weight: Loss weight of the hard-negative windows relative to other frames.
        windows: Distorted windows cut from each photo (:func:`livelens.quality.realset.bases`):
            the centre and ``windows - 1`` random ones. More views of the same photos, for
            training and for the held-out figures alike.
        tilt_features: Fit on the frame's spectral tilt too (:func:`livelens.quality.focus.focus_features`,
            the last columns of :func:`livelens.quality.flags.features`); False: only the
            :data:`~livelens.quality.flags.LEGACY_FEATURES` columns ``quality_flags@1`` reads, to compare.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    ship_seed: int = 0
    test_share: float = 0.3
    folds: int = 5
    cache: str = "runs/quality/flag_inputs.npz"
    model_store: str = field(default_factory=user_store)
    register: bool = True
    out: str = "runs/eval-quality-flags"
    max_photos: int = 0
    hard_negative_weight: float = 4.0
    windows: int = 2
    tilt_features: bool = True

    def __post_init__(self) -> None:
        if not self.seeds or self.ship_seed not in self.seeds:
            raise ConfigError(f"ship_seed {self.ship_seed} must be one of seeds {self.seeds}")
        if not 0.05 <= self.test_share <= 0.6 or self.folds < 2:
            raise ConfigError("test_share must be in [0.05, 0.6] and folds ≥ 2")
        if not 1 <= self.windows <= 8:
            raise ConfigError(f"windows must be in [1, 8], got {self.windows}")


def _photos(max_photos: int = 0) -> dict[str, np.ndarray]:
    """The set's photos by name: every offline real photo large enough for a stream frame
    (:func:`livelens.quality.realset.usable`), the first ``max_photos`` by name (0: all)."""
    from livelens.evaluation import real_photos

    # Not the photos other packages ship (real_photos(packages=True)): a fit with them flagged
    # more of its held-out hard negatives than the classical thresholds (docs/quality.md).
    photos = {n: rgb for n, rgb in real_photos() if R.usable(rgb)}
    if not photos:
        raise ConfigError("no real photos found (scikit-image, scikit-learn, matplotlib, ../shared/data)")
    names = sorted(photos)[: max_photos or None]
    return {n: photos[n] for n in names}


def _featurise_photos(names: list[str], max_photos: int, windows: int = 2) -> list[tuple[R.Item, np.ndarray, np.ndarray]]:
    from livelens.quality.assess import flag_inputs

    photos = _photos(max_photos)
    out = []
    for n in names:
        for it in R.items_for(n, photos[n], windows):
            x, fmap, _ = flag_inputs(R.render(it, photos[n]))
            out.append((it, x, fmap.astype(np.float16)))
    return out


def featurise(photos: dict[str, np.ndarray], max_photos: int = 0, cache: str = "", windows: int = 2) -> dict[str, Any]:
    """Render and featurise every item of ``photos`` in Ray tasks (one task per photo; Ray must be up)."""
    import ray

    items = [it for n in sorted(photos) for it in R.items_for(n, photos[n], windows)]
    keys = np.array([it.key for it in items])
    # Rows are pure functions of their item's key and the render version: reuse every cached row
    # whose key is still in the set, and featurise only the photos that have a row missing.
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if cache and Path(cache).is_file():
        with np.load(cache) as z:
            cached_x = z["x"]  # each z[...] reads the array from the archive again: read once
            version = int(z["version"]) if "version" in z.files else 1
            if cached_x.shape[1] == fl.N_FEATURES and version == R.RENDER_VERSION:
                cached_maps, wanted = z["maps"], set(keys.tolist())
                for i, k in enumerate(z["keys"].tolist()):
                    if k in wanted:
                        rows[k] = (cached_x[i], cached_maps[i])
    todo = sorted({it.photo for it in items if it.key not in rows})
    if not todo:
        return {"items": items, "x": np.stack([rows[k][0] for k in keys]).astype(np.float32),
                "maps": np.stack([rows[k][1] for k in keys])}
    task = ray.remote(num_cpus=1)(_featurise_photos)
    from tqdm import tqdm

    refs = [task.remote([n], max_photos, windows) for n in todo]
    with tqdm(total=len(refs), desc="quality flags: featurise photos") as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for it, x, fmap in ray.get(done[0]):
                rows[it.key] = (x, fmap)
            bar.update(1)
    x = np.stack([rows[k][0] for k in keys]).astype(np.float32)
    maps = np.stack([rows[k][1] for k in keys])
    if cache:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, keys=keys, x=x, maps=maps, version=R.RENDER_VERSION)
    return {"items": items, "x": x, "maps": maps}


def _best_threshold(p: np.ndarray, y: np.ndarray) -> float:
    """The probability threshold that maximises min(precision, recall), then F1, on out-of-fold scores."""
    best, best_key = 0.5, (-1.0, -1.0)
    for t in np.unique(np.round(p, 4)):
        pred = p >= t
        tp = float((pred & y).sum())
        prec, rec = tp / max(pred.sum(), 1), tp / max(y.sum(), 1)
        key = (min(prec, rec), 2 * prec * rec / max(prec + rec, 1e-9))
        if key > best_key:
            best, best_key = float(t), key
    return best


def fit_model(x: np.ndarray, maps: np.ndarray, y: np.ndarray, groups: np.ndarray, *, folds: int = 5,
              seed: int = 0, weight: np.ndarray | None = None) -> tuple[fl.FlagModel, dict[str, Any]]:
    """Fit every flag on training rows; thresholds from a cross-validation grouped by photo.

    Args:
        x: Feature rows ``(n, N_FEATURES)``.
        maps: Occluder feature maps ``(n, 1280, 6, 10)``.
        y: 0/1 targets ``(n, len(FLAGS))``.
        groups: The photo of each row (no photo is in two folds).
        folds: Cross-validation folds.
        seed: Seeds the trees and the head.
        weight: Per-row weight of the trees' loss (hard negatives count more); None: equal.

    Returns:
        The model and the out-of-fold figures that chose its thresholds.
    """
    from sklearn.model_selection import GroupKFold

    y = y.astype(bool)
    splits = list(GroupKFold(n_splits=min(folds, len(set(groups)))).split(x, groups=groups))
    # Occluder head: out-of-fold logits become an input of the occlusion trees.
    j_occ = fl.FLAGS.index("occlusion")
    oof_logit = np.zeros(len(x), np.float32)
    for tr, va in splits:
        head = fl.fit_occluder_head(maps[tr], y[tr, j_occ], seed=seed)
        oof_logit[va] = fl.occluder_logits(head, maps[va])
    head = fl.fit_occluder_head(maps, y[:, j_occ], seed=seed)
    trees, thresholds, cv = {}, {}, {}
    for j, f in enumerate(fl.FLAGS):
        xf = np.concatenate([x, oof_logit[:, None]], axis=1) if f == "occlusion" else x
        oof = np.zeros(len(x))
        for tr, va in splits:
            oof[va] = fl.fit_trees(xf[tr], y[tr, j], seed, None if weight is None else weight[tr]).predict_proba(
                xf[va])[:, 1]
        thresholds[f] = _best_threshold(oof, y[:, j])
        pred = oof >= thresholds[f]
        tp = int((pred & y[:, j]).sum())
        cv[f] = {"threshold": thresholds[f], "precision": tp / max(int(pred.sum()), 1),
                 "recall": tp / max(int(y[:, j].sum()), 1)}
        trees[f] = fl.pack_trees(fl.fit_trees(xf, y[:, j], seed, weight))
    return fl.FlagModel(trees, thresholds, head, n_features=x.shape[1]), cv


def answer_row(item: R.Item, rgb: np.ndarray, learned: Any, classical: Any) -> dict[str, Any]:
    """One item of the set rendered from its photo's ``rgb``, encoded as PNG and probed like an
    upload, and the flags both engines (:class:`~livelens.quality.engine.QualityEngine`) raise on it."""
    from livelens.imageio import encode_png, probe_image

    img = probe_image(encode_png(R.render(item, rgb)))
    return {"key": item.key, "distortion": item.distortion, "level": item.level, "base": item.base,
            "kind": item.kind, "truth": sorted(item.flags),
            "after": sorted(raised(learned.assess(img))), "before": sorted(raised(classical.assess(img)))}


def _answer_items(state: dict, names: list[str], max_photos: int, windows: int = 2) -> list[dict[str, Any]]:
    """Serve the items of ``names`` through the quality engine, as PNG bytes like an upload."""
    from livelens.quality.engine import QualityEngine

    photos = _photos(max_photos)
    learned = QualityEngine(iqa_ref=None, flags_ref=None)
    learned.flags = (fl.FlagModel.from_state(state, "candidate"), {"ref": "candidate"})
    classical = QualityEngine(iqa_ref=None, flags_ref=None)
    return [answer_row(it, photos[n], learned, classical) for n in names for it in R.items_for(n, photos[n], windows)]


def check_state(state: dict[str, Any], held_out: list[str], ref: str = "candidate") -> list[Any]:
    """The release checks (:mod:`livelens.quality.flag_checks`) of a model state on its held-out photos."""
    from livelens.quality import flag_checks as C
    from livelens.quality.engine import QualityEngine

    keep = set(held_out)
    photos = {n: rgb for n, rgb in _photos().items() if n in keep}
    engine = QualityEngine(iqa_ref=None, flags_ref=None)
    engine.flags = (fl.FlagModel.from_state(state, ref), {"ref": ref})
    return C.release_checks(engine, QualityEngine(iqa_ref=None, flags_ref=None), photos)


def table(rows: list[dict[str, Any]], which: str) -> dict[str, dict[str, dict[str, float]]]:
    """Precision and recall per flag × level of ``which`` (``before`` or ``after``) answers.

    Each level's recall counts that level's positives; its precision counts them against every
    false alarm of the flag (negatives have no level), so a level's precision is the flag's
    precision had only that level been positive.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for f in fl.FLAGS:
        neg = [r for r in rows if f not in r["truth"]]
        fp = sum(f in r[which] for r in neg)
        per: dict[str, dict[str, float]] = {}
        pos_all = [r for r in rows if f in r["truth"]]
        for lv in ["all", 1, 2, 3, 4, 5]:
            # A level is the level of the flag's own distortion; a photo's own defect
            # (realset.INTRINSIC_FLAGS) on a frame distorted otherwise counts under "all" only.
            pos = pos_all if lv == "all" else [r for r in pos_all
                                               if r["level"] == lv and R.FLAG_OF.get(r["distortion"]) == f]
            tp = sum(f in r[which] for r in pos)
            per[str(lv)] = {"n": len(pos), "recall": tp / max(len(pos), 1), "precision": tp / max(tp + fp, 1)}
        per["negatives"] = {"n": len(neg), "false_alarms": fp}
        out[f] = per
    return out


def run(cfg: FlagTrainConfig | None = None) -> dict[str, Any]:
    """Featurise, fit and evaluate per seed, register the ship seed's model, write the report."""
    import ray

    cfg = cfg or FlagTrainConfig()
    t0 = time.time()
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    photos = _photos(cfg.max_photos)
    data = featurise(photos, cfg.max_photos, cfg.cache, cfg.windows)
    items, x, maps = data["items"], data["x"], data["maps"].astype(np.float32)
    if not cfg.tilt_features:
        x = x[:, : fl.LEGACY_FEATURES]
    y = np.array([[f in it.flags for f in fl.FLAGS] for it in items])
    groups = np.array([it.photo for it in items])
    # A photo has 6 hard-negative windows against ~80 distorted frames: weight them up so that
    # "a dark jacket is not darkness" weighs as much as the distortions do.
    weight = np.array([cfg.hard_negative_weight if it.base in R.HARD_NEGATIVES else 1.0 for it in items])
    t_feat = time.time() - t0
    answer = ray.remote(num_cpus=1)(_answer_items)
    result: dict[str, Any] = {"config": asdict(cfg), "n_items": len(items), "photos": sorted(photos), "seeds": {}}
    shipped = None
    for seed in cfg.seeds:
        train, test = R.photo_splits(sorted(photos), seed, cfg.test_share)
        sel = np.isin(groups, train)
        model, cv = fit_model(x[sel], maps[sel], y[sel], groups[sel], folds=cfg.folds, seed=seed,
                              weight=weight[sel])
        state_ref = ray.put(model.state_dict())
        rows = [r for part in ray.get([answer.remote(state_ref, [n], cfg.max_photos, cfg.windows) for n in test]) for r in part]
        exact_before = float(np.mean([r["before"] == r["truth"] for r in rows]))
        exact_after = float(np.mean([r["after"] == r["truth"] for r in rows]))
        result["seeds"][str(seed)] = {"train_photos": train, "test_photos": test, "cv": cv, "n_test": len(rows),
                                      "before": table(rows, "before"), "after": table(rows, "after"),
                                      "exact_before": exact_before, "exact_after": exact_after,
                                      "errors": [r for r in rows if r["after"] != r["truth"]]}
        print(f"[quality flags] seed {seed}: exactly right {exact_before:.3f} → {exact_after:.3f} on {len(rows)} "
              f"frames of {len(test)} held-out photos", flush=True)
        if seed == cfg.ship_seed:
            shipped = model
    result["wall_time_s"] = round(time.time() - t0, 1)
    result["featurise_s"] = round(t_feat, 1)
    if cfg.register and shipped is not None:
        from livelens.store import ModelStore

        s = result["seeds"][str(cfg.ship_seed)]
        card = {"kind": "quality_flags", "flags": list(fl.FLAGS), "thresholds": shipped.thresholds,
                "arch": {"trees": "HistGradientBoosting 200 rounds × 15 leaves per flag",
                         "occluder_head": "2 × 1×1 conv over mobilenet_v2 ImageNet features, max over cells",
                         "in_features": shipped.n_features},
                "datasets": [{"name": "livelens.quality.realset", "photos": s["train_photos"],
                              "levels": R.LEVELS, "windows": list(R.bases(cfg.windows))}],
                "metrics": {"held_out_photos": s["test_photos"], "after": s["after"], "before": s["before"],
                            "cv": s["cv"]},
                "licence": "weights: livelens (Apache-2.0); backbone: torchvision mobilenet_v2 ImageNet weights "
                           "(BSD-3-Clause), not stored here"}
        result["ref"] = ModelStore(cfg.model_store).save(fl.MODEL_NAME, shipped.state_dict(), card)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "report.md").write_text(to_markdown(result))
    return result


def table_lines(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """A Markdown table of two :func:`table` results: P and R per flag × level, and false alarms."""
    lines = ["| flag | level | n | before P | before R | after P | after R |", "|---|---|---|---|---|---|---|"]
    for f in fl.FLAGS:
        for lv in ["all", "1", "2", "3", "4", "5"]:
            b, a = before[f][lv], after[f][lv]
            lines.append(f"| {f} | {lv} | {a['n']} | {b['precision']:.3f} | {b['recall']:.3f} | "
                         f"{a['precision']:.3f} | {a['recall']:.3f} |")
        lines.append(f"| {f} | false alarms | {after[f]['negatives']['n']} | "
                     f"{before[f]['negatives']['false_alarms']} | | {after[f]['negatives']['false_alarms']} | |")
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    """The per-flag × level table of every seed, before (classical) and after (learned)."""
    lines = [f"# Quality flags on held-out real photos ({result['n_items']} frames of {len(result['photos'])} photos)",
             ""]
    for seed, s in result["seeds"].items():
        lines += [f"## Seed {seed}: {len(s['train_photos'])} training photos, {len(s['test_photos'])} held out "
                  f"({s['n_test']} frames)", "",
                  f"Exactly the right flags: before {s['exact_before']:.3f}, after **{s['exact_after']:.3f}**", "",
                  *table_lines(s["before"], s["after"])]
        lines += ["", f"Held-out photos: {', '.join(s['test_photos'])}", ""]
    return "\n".join(lines) + "\n"
