"""Cluster embeddings and summarise what each cluster holds (the seed's 聚类分析).

k-means runs on FAISS (``faiss-cpu``, which works with the NumPy 1.26 pin) with scikit-learn's
``MiniBatchKMeans`` as the fallback; ``k`` is given or chosen by the silhouette score on a sample.
HDBSCAN (scikit-learn's) is the option for data whose number of kinds is unknown; it marks noise
as cluster ``-1``.

Vectors are L2-normalised first: CNN features compare by direction, and normalised k-means is
spherical k-means, whose centroids also serve cosine neighbour search.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from livelens.errors import ConfigError
from livelens.loop.embed import check_compatible


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; an all-zero row stays zero)."""
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Clustering:
    """A clustering of N vectors.

    Attributes:
        assign: (N,) cluster of each vector (-1 = noise, HDBSCAN only).
        centroids: (k, dim) unit centroids (for HDBSCAN: the mean of each cluster's members).
        k: Number of clusters (noise excluded).
        method: ``kmeans`` or ``hdbscan``.
        backend: ``faiss``, ``sklearn``.
        scores: For a chosen k, the silhouette of each candidate k.
    """

    assign: np.ndarray
    centroids: np.ndarray
    k: int
    method: str
    backend: str
    scores: dict[int, float] = field(default_factory=dict)


def _kmeans_faiss(x: np.ndarray, k: int, seed: int, niter: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=256)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign.ravel().astype(np.int64), km.centroids.astype(np.float32)


def _kmeans_sklearn(x: np.ndarray, k: int, seed: int, niter: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, max_iter=niter, batch_size=4096).fit(x)
    return km.labels_.astype(np.int64), normalise(km.cluster_centers_)


def assign_to(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Nearest centroid (by cosine) of each row, in chunks so memory stays bounded."""
    if have_faiss():
        import faiss

        index = faiss.IndexFlatIP(centroids.shape[1])
        index.add(np.ascontiguousarray(centroids, np.float32))
        out = [index.search(np.ascontiguousarray(x[s:s + chunk], np.float32), 1)[1].ravel()
               for s in range(0, len(x), chunk)]
    else:
        out = [np.argmax(x[s:s + chunk] @ centroids.T, axis=1) for s in range(0, len(x), chunk)]
    return np.concatenate(out).astype(np.int64)


def kmeans(x: np.ndarray, k: int | None = None, *, k_range: Sequence[int] = (4, 8, 12, 16, 24, 32),
           seed: int = 0, niter: int = 20, backend: Literal["auto", "faiss", "sklearn"] = "auto",
           sample: int = 4000) -> Clustering:
    """Spherical k-means.

    Args:
        x: (N, dim) embeddings.
        k: Number of clusters; None chooses it from ``k_range`` by the silhouette on a sample.
        k_range: Candidates when choosing.
        seed: Seeds the initialisation and the sample.
        niter: k-means iterations.
        backend: ``faiss`` (default when installed) or ``sklearn``.
        sample: Vectors the silhouette is computed on.

    Raises:
        EmbeddingError: Not a finite (N, dim) array.
        ConfigError: ``k`` < 2 or more clusters than vectors; unknown backend; faiss asked but missing.
    """
    check_compatible(x)
    x = normalise(x)
    if backend == "auto":
        backend = "faiss" if have_faiss() else "sklearn"
    if backend not in ("faiss", "sklearn"):
        raise ConfigError(f"unknown k-means backend {backend!r}: use faiss or sklearn")
    if backend == "faiss" and not have_faiss():
        raise ConfigError("backend='faiss' but faiss-cpu is not installed")
    fit = _kmeans_faiss if backend == "faiss" else _kmeans_sklearn
    scores: dict[int, float] = {}
    if k is None:
        from sklearn.metrics import silhouette_score

        rng = np.random.default_rng(seed)
        idx = rng.choice(len(x), size=min(sample, len(x)), replace=False)
        best = None
        for cand in k_range:
            if cand < 2 or cand >= len(x):
                continue
            assign, cents = fit(x, cand, seed, niter)
            if len(np.unique(assign[idx])) < 2:
                continue
            scores[cand] = float(silhouette_score(x[idx], assign[idx], metric="cosine"))
            if best is None or scores[cand] > scores[best[0]]:
                best = (cand, assign, cents)
        if best is None:
            raise ConfigError(f"no k in {list(k_range)} fits {len(x)} vectors")
        k, assign, cents = best
    else:
        if k < 2 or k > len(x):
            raise ConfigError(f"k must be in [2, {len(x)}], got {k}")
        assign, cents = fit(x, k, seed, niter)
    return Clustering(assign, cents, int(k), "kmeans", backend, scores)


def hdbscan(x: np.ndarray, min_cluster_size: int = 10, min_samples: int | None = None) -> Clustering:
    """HDBSCAN on the unit vectors (Euclidean on the sphere orders like cosine).

    Raises:
        EmbeddingError: Not a finite (N, dim) array.
    """
    from sklearn.cluster import HDBSCAN

    check_compatible(x)
    x = normalise(x)
    assign = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, copy=True).fit_predict(x).astype(np.int64)
    ks = sorted(c for c in np.unique(assign) if c >= 0)
    cents = normalise(np.stack([x[assign == c].mean(0) for c in ks])) if ks else np.zeros((0, x.shape[1]), np.float32)
    return Clustering(assign, cents, len(ks), "hdbscan", "sklearn")


def primary_label(labels: Sequence[str] | None, ignore: Sequence[str] = ()) -> str:
    """One label per row for purity: the first label not in ``ignore``, or ``<none>``."""
    for name in labels or ():
        if name not in ignore:
            return name
    return "<none>"


def purity(assign: np.ndarray, truth: Sequence[str]) -> float:
    """Share of rows whose cluster's majority label is their own (noise rows count as wrong)."""
    truth = np.asarray(truth, dtype=object)
    hit = 0
    for c in np.unique(assign):
        if c < 0:
            continue
        members = truth[assign == c]
        hit += Counter(members.tolist()).most_common(1)[0][1]
    return hit / len(truth) if len(truth) else 0.0


def nmi(assign: np.ndarray, truth: Sequence[str]) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(list(truth), assign.tolist()))


