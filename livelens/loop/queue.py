"""Build a labelling queue from served answers: the loop's one entry point for a round.

The scores come from :class:`livelens.analyzer.LocalAnalyzer`, the engines the deployments run
plus the gateway's fusion, so a frame is judged uncertain for exactly the answer the service
would give it. Disagreement is read off the same answers: a classifier label that OCR or the
text-region model overruled, or two sources scoring one label apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livelens.errors import ConfigError


def disagreement_detail(answer: Mapping[str, Any]) -> dict[str, Any] | None:
    """Where the sources of one answer disagree most, for a reviewer; None when nothing disagrees.

    Returns:
        ``{"score", "label", "sources": {model: score}}``, plus ``"overruled"`` (why) when OCR or the
        text-region model overruled a classifier label (score 1). Otherwise the label whose two
        sources' scores lie furthest apart.
    """
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for lab in answer.get("labels", ()):
        if lab.get("overruled"):
            return {"score": 1.0, "label": lab["name"], "overruled": str(lab["overruled"])[:200],
                    "sources": {str(lab.get("model") or "classifier"): round(float(lab.get("score", 0.0)), 4)}}
        by_name.setdefault(lab["name"], []).append(lab)
    best: dict[str, Any] | None = None
    for name, labs in by_name.items():
        if len(labs) < 2:
            continue
        scores = [float(lab.get("score", 0.0)) for lab in labs]
        gap = max(scores) - min(scores)
        if best is None or gap > best["score"]:
            best = {"score": gap, "label": name,
                    "sources": {str(lab.get("model") or f"source {i}"): round(sc, 4)
                                for i, (lab, sc) in enumerate(zip(labs, scores, strict=True))}}
    return best


def answer_disagreement(answer: Mapping[str, Any]) -> float:
    """1 when OCR/regions overruled a classifier label; else the largest gap between two sources'
    scores for one label (0 when every label has one source)."""
    d = disagreement_detail(answer)
    return d["score"] if d else 0.0


def score_rows(analyzer: Any, images: Sequence[bytes], labels: Sequence[str],
               ) -> tuple[np.ndarray, np.ndarray, list[str], list[dict[str, Any] | None]]:
    """Per frame, each label's served score (0 when not answered), the disagreement, the decision,
    and where the sources disagree (:func:`disagreement_detail`)."""
    from livelens.imageio import decode_image

    index = {n: i for i, n in enumerate(labels)}
    scores = np.zeros((len(images), len(labels)), np.float32)
    dis = np.zeros(len(images), np.float32)
    decisions, details = [], []
    for r, data in enumerate(images):
        ans = analyzer.analyze(decode_image(data))
        for lab in ans["labels"]:
            j = index.get(lab["name"])
            if j is not None:
                scores[r, j] = max(scores[r, j], float(lab["score"]))
        detail = disagreement_detail(ans)
        dis[r] = detail["score"] if detail else 0.0
        details.append(detail)
        decisions.append(ans["decision"])
    return scores, dis, decisions, details


@dataclass
class QueueJob:
    """One round of the loop: score, select and write the labelling queue.

    Attributes:
        manifest: Frames to choose from (e.g. ``samples_to_manifest`` of the capture store).
        embeddings: Their embeddings (the embedding job's output).
        out: The queue manifest directory.
        budget: Frames to queue.
        caps: Capabilities whose answers are scored (``moderate``, ``ocr``).
        safety_ref: The safety model that scores (the served one by default).
        pool_factor: Candidates by uncertainty and disagreement before the diversity pass, × budget.
        random_share: Share of the budget drawn at random.
        labelled: A manifest of frames already labelled: never queued, and they seed the diversity pass.
        limit: Score only the first ``limit`` frames (smoke runs).
        round_no: The round number recorded in the queue.
        labels: Labels whose scores drive the label-wise pool (default: every taxonomy label).
    """

    manifest: str
    embeddings: str
    out: str
    budget: int = 100
    caps: Sequence[str] = ("moderate",)
    safety_ref: str = "safety"
    pool_factor: float = 3.0
    random_share: float = 0.1
    labelled: str | None = None
    limit: int | None = None
    round_no: int = 0
    labels: Sequence[str] = field(default=())


def build_queue(job: QueueJob, analyzer: Any | None = None) -> dict[str, Any]:
    """Score every embedded frame through the serving code, select, and write the queue manifest.

    Raises:
        ConfigError: Embeddings that do not cover the manifest, or an empty selection.
    """
    from livelens.analyzer import LocalAnalyzer
    from livelens.data.manifest import read_manifest
    from livelens.loop.active import SelectionConfig, select_batch, write_queue
    from livelens.loop.embed import read_embeddings

    emb = read_embeddings(job.embeddings)
    table = read_manifest(job.manifest, columns=["id", "image_bytes"])
    pos = {rid: i for i, rid in enumerate(table.column("id").to_pylist())}
    missing = [i for i in emb.ids if i not in pos]
    if missing:
        raise ConfigError(f"{len(missing)} embedded ids are not in {job.manifest} (embeddings of another set?)")
    ids, x = emb.ids, emb.vectors
    if job.limit is not None:
        ids, x = ids[: job.limit], x[: job.limit]
    analyzer = analyzer or LocalAnalyzer(safety_ref=job.safety_ref, caps=tuple(job.caps), evidence="none")
    labels = list(job.labels) or sorted(analyzer.tax.labels)
    images = table.column("image_bytes").take([pos[i] for i in ids]).to_pylist()
    scores, dis, decisions, details = score_rows(analyzer, images, labels)
    labelled: list[int] = []
    if job.labelled:
        done = set(read_manifest(job.labelled, columns=["id"]).column("id").to_pylist())
        labelled = [i for i, rid in enumerate(ids) if rid in done]
    cfg = SelectionConfig(min(job.budget, len(ids) - len(labelled)), pool_factor=job.pool_factor,
                          random_share=job.random_share)
    picks = select_batch(cfg, label_scores=scores, disagreement_score=dis, embeddings=x, labelled=labelled)
    models = sorted(set(analyzer.models()))
    out = write_queue(job.manifest, ids, picks, job.out, round_no=job.round_no, model=",".join(models) or None,
                      disagreements=details)
    return {"queue": str(out), "scored": len(ids), "queued": len(picks),
            "reasons": {r: sum(p["reason"] == r for p in picks) for r in {p["reason"] for p in picks}},
            "decisions": {d: decisions.count(d) for d in set(decisions)}, "models": models}
