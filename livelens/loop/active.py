"""Active learning (主动学习): which unlabelled frames a labeller should see next.

Three signals, each a score per frame where higher means "label this":

- **uncertainty** of one head: :func:`entropy`, :func:`margin` or :func:`least_confidence` of a
  softmax head, and :func:`binary_uncertainty` of independent sigmoid labels;
- **disagreement** between sources that judge one concept (:func:`disagreement`): the classifier's
  ``ads_*`` score against OCR entities, text regions and open_nsfw;
- **diversity**: :func:`k_center_greedy` picks frames far from everything labelled or already
  picked (the core-set of Sener & Savarese), so a batch does not spend its budget on one cluster.

:func:`select_batch` combines them: the most informative ``pool_factor × budget`` candidates by
uncertainty and disagreement, then a core-set pass among them. :func:`write_queue` writes the
picks as a labelling-queue manifest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from livelens.errors import ConfigError, EmbeddingError
from livelens.loop.embed import check_compatible


def _probs(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ConfigError(f"class probabilities must be (N, C≥2), got shape {p.shape}")
    if (p < -1e-6).any() or not np.allclose(p.sum(1), 1, atol=1e-3):
        raise ConfigError("class probabilities must be non-negative rows summing to 1 (a softmax)")
    return np.clip(p, 0, 1)


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row, scaled to [0, 1] by log C."""
    p = _probs(p)
    return -(p * np.log(np.clip(p, 1e-12, 1))).sum(1) / np.log(p.shape[1])


def margin(p: np.ndarray) -> np.ndarray:
    """1 − (top-1 − top-2): high when the two best classes are close."""
    p = _probs(p)
    top = np.sort(p, axis=1)
    return 1.0 - (top[:, -1] - top[:, -2])


def least_confidence(p: np.ndarray) -> np.ndarray:
    """1 − top-1 probability, scaled to [0, 1] by C / (C − 1)."""
    p = _probs(p)
    c = p.shape[1]
    return (1.0 - p.max(1)) * c / (c - 1)


def binary_uncertainty(scores: np.ndarray, thresholds: np.ndarray | float = 0.5,
                       reduce: Literal["max", "mean"] = "max") -> np.ndarray:
    """Uncertainty of independent sigmoid labels: 1 at a label's threshold, 0 at 0 or 1.

    Each label's distance to its own threshold is scaled so both ends of [0, 1] score 0, then
    the labels of a frame are reduced (``max``: its most doubtful label decides).
    """
    s = np.asarray(scores, np.float64)
    if s.ndim == 1:
        s = s[:, None]
    t = np.broadcast_to(np.asarray(thresholds, np.float64), s.shape[1:])
    if ((t <= 0) | (t >= 1)).any():
        raise ConfigError("thresholds must be inside (0, 1)")
    u = np.where(s >= t, (1 - s) / (1 - t), s / t)
    return u.max(1) if reduce == "max" else u.mean(1)


def labelwise_uncertain(scores: np.ndarray, budget: int, labelled: Sequence[int] = (),
                        thresholds: np.ndarray | float = 0.5) -> list[int]:
    """Round-robin over labels, each taking its most doubtful free frame in turn.

    A frame's single most doubtful label (:func:`binary_uncertainty` with ``max``) lets the
    common labels' borderline frames crowd out the rare labels; macro scores weigh every label
    alike, so each label gets an equal share of the budget here.

    Returns:
        Picked indices in pick order (distinct, never a labelled one).
    """
    s = np.asarray(scores, np.float64)
    if s.ndim != 2:
        raise ConfigError(f"label scores must be (N, labels), got shape {s.shape}")
    t = np.broadcast_to(np.asarray(thresholds, np.float64), s.shape[1:])
    u = np.where(s >= t, (1 - s) / (1 - t), s / t)
    taken = set(int(i) for i in labelled)
    orders = [iter(np.argsort(-u[:, j], kind="stable").tolist()) for j in range(s.shape[1])]
    picked: list[int] = []
    limit = min(budget, s.shape[0] - len(taken))
    while len(picked) < limit:
        for it in orders:
            for i in it:
                if i not in taken:
                    taken.add(i)
                    picked.append(i)
                    break
            if len(picked) >= limit:
                break
    return picked


