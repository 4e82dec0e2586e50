"""A simulated labelling loop: active learning against random selection, same model, same budget.

The pool is a manifest's train split with its labels hidden; the held-out split is never
selected from. Each round a fresh linear head (one logistic regression per label, on frozen
embeddings: the cheap retrain of the loop) is fitted on the labels bought so far, scores the
pool and the held-out set, and the strategy buys ``round_size`` more labels. Both arms start
from the same seed set and fit the same model; only the choice of frames differs.

    python -m train_jobs.active_loop          # make active-loop
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from livelens.errors import ConfigError
from livelens.loop.active import SelectionConfig, binary_uncertainty, labelwise_uncertain, select_batch


@dataclass
class LoopConfig:
    """One simulated loop.

    Attributes:
        seed_size: Labelled frames at the start (drawn at random, the same for every arm).
        round_size: Labels bought per round.
        rounds: Rounds after the seed set.
        arms: Strategies compared: ``random``; ``uncertainty`` (each frame's most doubtful
            label); ``labelwise`` (round-robin over labels of their most doubtful frames);
            ``coreset`` (k-center only); ``active`` (a labelwise pool of ``pool_factor`` × the
            round, then k-center inside it: the strategy the labelling queue uses).
        pool_factor: The ``active`` arm's candidate pool, × round size.
        c: Inverse regularisation of the logistic heads.
        seed: Seeds the seed set and every random choice.
    """

    seed_size: int = 40
    round_size: int = 40
    rounds: int = 20
    arms: Sequence[str] = ("random", "active", "uncertainty", "labelwise", "coreset")
    pool_factor: float = 2.0
    c: float = 0.05
    seed: int = 0


def label_matrix(rows: Sequence[Sequence[str]], labels: Sequence[str]) -> np.ndarray:
    index = {n: i for i, n in enumerate(labels)}
    y = np.zeros((len(rows), len(labels)), np.int8)
    for r, names in enumerate(rows):
        for n in names or ():
            if n in index:
                y[r, index[n]] = 1
    return y


class LinearHeads:
    """One logistic regression per label on standardised embeddings (a label with one class
    among the bought labels predicts that class)."""

    def __init__(self, c: float = 1.0):
        self.c = c

    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearHeads:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(x)
        xs = self.scaler.transform(x)
        self.models: list[Any] = []
        for j in range(y.shape[1]):
            col = y[:, j]
            if col.min() == col.max():
                self.models.append(float(col[0]))
            else:
                self.models.append(LogisticRegression(C=self.c, max_iter=300, class_weight="balanced").fit(xs, col))
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        xs = self.scaler.transform(x)
        return np.stack([np.full(len(x), m) if isinstance(m, float) else m.predict_proba(xs)[:, 1]
                         for m in self.models], 1)


def macro_scores(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Macro recall, precision and F1 over labels with held-out support."""
    from sklearn.metrics import f1_score, precision_score, recall_score

    keep = y.sum(0) > 0
    pred = (p >= threshold).astype(int)
    kw = {"average": "macro", "zero_division": 0}
    return {"macro_f1": float(f1_score(y[:, keep], pred[:, keep], **kw)),
            "macro_recall": float(recall_score(y[:, keep], pred[:, keep], **kw)),
            "macro_precision": float(precision_score(y[:, keep], pred[:, keep], **kw))}


def _pick(arm: str, cfg: LoopConfig, model: LinearHeads, x_pool: np.ndarray, labelled: list[int],
          rng: np.random.Generator, round_no: int) -> list[int]:
    free = np.setdiff1d(np.arange(len(x_pool)), labelled)
    k = min(cfg.round_size, len(free))
    if arm == "random":
        return rng.choice(free, size=k, replace=False).tolist()
    if arm == "coreset":
        picks = select_batch(SelectionConfig(k, seed=cfg.seed + round_no), embeddings=x_pool, labelled=labelled)
        return [p["index"] for p in picks]
    p = model.predict_proba(x_pool)
    if arm == "labelwise":
        return labelwise_uncertain(p, k, labelled)
    if arm == "uncertainty":
        picks = select_batch(SelectionConfig(k, pool_factor=1.0, seed=cfg.seed + round_no),
                             uncertainty=binary_uncertainty(p), labelled=labelled)
    elif arm == "active":
        picks = select_batch(SelectionConfig(k, pool_factor=cfg.pool_factor, seed=cfg.seed + round_no),
                             label_scores=p, embeddings=x_pool, labelled=labelled)
    else:
        raise ConfigError(f"unknown arm {arm!r}: use random, uncertainty, labelwise, coreset or active")
    return [p["index"] for p in picks]


