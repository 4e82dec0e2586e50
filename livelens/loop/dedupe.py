"""Near-duplicate frames: a perceptual hash for re-encodes and resizes, embedding cosine for the rest.

Live traffic repeats itself: a static stream sends the same frame for minutes, and a re-uploaded
ad comes back resized, recompressed, cropped or with new text. Labelling those twice wastes the
budget, and leaving them on both sides of a split inflates held-out figures. Two signals:

- a 64-bit DCT perceptual hash (pHash): a small Hamming distance survives resizing and JPEG
  re-compression, but not crops or added overlays;
- the cosine of CNN embeddings, which survives crops, overlays and changed text, but also pairs
  different images of one scene.

A pair is a duplicate when the hash alone is very close, or when both are close enough
(:class:`DedupeRule`). Duplicate pairs form groups (connected components); the de-duplicated
manifest keeps one row per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livelens.errors import ConfigError, EmbeddingError
from livelens.loop.cluster import normalise


def phash(rgb: np.ndarray) -> np.ndarray:
    """The 64-bit DCT perceptual hash of an RGB frame, as 8 packed bytes.

    Luma at 32×32 (area resize), its 2-D DCT, the 8×8 lowest frequencies without the DC term's
    influence on the median; each bit says whether a coefficient is above the median.
    """
    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return np.packbits(bits)


def hashes(frames: Sequence[np.ndarray]) -> np.ndarray:
    """(N, 8) uint8 packed pHashes."""
    return np.stack([phash(f) for f in frames]) if len(frames) else np.zeros((0, 8), np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between packed hashes (broadcasting)."""
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(-1)


#: The photos :class:`DedupeRule`'s defaults were chosen on (never used to report its figures).
TUNING_PHOTOS = frozenset({
    "matplotlib/Minduka_Present_Blue_Pack.png", "matplotlib/grace_hopper.jpg", "shared/faces/2007_007763.jpg",
    "shared/faces/2008_001009.jpg", "shared/faces/2008_001322.jpg", "shared/faces/2008_002079.jpg",
    "shared/faces/2008_007676.jpg", "shared/faces/2009_004587.jpg", "shared/faces/bald_guys.jpg",
    "shared/icdar2015_toy/imgs/img_1.jpg", "shared/icdar2015_toy/imgs/img_3.jpg",
    "shared/icdar2015_toy/imgs/img_7.jpg", "shared/ocr_demo/demo_densetext_det.jpg",
    "shared/ocr_demo/demo_text_det.jpg", "skimage/brick", "skimage/camera", "skimage/chelsea", "skimage/clock",
    "skimage/coins", "skimage/gravel", "skimage/immunohistochemistry", "skimage/moon", "sklearn/sample_0"})


@dataclass(frozen=True)
class DedupeRule:
    """When two frames count as one.

    The defaults were chosen on half of the offline real photos (:data:`TUNING_PHOTOS`): the
    highest pair recall with pair precision ≥0.98 over a grid. ``make eval-dedupe`` measures
    them on the other half, with fresh variants.

    Attributes:
        hash_alone: Hamming distance at or below which the hash alone decides.
        hash_with_cosine: A larger distance that still counts when the cosine is at least ``cosine``.
        cosine: Embedding cosine paired with ``hash_with_cosine``.
        cosine_alone: Cosine at or above which the embedding alone decides.
    """

    hash_alone: int = 6
    hash_with_cosine: int = 20
    cosine: float = 0.65
    cosine_alone: float = 0.85

    def __post_init__(self):
        if not (0 <= self.hash_alone <= self.hash_with_cosine <= 64):
            raise ConfigError("need 0 ≤ hash_alone ≤ hash_with_cosine ≤ 64")
        if not (-1 <= self.cosine <= self.cosine_alone <= 1):
            raise ConfigError("need -1 ≤ cosine ≤ cosine_alone ≤ 1")

    def is_duplicate(self, dist: np.ndarray, cos: np.ndarray) -> np.ndarray:
        return (dist <= self.hash_alone) | ((dist <= self.hash_with_cosine) & (cos >= self.cosine)) | (
            cos >= self.cosine_alone)