def disagreement(sources: Mapping[str, np.ndarray]) -> np.ndarray:
    """How much sources that score one concept disagree: the spread (max − min) of their scores.

    Args:
        sources: Per source, (N,) scores in [0, 1] for the same concept and frames, e.g.
            ``{"classifier": p_ads, "ocr_entities": has_phone, "text_regions": has_text}``.
            NaN means the source did not judge that frame; it is left out there.

    Raises:
        ConfigError: Fewer than two sources, or scores of different lengths.
    """
    if len(sources) < 2:
        raise ConfigError("disagreement needs at least two sources")
    arrs = [np.asarray(v, np.float64).ravel() for v in sources.values()]
    if len({len(a) for a in arrs}) != 1:
        raise ConfigError(f"sources have different lengths {[len(a) for a in arrs]}")
    m = np.stack(arrs, 1)
    with np.errstate(all="ignore"):
        spread = np.nanmax(m, 1) - np.nanmin(m, 1)
    return np.nan_to_num(spread, nan=0.0)


def k_center_greedy(x: np.ndarray, budget: int, labelled: Sequence[int] = (), *,
                    candidates: Sequence[int] | None = None, seed: int = 0) -> list[int]:
    """Core-set selection: repeatedly pick the candidate farthest from every centre so far.

    Args:
        x: (N, dim) embeddings (compared by Euclidean distance of unit vectors).
        budget: How many to pick.
        labelled: Indices already labelled (the first centres).
        candidates: Indices that may be picked (default: all not labelled).
        seed: Picks the first centre when nothing is labelled.

    Returns:
        Picked indices in pick order (at most ``budget``, never a labelled one).
    """
    from livelens.loop.cluster import normalise

    check_compatible(x)
    x = normalise(x)
    n = len(x)
    cand = np.asarray(sorted(set(range(n)) - set(labelled)) if candidates is None else
                      sorted(set(int(c) for c in candidates) - set(labelled)), np.int64)
    if budget <= 0 or not len(cand):
        return []
    xc = x[cand]
    dist = np.full(len(cand), np.inf)
    for i in labelled:
        dist = np.minimum(dist, ((xc - x[int(i)]) ** 2).sum(1))
    picked: list[int] = []
    if not np.isfinite(dist).any():
        first = int(np.random.default_rng(seed).integers(len(cand)))
        picked.append(int(cand[first]))
        dist = np.minimum(dist, ((xc - xc[first]) ** 2).sum(1))
        dist[first] = -1
    while len(picked) < min(budget, len(cand)):
        j = int(np.argmax(dist))
        picked.append(int(cand[j]))
        dist = np.minimum(dist, ((xc - xc[j]) ** 2).sum(1))
        dist[j] = -1
    return picked


@dataclass(frozen=True)
class SelectionConfig:
    """How a round's batch is picked.

    Attributes:
        budget: Frames to label this round.
        uncertainty_weight: Weight of the uncertainty score.
        disagreement_weight: Weight of the disagreement score.
        pool_factor: Candidates kept by informativeness before the diversity pass (× budget);
            1 = pure uncertainty, large = pure core-set.
        random_share: Share of the budget drawn uniformly (keeps the queue honest about what the
            model does not know it does not know).
        seed: Seeds the random share and the first core-set centre.
    """

    budget: int
    uncertainty_weight: float = 1.0
    disagreement_weight: float = 1.0
    pool_factor: float = 3.0
    random_share: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.budget < 1:
            raise ConfigError(f"budget must be ≥1, got {self.budget}")
        if self.pool_factor < 1:
            raise ConfigError(f"pool_factor must be ≥1, got {self.pool_factor}")
        if not 0 <= self.random_share <= 1:
            raise ConfigError(f"random_share must be in [0, 1], got {self.random_share}")