def run_loop(cfg: LoopConfig, x_pool: np.ndarray, y_pool: np.ndarray, x_test: np.ndarray,
             y_test: np.ndarray) -> dict[str, Any]:
    """Run every arm; per arm, the held-out macro scores after each round against labels used.

    Raises:
        ConfigError: A seed set or budget larger than the pool.
    """
    need = cfg.seed_size + cfg.round_size * cfg.rounds
    if need > len(x_pool):
        raise ConfigError(f"the loop buys {need} labels but the pool has {len(x_pool)} frames")
    rng0 = np.random.default_rng(cfg.seed)
    seed_set = rng0.choice(len(x_pool), size=cfg.seed_size, replace=False).tolist()
    curves: dict[str, list[dict[str, float]]] = {}
    for arm in cfg.arms:
        rng = np.random.default_rng([cfg.seed, 1])
        labelled = list(seed_set)
        curve = []
        for r in range(cfg.rounds + 1):
            model = LinearHeads(cfg.c).fit(x_pool[labelled], y_pool[labelled])
            curve.append({"labels": len(labelled), **macro_scores(y_test, model.predict_proba(x_test))})
            if r < cfg.rounds:
                labelled += _pick(arm, cfg, model, x_pool, labelled, rng, r)
        curves[arm] = curve
    return {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
            "pool": len(x_pool), "held_out": len(x_test), "curves": curves, "summary": summarise(curves)}


def labels_to_reach(curve: Sequence[dict[str, float]], target: float, key: str = "macro_f1") -> int | None:
    """The fewest labels at which ``curve`` reaches ``target`` (None = never)."""
    for point in curve:
        if point[key] >= target - 1e-12:
            return int(point["labels"])
    return None


def summarise(curves: dict[str, list[dict[str, float]]], baseline: str = "random") -> dict[str, Any]:
    """Per arm: labels needed to reach the baseline's final macro-F1, as a share of the baseline's."""
    if baseline not in curves:
        return {}
    target = curves[baseline][-1]["macro_f1"]
    total = curves[baseline][-1]["labels"]
    out: dict[str, Any] = {"target_macro_f1": target, "baseline_labels": total}
    for arm, curve in curves.items():
        need = labels_to_reach(curve, target)
        out[arm] = {"final_macro_f1": curve[-1]["macro_f1"], "labels_to_target": need,
                    "share_of_baseline": None if need is None else round(need / total, 4)}
    return out


def plot_curves(results: Sequence[dict[str, Any]], out_png: str, key: str = "macro_f1") -> None:
    """Mean ± range over seeds of ``key`` against labels used, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, (key, "macro_recall"), strict=True):
        for arm in results[0]["curves"]:
            xs = [p["labels"] for p in results[0]["curves"][arm]]
            ys = np.asarray([[p[metric] for p in r["curves"][arm]] for r in results])
            ax.plot(xs, ys.mean(0), marker="o", ms=3, label=arm)
            ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.15)
        ax.set_xlabel("labels used")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"simulated labelling loop, {len(results)} seeds (held-out split)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def mean_curves(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per arm, the curve averaged over seeds (every seed buys labels at the same counts)."""
    out = {}
    for arm in results[0]["curves"]:
        pts = []
        for i, p in enumerate(results[0]["curves"][arm]):
            pts.append({"labels": p["labels"], **{m: float(np.mean([r["curves"][arm][i][m] for r in results]))
                                                  for m in ("macro_f1", "macro_recall", "macro_precision")}})
        out[arm] = pts
    return out