def candidate_pairs(h: np.ndarray, x: np.ndarray, rule: DedupeRule, k: int = 16) -> np.ndarray:
    """Pairs (i < j) worth checking: hash neighbours within ``hash_with_cosine`` and cosine neighbours.

    FAISS finds both kinds of neighbours (a binary index for Hamming, inner product for cosine);
    without it, exact all-pairs comparison in blocks.
    """
    n = len(h)
    pairs: set[tuple[int, int]] = set()
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        bindex = faiss.IndexBinaryFlat(64)
        bindex.add(np.ascontiguousarray(h))
        lims, _, idx = bindex.range_search(np.ascontiguousarray(h), rule.hash_with_cosine + 1)
        for i in range(n):
            for j in idx[lims[i]:lims[i + 1]]:
                if i != j:
                    pairs.add((min(i, int(j)), max(i, int(j))))
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(np.ascontiguousarray(x))
        _, nn = index.search(np.ascontiguousarray(x), min(k + 1, n))
        for i in range(n):
            for j in nn[i]:
                if j >= 0 and i != j:
                    pairs.add((min(i, int(j)), max(i, int(j))))
    else:
        for s in range(0, n, 1024):
            d = hamming(h[s:s + 1024, None, :], h[None, :, :])
            c = x[s:s + 1024] @ x.T
            ii, jj = np.nonzero((d <= rule.hash_with_cosine) | (c >= rule.cosine))
            pairs.update((min(s + i, j), max(s + i, j)) for i, j in zip(ii.tolist(), jj.tolist(), strict=True)
                         if s + i != j)
    return np.asarray(sorted(pairs), np.int64).reshape(-1, 2)


@dataclass
class Duplicates:
    """What :func:`find_duplicates` found.

    Attributes:
        pairs: (P, 2) index pairs judged duplicates.
        distance: Their Hamming distances.
        cosine: Their embedding cosines.
        group: (N,) group of each row (rows in one group are duplicates of each other).
        keep: Indices of the rows kept (one per group: the first in input order).
    """

    pairs: np.ndarray
    distance: np.ndarray
    cosine: np.ndarray
    group: np.ndarray
    keep: np.ndarray


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.asarray([find(i) for i in range(n)])


def find_duplicates(h: np.ndarray, x: np.ndarray, rule: DedupeRule = DedupeRule()) -> Duplicates:
    """Duplicate pairs and groups among N frames, from their hashes and embeddings.

    Raises:
        EmbeddingError: Hashes and embeddings of different lengths, or bad embeddings.
    """
    h = np.ascontiguousarray(h, np.uint8)
    if h.ndim != 2 or h.shape[1] != 8:
        raise EmbeddingError(f"hashes must be (N, 8) packed bytes, got shape {h.shape}")
    if len(h) != len(x):
        raise EmbeddingError(f"{len(h)} hashes for {len(x)} embeddings")
    x = normalise(x)
    cand = candidate_pairs(h, x, rule)
    if len(cand):
        dist = hamming(h[cand[:, 0]], h[cand[:, 1]])
        cos = np.einsum("ij,ij->i", x[cand[:, 0]], x[cand[:, 1]])
        dup = rule.is_duplicate(dist, cos)
        cand, dist, cos = cand[dup], dist[dup], cos[dup]
    else:
        dist = cos = np.zeros(0)
    group = _components(len(h), cand)
    keep = np.flatnonzero(group == np.arange(len(h)))
    return Duplicates(cand, dist, cos, group, keep)