def select_batch(cfg: SelectionConfig, *, uncertainty: np.ndarray | None = None,
                 label_scores: np.ndarray | None = None, disagreement_score: np.ndarray | None = None,
                 embeddings: np.ndarray | None = None, labelled: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Pick one round's frames to label.

    Args:
        cfg: Budget and weights.
        uncertainty: (N,) uncertainty of each frame (:func:`entropy`, :func:`margin`, :func:`least_confidence` or :func:`binary_uncertainty`).
        label_scores: (N, labels) sigmoid scores: candidates then come round-robin per label
            (:func:`labelwise_uncertain`), interleaved with the best by ``uncertainty`` and
            ``disagreement_score`` when those are given too.
        disagreement_score: (N,) disagreement between sources.
        embeddings: (N, dim) embeddings for the diversity pass (None = no diversity pass).
        labelled: Indices already labelled; never picked again.

    Returns:
        One dict per pick: ``index``, ``score`` and ``reason`` (``informative``, ``diverse`` or ``random``).

    Raises:
        ConfigError: No signal at all, or signals of different lengths.
        EmbeddingError: Embeddings of the wrong shape.
    """
    sizes = {len(a) for a in (uncertainty, label_scores, disagreement_score, embeddings) if a is not None}
    if not sizes:
        raise ConfigError("select_batch needs uncertainty, label scores, disagreement or embeddings")
    if len(sizes) > 1:
        raise ConfigError(f"signals cover different numbers of frames {sorted(sizes)}")
    n = sizes.pop()
    score = np.zeros(n)
    if uncertainty is not None:
        score += cfg.uncertainty_weight * np.asarray(uncertainty, np.float64)
    if disagreement_score is not None:
        score += cfg.disagreement_weight * np.asarray(disagreement_score, np.float64)
    taken = set(int(i) for i in labelled)
    free = np.asarray([i for i in range(n) if i not in taken], np.int64)
    if not len(free):
        return []
    rng = np.random.default_rng(cfg.seed)
    n_random = min(len(free), round(cfg.budget * cfg.random_share))
    n_main = min(len(free) - n_random, cfg.budget - n_random)
    scored = uncertainty is not None or disagreement_score is not None
    has_signal = scored or label_scores is not None
    picks: list[dict[str, Any]] = []
    size = max(n_main, int(np.ceil(cfg.pool_factor * n_main)))
    if has_signal:
        orders = []
        if label_scores is not None:
            orders.append(labelwise_uncertain(label_scores, size, sorted(taken)))
        if scored:
            orders.append(free[np.argsort(-score[free], kind="stable")][:size].tolist())
        # Interleave the candidate orders so each signal gets its share of the pool.
        merged = [i for group in zip(*[o + [None] * (size - len(o)) for o in orders], strict=True) for i in group]
        pool = np.asarray(list(dict.fromkeys(i for i in merged if i is not None))[:size], np.int64)
    else:
        pool = free
    if embeddings is not None and len(pool) > n_main:
        if len(embeddings) != n:
            raise EmbeddingError(f"{len(embeddings)} embeddings for {n} frames")
        chosen = k_center_greedy(embeddings, n_main, labelled=sorted(taken), candidates=pool, seed=cfg.seed)
        reason = "diverse" if has_signal else "core-set"
    else:
        chosen, reason = pool[:n_main].tolist(), "informative"
    picks += [{"index": int(i), "score": float(score[i]), "reason": reason} for i in chosen]
    rest = np.asarray(sorted(set(free.tolist()) - set(chosen)), np.int64)
    if n_random and len(rest):
        for i in rng.choice(rest, size=min(n_random, len(rest)), replace=False):
            picks.append({"index": int(i), "score": float(score[i]), "reason": "random"})
    return picks


def write_queue(manifest: str | Path, ids: Sequence[str], picks: Sequence[Mapping[str, Any]], out: str | Path,
                *, round_no: int = 0, model: str | None = None,
                disagreements: Sequence[Mapping[str, Any] | None] | None = None) -> Path:
    """Write the labelling queue: the picked manifest rows, each with why it was picked.

    The queue is itself a manifest (so the labelling page, Ray Data and training read it
    unchanged); each row's ``attributes`` gains ``queue: {rank, score, reason, round, model}``.

    Args:
        disagreements: Per frame of ``ids``, where its sources disagree
            (:func:`livelens.loop.queue.disagreement_detail`); kept as ``queue.disagreement`` for
            the labelling page's review view.

    Raises:
        ConfigError: No picks, or a pick whose id is not in the manifest.
    """
    import pyarrow as pa

    from livelens.data.manifest import load_card, read_manifest, write_manifest

    if not picks:
        raise ConfigError("nothing to queue: the selection is empty")
    table = read_manifest(manifest)
    pos = {rid: i for i, rid in enumerate(table.column("id").to_pylist())}
    wanted = [ids[p["index"]] for p in picks]
    missing = [w for w in wanted if w not in pos]
    if missing:
        raise ConfigError(f"{len(missing)} picked ids are not in {manifest}, e.g. {missing[0]}")
    rows = table.take(pa.array([pos[w] for w in wanted], pa.int64()))
    attrs = []
    for rank, (a, p) in enumerate(zip(rows.column("attributes").to_pylist(), picks, strict=True)):
        d = json.loads(a or "{}")
        d["queue"] = {"rank": rank, "score": round(float(p["score"]), 6), "reason": p["reason"], "round": round_no,
                      "model": model}
        if disagreements is not None and disagreements[p["index"]]:
            det = disagreements[p["index"]]
            d["queue"]["disagreement"] = {**det, "score": round(float(det["score"]), 4)}  # the review view reads it
        attrs.append(json.dumps(d, ensure_ascii=False))
    rows = rows.set_column(rows.schema.get_field_index("attributes"), "attributes", pa.array(attrs, pa.string()))
    card = load_card(manifest)
    card = {"name": f"{card.get('name', 'set')}-queue-r{round_no}", "version": card.get("version"),
            "queue_of": str(manifest), "round": round_no, "model": model,
            "reasons": {r: sum(p["reason"] == r for p in picks) for r in {p["reason"] for p in picks}}}
    return write_manifest(rows, out, card)
