"""Learned picture-quality flags (``quality_flags``): dark, bright, blur and occlusion.

The classical measures' fixed thresholds were set on the generator's own photo pool and did not
hold on other real photos. This model decides those four flags from a feature vector (the NR-IQA
features, the classical scores and occluder-candidate statistics) with boosted trees per flag;
occlusion also gets the logit of a small head over mobilenet_v2's ImageNet feature map, which sees
hands and cartoon stickers that flat-region statistics miss. It is fitted on graded distortions of
real photos (:mod:`livelens.quality.realset`), with each decision threshold chosen on out-of-fold
scores of a cross-validation grouped by photo (:mod:`livelens.quality.flag_training`).

:func:`livelens.quality.assess` uses it when it is passed in; the quality deployment loads it from
the store chain, so ``/v1/quality``, ``/v1/analyze`` and the evaluation run the same code.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from livelens.errors import ConfigError
from livelens.quality import focus, iqa
from livelens.quality import measures as m

MODEL_NAME = "quality_flags"
FLAGS = ("dark", "bright", "blur", "occlusion")


def _components(mask: np.ndarray, lab: np.ndarray, local: np.ndarray, min_share: float = 0.01) -> list[list[float]]:
    """Per connected component of ``mask`` (letterbox bars left out), 8 numbers.

    Area share, box fill, solidity (area over convex hull, holes filled: a sticker with a drawn
    face inside is still one solid shape), colour spread (Lab std, /32), edge contact, log mean
    texture inside, and the step across its boundary (mean |Lab| difference between a ring
    just outside and the component's rim, /32): digital stickers and blocks are exactly uniform
    with a hard edge, sky and walls carry noise and shade into their surroundings.
    """
    h, w = mask.shape
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    out = []
    k3 = np.ones((3, 3), np.uint8)
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        if area < min_share * h * w:
            continue
        if (bw >= 0.97 * w and (y == 0 or y + bh >= h)) or (bh >= 0.97 * h and (x == 0 or x + bw >= w)):
            continue  # letterbox bars are layout
        comp = (labels == i).astype(np.uint8)
        contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        filled = np.zeros_like(comp)
        cv2.drawContours(filled, contours, -1, 1, -1)
        hull = cv2.convexHull(np.concatenate(contours))
        solidity = float(filled.sum()) / max(cv2.contourArea(hull), 1.0)
        sel = comp > 0
        ring = (cv2.dilate(filled, k3, iterations=3) > 0) & (filled == 0)
        rim = (filled > 0) & (cv2.erode(filled, k3, iterations=2) == 0)
        step = (float(np.abs(lab[ring].mean(axis=0) - lab[rim].mean(axis=0)).max()) / 32.0
                if ring.any() and rim.any() else 0.0)
        out.append([area / float(h * w), area / float(bw * bh), min(solidity, 1.0),
                    float(lab[sel].std(axis=0).max()) / 32.0,
                    float(x == 0 or y == 0 or x + bw >= w or y + bh >= h),
                    float(np.log1p(local[sel].mean())), step])
    return out


_EMPTY = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def occluder_features(thumb_rgb: np.ndarray, thumb: np.ndarray) -> list[float]:
    """Statistics of the best occluder candidates on the 192 px thumbnail (:data:`N_OCC` numbers).

    Candidates are flat regions at two strictness levels (a cartoon sticker or a shaded hand is
    not perfectly flat) and skin-coloured regions. For each kind: the largest candidate, the most
    uniform one and the one with the hardest edge, so a small sticker is seen next to a large sky.
    """
    lab = cv2.cvtColor(thumb_rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    local = np.maximum(m._local_std(thumb), np.maximum(m._local_std(lab[:, :, 1]), m._local_std(lab[:, :, 2])))
    out: list[float] = []
    for mask in (local < m.DEFAULT_THRESHOLDS.flat_std, local < 6.0, m._skin_mask(thumb_rgb)):
        comps = _components(mask, lab, local)
        for key in (lambda c: c[0], lambda c: -c[3] + 0.1 * c[0], lambda c: c[6] + c[0]):
            out += max(comps, key=key) if comps else _EMPTY
    out.append(float((local < m.DEFAULT_THRESHOLDS.flat_std).mean()))
    return out


def classical_features(result: dict[str, Any]) -> list[float]:
    """The classical scores of one :func:`~livelens.quality.assess` result (15 numbers)."""
    b, bl = result["brightness"], result["blur"]
    d = bl["directional"]
    return [b["score"], b["p10"], b["p90"], b["clipped_low"], b["clipped_high"], b["content_fraction"],
            bl["score"], float(np.log10(bl["laplacian_var"] + 1.0)), *(d[k] for k in ("0", "45", "90", "135")),
            max(d.values()) - min(d.values()), result["occlusion"]["score"], result["noise"]["sigma"] / 25.0]


N_OCC = 3 * 3 * 7 + 1
N_CLASSICAL = 15
#: Inputs of models fitted before the focus features were appended (``quality_flags@1``): such a
#: model reads the first this many columns, so one feature function serves every stored model.
LEGACY_FEATURES = iqa.N_FEATURES + N_CLASSICAL + N_OCC
N_FEATURES = LEGACY_FEATURES + focus.N_FOCUS_FEATURES


def features(iqa_features: np.ndarray, result: dict[str, Any], thumb_rgb: np.ndarray, thumb: np.ndarray,
             grey: np.ndarray | None) -> np.ndarray:
    """The flag model's input: NR-IQA features, classical scores, occluder statistics and the
    frame's tile-by-tile spectral tilt (:func:`livelens.quality.focus.focus_features` of ``grey``,
    the full frame's luminance; ``None``: zeros, for a model that does not read them)."""
    tilt = np.zeros(focus.N_FOCUS_FEATURES, np.float32) if grey is None else focus.focus_features(grey)
    return np.concatenate([np.asarray(iqa_features, np.float32),
                           np.asarray(classical_features(result), np.float32),
                           np.asarray(occluder_features(thumb_rgb, thumb), np.float32), tilt])


# -- the occluder map: ImageNet mobilenet_v2 features on a small copy of the frame ----------------

#: Input size of the occluder map (width, height): 10 × 6 cells of 32 px.
MAP_SIZE = (320, 192)
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


class OccluderMap:
    """mobilenet_v2's ImageNet features (1280 × 6 × 10) of the frame, the occluder head's input.

    Learned image features know hands, cartoon faces and pasted shapes, which the flat-region
    statistics miss; the frozen backbone comes from the offline ImageNet weights, so nothing of it
    is stored with the flag model.
    """

    _net: nn.Module | None = None

    @classmethod
    def net(cls) -> nn.Module:
        if cls._net is None:
            from livelens.models.factory import create_backbone

            cls._net = create_backbone("mobilenet_v2", pretrained=True).eval()
        return cls._net

    @classmethod
    def features(cls, rgb: np.ndarray) -> np.ndarray:
        """The feature map of one RGB frame, float32 ``(1280, 6, 10)``."""
        x = cv2.resize(rgb, MAP_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        t = torch.from_numpy(((x - _MEAN) / _STD).transpose(2, 0, 1).copy())[None]
        with torch.no_grad():
            return cls.net()(t)[0].numpy()


class OccluderHead(nn.Module):
    """Per-cell occluder logits (two 1×1 convolutions) and their maximum: one cell with an
    occluder makes the frame occluded (multiple-instance pooling)."""

    def __init__(self, channels: int = 1280, hidden: int = 32):
        super().__init__()
        self.cells = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Dropout(0.2), nn.Conv2d(hidden, 1, 1))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.cells(fmap).flatten(1).max(dim=1).values


def fit_occluder_head(maps: np.ndarray, y: np.ndarray, *, epochs: int = 40, seed: int = 0) -> OccluderHead:
    """Train an :class:`OccluderHead` on feature maps ``(n, 1280, 6, 10)`` and 0/1 targets."""
    torch.manual_seed(seed)
    head = OccluderHead(maps.shape[1])
    xt = torch.as_tensor(maps, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    pos = yt.mean().clamp(1e-3, 1 - 1e-3)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(1 - pos) / pos)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(len(xt), generator=gen)
        for b in range(0, len(xt), 64):
            idx = perm[b : b + 64]
            opt.zero_grad()
            loss_fn(head(xt[idx]), yt[idx]).backward()
            opt.step()
    return head.eval()


def occluder_logits(head: OccluderHead, maps: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return head(torch.as_tensor(np.asarray(maps, np.float32))).numpy()


# -- gradient-boosted trees, stored as tensors ---------------------------------------------------

def pack_trees(clf: Any) -> dict[str, torch.Tensor]:
    """A fitted scikit-learn ``HistGradientBoostingClassifier`` (binary) as flat tensors.

    The store loads state dicts with ``weights_only=True``; a pickled estimator would not load,
    so the trees travel as node arrays and :func:`tree_logits` walks them.
    """
    feat, thr, left, right, leaf, value, nan_left, roots = [], [], [], [], [], [], [], []
    offset = 0
    for (tree,) in clf._predictors:
        n = tree.nodes
        roots.append(offset)
        feat.append(n["feature_idx"].astype(np.int16))
        thr.append(n["num_threshold"].astype(np.float32))
        left.append((n["left"] + offset).astype(np.int32))
        right.append((n["right"] + offset).astype(np.int32))
        leaf.append(n["is_leaf"].astype(np.bool_))
        value.append(n["value"].astype(np.float32))
        nan_left.append(n["missing_go_to_left"].astype(np.bool_))
        offset += len(n)
    cat = {k: torch.from_numpy(np.concatenate(v)) for k, v in
           (("feature", feat), ("threshold", thr), ("left", left), ("right", right), ("leaf", leaf),
            ("value", value), ("nan_left", nan_left))}
    return {**cat, "roots": torch.tensor(roots, dtype=torch.int32),
            "baseline": torch.tensor([float(np.ravel(clf._baseline_prediction)[0])], dtype=torch.float32)}


def tree_logits(trees: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """Raw scores (log-odds) of rows ``x`` ``(n, F)`` under packed trees: every tree walked at once."""
    x = np.atleast_2d(np.asarray(x, np.float32))
    feat, thr = trees["feature"].numpy().astype(np.int64), trees["threshold"].numpy()
    left, right, leaf = trees["left"].numpy(), trees["right"].numpy(), trees["leaf"].numpy()
    nan_left, value = trees["nan_left"].numpy(), trees["value"].numpy()
    out = np.empty(len(x), np.float32)
    for r, row in enumerate(x):
        node = trees["roots"].numpy().astype(np.int64)
        while True:
            inner = ~leaf[node]
            if not inner.any():
                break
            nd = node[inner]
            v = row[feat[nd]]
            go_left = np.where(np.isnan(v), nan_left[nd], v <= thr[nd])
            node[inner] = np.where(go_left, left[nd], right[nd])
        out[r] = float(trees["baseline"][0]) + float(value[node].sum())
    return out


def fit_trees(x: np.ndarray, y: np.ndarray, seed: int = 0, weight: np.ndarray | None = None) -> Any:
    """The per-flag classifier: scikit-learn's histogram gradient boosting, 200 rounds."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.06, max_leaf_nodes=15,
                                          l2_regularization=1.0, random_state=seed).fit(x, y, sample_weight=weight)


# -- the model ----------------------------------------------------------------------------------

class FlagModel:
    """Per-flag boosted trees over the feature vector; occlusion also sees the occluder head's logit.

    Args:
        trees: ``{flag: packed trees}`` (:func:`pack_trees`).
        thresholds: ``{flag: probability}`` at which the flag is raised, chosen on out-of-fold
            scores of the training photos.
        head: The occluder head (its logit is the last input of the occlusion trees).
        ref: The store ref, reported with every answer.
        n_features: How many leading columns of :func:`features` the trees were fitted on
            (:data:`LEGACY_FEATURES` for a model stored before the focus features).
    """

    def __init__(self, trees: dict[str, dict[str, torch.Tensor]], thresholds: dict[str, float],
                 head: OccluderHead, ref: str = "untrained", n_features: int = N_FEATURES):
        if not 0 < n_features <= N_FEATURES:
            raise ConfigError(f"{ref}: a flag model over {n_features} features, this code computes {N_FEATURES}")
        self.trees, self.thresholds, self.head, self.ref = trees, thresholds, head.eval(), ref
        self.n_features = n_features

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"trees.{f}.{k}": v for f, t in self.trees.items() for k, v in t.items()}
        out.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        out["thresholds"] = torch.tensor([self.thresholds[f] for f in FLAGS], dtype=torch.float32)
        out["n_features"] = torch.tensor(self.n_features)
        return out

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], ref: str = "untrained") -> FlagModel:
        """Rebuild from :meth:`state_dict`.

        Raises:
            ConfigError: The state is not a flag model's.
        """
        try:
            trees = {f: {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"trees.{f}.")} for f in FLAGS}
            head = OccluderHead(int(state["head.cells.0.weight"].shape[1]), int(state["head.cells.0.weight"].shape[0]))
            head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
            thr = dict(zip(FLAGS, state["thresholds"].tolist(), strict=True))
            if any(not t for t in trees.values()):
                raise KeyError("trees")
            n = int(state["n_features"]) if "n_features" in state else LEGACY_FEATURES
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise ConfigError(f"{ref} is not a quality flag model: {exc}") from None
        return cls(trees, thr, head, ref, n)

    @classmethod
    def from_store(cls, store: Any, ref: str = MODEL_NAME) -> FlagModel:
        """Load ``ref`` from a :class:`~livelens.store.ModelStore`.

        Raises:
            ModelNotFoundError: No such model.
            ConfigError: The stored model is not a flag model.
        """
        stored = store.load(ref)
        return cls.from_state(stored.state_dict, stored.ref)

    def probabilities(self, x: np.ndarray, maps: np.ndarray) -> dict[str, np.ndarray]:
        """Per-flag probabilities of feature rows ``x`` and their occluder maps."""
        # Columns past the model's own are features added after it was fitted: the occlusion trees
        # read the head's logit right after the model's last column.
        x = np.atleast_2d(np.asarray(x, np.float32))[:, : self.n_features]
        occ = occluder_logits(self.head, np.asarray(maps, np.float32).reshape(len(x), *np.shape(maps)[-3:]))
        out = {}
        for f in FLAGS:
            xf = np.concatenate([x, occ[:, None]], axis=1) if f == "occlusion" else x
            out[f] = 1.0 / (1.0 + np.exp(-tree_logits(self.trees[f], xf)))
        return out

    def decide(self, x: np.ndarray, fmap: np.ndarray) -> dict[str, dict[str, float | bool]]:
        """``{flag: {"p": probability, "flag": decision}}`` of one frame's features and map."""
        p = self.probabilities(x[None], fmap[None])
        return {f: {"p": round(float(p[f][0]), 4), "flag": bool(p[f][0] >= self.thresholds[f])} for f in FLAGS}