def pair_scores(found: np.ndarray, truth_group: Sequence[Any]) -> dict[str, float]:
    """Pair precision and recall of found duplicate pairs against true groups."""
    truth_group = np.asarray(truth_group, dtype=object)
    found_set = {(int(i), int(j)) for i, j in found}
    tp = sum(truth_group[i] == truth_group[j] for i, j in found_set)
    true_pairs = sum(c * (c - 1) // 2 for c in np.unique(truth_group, return_counts=True)[1])
    return {"pairs_found": len(found_set), "true_pairs": int(true_pairs), "tp": int(tp),
            "precision": tp / len(found_set) if found_set else float("nan"),
            "recall": tp / true_pairs if true_pairs else float("nan")}


# ---- generated near-duplicates ------------------------------------------------------------------

VARIANTS = ("resized", "recompressed", "cropped", "overlay", "text_changed")


def _stamp_text(rgb: np.ndarray, text: str, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    from livelens.data.render import text_patch

    h, w = rgb.shape[:2]
    patch, _ = text_patch(text, max(12, h // 14), (255, 255, 255), (200, 30, 60), radius=0.3)
    img = Image.fromarray(rgb).convert("RGBA")
    x, y = int(w * 0.05), int(h * 0.8)
    img.alpha_composite(patch, (min(x, max(0, w - patch.width)), min(y, max(0, h - patch.height))))
    return np.asarray(img.convert("RGB"))


def variant(rgb: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One near-duplicate of ``rgb``: what a re-upload, a re-encode or an edited overlay does."""
    from livelens.data.frames import make_overlay
    from livelens.quality.distort import jpeg

    h, w = rgb.shape[:2]
    if kind == "resized":
        s = float(rng.uniform(0.4, 0.7))
        return cv2.resize(rgb, (max(8, int(w * s)), max(8, int(h * s))), interpolation=cv2.INTER_AREA)
    if kind == "recompressed":
        return jpeg(rgb, int(rng.integers(20, 45)))
    if kind == "cropped":
        f = float(rng.uniform(0.82, 0.92))
        cw, ch = int(w * f), int(h * f)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return np.ascontiguousarray(rgb[y0:y0 + ch, x0:x0 + cw])
    if kind == "overlay":
        from PIL import Image

        label = ("ads_logo", "ads_qrcode", "ads_wechat_id")[int(rng.integers(3))]
        ov = make_overlay(label, rng, max(24, min(h, w) // 5), (w, h))
        img = Image.fromarray(rgb).convert("RGBA")
        patch = ov.patch if ov.patch.mode == "RGBA" else ov.patch.convert("RGBA")
        px = int(rng.integers(0, max(1, w - patch.width)))
        py = int(rng.integers(0, max(1, h - patch.height)))
        img.alpha_composite(patch, (px, py))
        return np.asarray(img.convert("RGB"))
    if kind == "text_changed":
        return _stamp_text(rgb, f"LIVE {int(rng.integers(1000, 9999))}", rng)
    raise ConfigError(f"unknown near-duplicate variant {kind!r}: use one of {VARIANTS}")


def near_duplicate_set(bases: Sequence[np.ndarray], seed: int = 0,
                       variants: Sequence[str] = VARIANTS) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Each base frame, stamped with one text, plus one near-duplicate per variant.

    ``text_changed`` changes the stamped text, so a base and that variant differ only in it.

    Returns:
        Frames, their group (the base index) and their variant name (``original`` for the base).
    """
    frames, group, kind = [], [], []
    for b, rgb in enumerate(bases):
        rng = np.random.default_rng([seed, b])
        original = _stamp_text(rgb, f"LIVE {int(rng.integers(1000, 9999))}", rng)
        frames.append(original)
        group.append(b)
        kind.append("original")
        for v in variants:
            src = rgb if v == "text_changed" else original
            frames.append(variant(src, v, rng))
            group.append(b)
            kind.append(v)
    return frames, group, kind


def write_deduplicated(manifest: str | Path, ids: Sequence[str], dups: Duplicates, out: str | Path) -> dict[str, Any]:
    """Write the manifest without duplicates (one row per group) and the pair report next to it.

    Rows of the manifest that were not embedded are kept as they are.
    """
    import json

    import pyarrow as pa

    from livelens.data.manifest import load_card, read_manifest, write_manifest

    table = read_manifest(manifest)
    keep = set(dups.keep.tolist())
    drop = {ids[i] for i in range(len(ids)) if i not in keep}
    mask = [rid not in drop for rid in table.column("id").to_pylist()]
    kept = table.filter(pa.array(mask))
    card = load_card(manifest)
    card = {**{k: v for k, v in card.items() if k not in ("counts",)}, "name": f"{card.get('name', 'set')}-dedup",
            "deduplicated_from": str(manifest), "duplicates_dropped": len(drop)}
    out = write_manifest(kept, out, card)
    report = [{"a": ids[i], "b": ids[j], "hamming": int(d), "cosine": round(float(c), 4)}
              for (i, j), d, c in zip(dups.pairs.tolist(), dups.distance, dups.cosine, strict=True)]
    (Path(out) / "duplicates.json").write_text(json.dumps(report, indent=1))
    return {"rows_in": table.num_rows, "rows_out": kept.num_rows, "dropped": len(drop), "pairs": len(report)}


def variant_recall(dups: Duplicates, group: Sequence[int], kind: Sequence[str]) -> dict[str, float]:
    """Per variant, the share of (original, variant) pairs found."""
    found = {(int(i), int(j)) for i, j in dups.pairs}
    original = {g: i for i, (g, k) in enumerate(zip(group, kind, strict=True)) if k == "original"}
    out: dict[str, list[bool]] = {}
    for i, (g, k) in enumerate(zip(group, kind, strict=True)):
        if k != "original":
            o = original[g]
            out.setdefault(k, []).append((min(i, o), max(i, o)) in found)
    return {k: sum(v) / len(v) for k, v in out.items()}


def evaluate(bases: Sequence[np.ndarray], embed: Any, rule: DedupeRule = DedupeRule(), seed: int = 1) -> dict[str, Any]:
    """Pair precision/recall and per-variant recall of ``rule`` on near-duplicates of ``bases``.

    Args:
        bases: Distinct frames.
        embed: ``frames -> (N, dim)`` (an :class:`~livelens.loop.embed.Embedder`).
        rule: The rule measured.
        seed: Seeds the variants.
    """
    frames, group, kind = near_duplicate_set(bases, seed=seed)
    x = np.concatenate([embed(frames[s:s + 32]) for s in range(0, len(frames), 32)])
    dups = find_duplicates(hashes(frames), x, rule)
    originals = [i for i, k in enumerate(kind) if k == "original"]
    orig_set = set(originals)
    false_originals = sum(1 for i, j in dups.pairs.tolist() if i in orig_set and j in orig_set)
    return {"bases": len(bases), "frames": len(frames), **pair_scores(dups.pairs, group),
            "variant_recall": variant_recall(dups, group, kind), "distinct_originals_matched": false_originals,
            "groups_kept": len(dups.keep)}