@dataclass
class SimulationJob:
    """``make active-loop``: embed the frames, run the loop for several seeds, plot and report.

    Attributes:
        manifest: The labelled manifest standing in for traffic (its labels are revealed only
            when a frame is bought).
        embeddings: Where the embedding job writes (resumed if already there).
        model: The embedding model (backbone name or stored ref).
        pool: A backbone's pooling (``avg``, or ``avgmax``: :func:`livelens.loop.embed.load_embedder`).
            ``avgmax`` was chosen on the val split (docs/loop.md): a small overlay's strongest
            cell stays in the vector.
        pool_split: Split the loop buys labels from.
        eval_split: Held-out split the curves are measured on. The strategy and its settings
            were chosen on ``val``; the reported figures use ``test``.
        seeds: One loop per seed.
        exclude_labels: Labels left out (``quality_frozen`` is temporal: no single frame shows it).
        out: Report directory.
    """

    manifest: str = "runs/data/frames"
    embeddings: str = "runs/loop/emb-frames-avgmax"
    model: str = "mobilenet_v2"
    pool: str = "avgmax"
    pool_split: str = "train"
    eval_split: str = "test"
    seeds: Sequence[int] = (0, 1, 2)
    exclude_labels: Sequence[str] = ("quality_frozen",)
    out: str = "runs/loop/active"
    loop: LoopConfig = field(default_factory=LoopConfig)


def run_simulation(job: SimulationJob) -> dict[str, Any]:
    """Embed (Ray Data job), loop per seed, write ``report.json``, ``report.md`` and ``curves.png``."""
    import json
    import time
    from dataclasses import replace
    from pathlib import Path

    from livelens.loop.embed import EmbedConfig, embed_manifest, read_embeddings

    t0 = time.time()
    embed = embed_manifest(EmbedConfig(job.manifest, job.embeddings, model=job.model, pool=job.pool, progress=False))
    e = read_embeddings(job.embeddings)
    split = np.asarray(e.table.column("split").to_pylist())
    labels = sorted({n for ls in e.labels for n in ls} - set(job.exclude_labels))
    y = label_matrix(e.labels, labels)
    pool, held = split == job.pool_split, split == job.eval_split
    if not pool.any() or not held.any():
        raise ConfigError(f"no {job.pool_split!r} or {job.eval_split!r} rows in {job.manifest}")
    results = [run_loop(replace(job.loop, seed=s), e.vectors[pool], y[pool], e.vectors[held], y[held])
               for s in job.seeds]
    mean = mean_curves(results)
    report = {"manifest": job.manifest, "model": e.model, "labels": labels, "eval_split": job.eval_split,
              "pool": int(pool.sum()), "held_out": int(held.sum()), "seeds": list(job.seeds),
              "embedding_job": embed, "per_seed": [r["summary"] for r in results], "mean": summarise(mean),
              "mean_curves": mean, "curves": [r["curves"] for r in results], "config": results[0]["config"],
              "wall_time_s": round(time.time() - t0, 1)}
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot_curves(results, str(out / "curves.png"))
    (out / "report.md").write_text(format_report(report))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The Markdown table of the loop: labels each arm needs to reach random's final macro-F1."""
    m = report["mean"]
    lines = [f"# Simulated labelling loop ({report['model']}, {len(report['labels'])} labels, "
             f"pool {report['pool']}, held-out {report['eval_split']} {report['held_out']})", "",
             f"Random's final macro-F1 (mean of seeds {report['seeds']}): {m['target_macro_f1']:.3f} at "
             f"{m['baseline_labels']} labels.", "",
             "| arm | final macro-F1 | labels to reach random's final | share of random's | per seed |",
             "|---|---|---|---|---|"]
    for arm, v in m.items():
        if not isinstance(v, dict):
            continue
        per = ", ".join("—" if s[arm]["share_of_baseline"] is None else f"{s[arm]['share_of_baseline']:.2f}"
                        for s in report["per_seed"])
        share = "never" if v["share_of_baseline"] is None else f"{v['share_of_baseline']:.2f}"
        lines.append(f"| {arm} | {v['final_macro_f1']:.3f} | {v['labels_to_target'] or '—'} | {share} | {per} |")
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)