def medoids(x: np.ndarray, clustering: Clustering, n: int = 4) -> dict[int, list[int]]:
    """Per cluster, the indices of the ``n`` members nearest its centroid (the images to show)."""
    x = normalise(x)
    out = {}
    ks = sorted(c for c in np.unique(clustering.assign) if c >= 0)
    for row, c in enumerate(ks):
        members = np.flatnonzero(clustering.assign == c)
        sims = x[members] @ clustering.centroids[row]
        out[int(c)] = members[np.argsort(-sims)[:n]].tolist()
    return out


def summarize(x: np.ndarray, clustering: Clustering, ids: Sequence[str], labels: Sequence[Sequence[str]] | None = None,
              *, n_medoids: int = 4, ignore_labels: Sequence[str] = ()) -> dict[str, Any]:
    """The cluster summary: size, label mix and medoid ids per cluster; purity and NMI overall.

    Args:
        x: The embeddings that were clustered.
        clustering: Their clustering.
        ids: Row ids, aligned with ``x``.
        labels: Row labels where known (lists; empty = negative); None = unlabelled data.
        n_medoids: Medoid images per cluster.
        ignore_labels: Labels skipped when picking each row's primary label for purity/NMI.
    """
    if len(ids) != len(x):
        raise ConfigError(f"{len(ids)} ids for {len(x)} embeddings")
    meds = medoids(x, clustering, n_medoids)
    clusters = []
    for c in sorted(np.unique(clustering.assign).tolist()):
        members = np.flatnonzero(clustering.assign == c)
        entry: dict[str, Any] = {"cluster": int(c), "size": len(members),
                                 "medoids": [ids[i] for i in meds.get(int(c), [])]}
        if labels is not None:
            mix = Counter(name for i in members for name in (labels[i] or ["<none>"]))
            entry["labels"] = dict(mix.most_common())
        clusters.append(entry)
    out: dict[str, Any] = {"method": clustering.method, "backend": clustering.backend, "k": clustering.k,
                           "rows": len(x), "noise": int((clustering.assign < 0).sum()), "clusters": clusters}
    if clustering.scores:
        out["silhouette"] = {str(k): round(v, 4) for k, v in clustering.scores.items()}
    if labels is not None:
        truth = [primary_label(ls, ignore_labels) for ls in labels]
        out["purity"] = round(purity(clustering.assign, truth), 4)
        out["nmi"] = round(nmi(clustering.assign, truth), 4)
    return out


def write_summary(out_dir: str | Path, summary: dict[str, Any], clustering: Clustering, ids: Sequence[str],
                  manifest: str | Path | None = None, sheet_rows: int = 24) -> Path:
    """Write ``clusters.parquet`` (id → cluster), ``summary.json`` and a contact sheet per cluster.

    The sheets show each cluster's medoids first, then members spread across the cluster; they
    need the manifest the embeddings came from (for the pixels).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    (out / "sheets").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(ids), "cluster": clustering.assign}), out / "clusters.parquet")
    if manifest is not None:
        from livelens.data.contact import contact_sheet_png
        from livelens.data.manifest import read_manifest

        table = read_manifest(manifest, columns=["id", "image_bytes", "image_uri", "labels", "texts", "quality",
                                                 "attributes", "boxes", "width", "height"])
        pos = {rid: i for i, rid in enumerate(table.column("id").to_pylist())}
        for entry in summary["clusters"]:
            members = [ids[i] for i in np.flatnonzero(clustering.assign == entry["cluster"])]
            spread = [members[i] for i in np.linspace(0, len(members) - 1, num=min(sheet_rows, len(members))).astype(int)]
            pick = list(dict.fromkeys([*entry["medoids"], *spread]))[:sheet_rows]
            rows = table.take([pos[r] for r in pick if r in pos])
            png = contact_sheet_png(rows, title=f"cluster {entry['cluster']}: {entry['size']} images",
                                    n=sheet_rows, thumb=160, cols=6)
            name = f"cluster_{entry['cluster']:03d}.png" if entry["cluster"] >= 0 else "noise.png"
            (out / "sheets" / name).write_bytes(png)
            entry["sheet"] = f"sheets/{name}"
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return out
