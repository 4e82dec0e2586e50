"""OCR: text detection → recognition as separate deployments, recognition batched over crops.

Detection runs once per frame; every detected line becomes a crop, and crops from all concurrent
frames are recognised together by ``@serve.batch``. The composer then extracts entities (phones,
URLs, WeChat/QQ ids), decodes QR codes, and decides the ``ads`` labels through the taxonomy with the
entity boxes as evidence. PP-OCR (ONNX) is the default engine; an mmocr model from the model store
is used when ``engine="mmocr"`` is configured.

Every detected box is also a proposal for the text-region classifier (``ads_regions`` from the
store chain, ``livelens.evidence.regions``), which raises ``ads_watermark``, ``ads_logo`` and
``ads_text_banner`` — overlays that carry text but no entity — with the box as evidence. It runs in
the composer while the recogniser reads the same boxes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from livelens.imageio import EncodedImage, as_rgb
from serve_apps.common import DeployOptions

MAX_LINES = 64


class OcrArgs(BaseModel):
    """OCR settings.

    Attributes:
        engine: ``ppocr`` (default, ONNX) or ``mmocr``.
        engine_kwargs: Passed to ``livelens.ocr.create_engine`` (e.g. the mmocr model refs).
        max_batch_size: Crops per recognition batch.
        batch_wait_timeout_s: How long a recognition batch waits to fill.
        decode_qr: Also look for QR codes.
        threads: Intra-op threads of each replica.
        regions: Text-region classifier, a name or ``name@version`` in the store chain; empty
            turns it off. A missing model is reported by ``/v1/models``, not an error.
    """

    model_config = ConfigDict(extra="forbid")
    engine: str = "ppocr"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    decode_qr: bool = True
    threads: int = Field(2, ge=1)
    regions: str = "ads_regions"
    det_deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.25))
    rec_deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.25, max_ongoing_requests=64,
                                                                            max_queued_requests=256))
    deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.1, max_ongoing_requests=16))


def _engine(args: OcrArgs):
    from livelens.ocr import create_engine

    kwargs = dict(args.engine_kwargs)
    if args.engine == "ppocr":
        kwargs.setdefault("threads", args.threads)
    return create_engine(args.engine, **kwargs)


def engine_ref(engine) -> str:
    """``model@version`` of an OCR engine (its own ``ref``/``model_refs`` when it has one)."""
    for attr in ("ref", "model_ref"):
        if isinstance(getattr(engine, attr, None), str):
            return getattr(engine, attr)
    refs = getattr(engine, "model_refs", None)
    if isinstance(refs, dict | list | tuple) and refs:
        return "+".join(refs.values() if isinstance(refs, dict) else refs)
    name = getattr(engine, "name", type(engine).__name__.lower())
    if name == "ppocr":
        from importlib.metadata import version

        # The PP-OCR ONNX files ship inside the rapidocr wheel, so its version pins the weights.
        return f"ppocr@rapidocr-{version('rapidocr')}"
    return f"{name}@1"


def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


@serve.deployment
class TextDetector:
    """Text detection: one frame in, line polygons out."""

    def __init__(self, args: dict):
        self.args = OcrArgs.model_validate(args)
        self.engine = _engine(self.args)

    def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("no OCR engine")

    def info(self) -> dict[str, Any]:
        return {"ref": engine_ref(self.engine), "engine": self.args.engine}

    async def detect(self, image: np.ndarray | EncodedImage) -> list[dict[str, Any]]:
        boxes = (await asyncio.to_thread(lambda: self.engine.detect([as_rgb(image)])))[0]
        out = []
        for b in boxes[:MAX_LINES]:
            poly = np.asarray(_field(b, "polygon"), np.float32).reshape(-1, 2).tolist()
            out.append({"polygon": poly, "score": float(_field(b, "score", 1.0) or 1.0)})
        return out


@serve.deployment
class TextRecognizer:
    """Text recognition, batched over crops from every concurrent frame."""

    def __init__(self, args: dict):
        self.args = OcrArgs.model_validate(args)
        self.engine = _engine(self.args)
        self.recognize.set_max_batch_size(self.args.max_batch_size)
        self.recognize.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("no OCR engine")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def recognize(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        res = await asyncio.to_thread(self.engine.recognize, crops)
        return [(str(t), float(s)) for t, s in res]


@serve.deployment
class Ocr:
    """Detect → crop → recognise → entities and QR → ads labels."""

    def __init__(self, args: dict, detector, recognizer):
        from livelens.taxonomy import load_taxonomy

        self.args = OcrArgs.model_validate(args)
        self.detector, self.recognizer = detector, recognizer
        self.tax = load_taxonomy()
        self._ref: str | None = None
        try:
            from livelens.ocr.qr import frame_entities
        except ImportError:  # without the extractors OCR still serves lines; /v1/models says what is missing
            frame_entities = None
        self._extract = frame_entities
        self.regions, self._regions_ref, self._regions_missing = None, None, ""
        if self.args.regions:
            self._load_regions(self.args.regions)

    def _load_regions(self, ref: str) -> None:
        from livelens.errors import LivelensError
        from livelens.evidence.regions import load_region_model
        from livelens.store import ModelStore
        from serve_apps.common import find_in_stores

        found = find_in_stores(ref)
        if found is None:
            self._regions_missing = f"no {ref!r} in the store chain: no text-region labels"
            return
        try:
            import torch

            torch.set_num_threads(max(1, self.args.threads))
            self.regions = load_region_model(ModelStore(found[0]), found[1])
            self._regions_ref, self._regions_root = found[1], found[0]
        except LivelensError as e:  # a broken card must not take OCR down with it
            self._regions_missing = f"{ref}: {e}"

    def check_health(self) -> None:
        """The composer holds no model; detector and recogniser have their own checks."""

    async def _engine_ref(self) -> str:
        if self._ref is None:
            self._ref = (await self.detector.info.remote())["ref"]
        return self._ref

    async def info(self) -> dict[str, Any]:
        ref = await self._engine_ref()
        models = [{"ref": ref, "kind": "ocr (detect + recognize)", "engine": self.args.engine,
                   "source": "PP-OCR ONNX models bundled with rapidocr" if self.args.engine == "ppocr"
                   else "mmocr model from the model store"}]
        if self.args.decode_qr:
            models.append({"ref": "qr_decoder@1", "kind": "qr", "source": "OpenCV QRCodeDetector (no weights)"})
        if self.regions is not None:
            models.append({"ref": self._regions_ref, "kind": "text regions (ads_watermark, ads_logo, ads_text_banner)",
                           "source": f"model store {self._regions_root}", "thresholds": self.regions.thresholds})
        missing = [m for m in ("" if self._extract else "livelens.ocr.extract_entities not available: no entities",
                               self._regions_missing) if m]
        return {"models": models, "missing": "; ".join(missing)}

    async def read(self, image: np.ndarray | EncodedImage) -> dict[str, Any]:
        """Lines (polygon, box, text, score), entities, QR payloads and the ads labels they raise."""
        from livelens.ocr import crop_line

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        # The detector gets the bytes too (it decodes its own copy) while this replica decodes
        # for the crops: both are cheaper than shipping the decoded frame across the hop.
        boxes_call = self.detector.detect.remote(image)
        image = await asyncio.to_thread(as_rgb, image)
        boxes = await boxes_call
        timings["detect"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        # Axis-aligned boxes once: the lines report them and the text regions classify them.
        axis = []
        for b in boxes:
            pts = np.asarray(b["polygon"], np.float32)
            axis.append([float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())])
        region_task = (asyncio.create_task(self._regions(image, axis, timings))
                       if self.regions is not None and axis else None)
        crops = [crop_line(image, b["polygon"]) for b in boxes]
        texts = await asyncio.gather(*(self.recognizer.recognize.remote(c) for c in crops))
        timings["recognize"] = (time.perf_counter() - t0) * 1000
        region_probs = await region_task if region_task is not None else None
        lines = [{"polygon": b["polygon"], "box": box, "text": text, "score": score}
                 for b, box, (text, score) in zip(boxes, axis, texts, strict=True) if text.strip()]
        t0 = time.perf_counter()
        entities = await asyncio.to_thread(self._entities, image, lines)
        timings["entities"] = (time.perf_counter() - t0) * 1000
        ref = await self._engine_ref()
        models = [ref] + (["qr_decoder@1"] if self.args.decode_qr else [])
        labels = self._ads_labels(entities, ref)
        hits = []
        if self.regions is not None:
            if region_probs is not None:
                hits = self._region_hits(image, axis, region_probs, entities)
            models.append(self._regions_ref)
            labels += self._grouped_labels(hits, lambda h: self._regions_ref, lambda h: {
                "kind": "box", "box": list(h.box), "source": "text_region", "score": round(h.score, 4)})
        return {"lines": lines, "entities": entities, "regions": [h.to_dict() for h in hits], "labels": labels,
                "models": models, "timings_ms": {k: round(v, 3) for k, v in timings.items()}}

    async def _regions(self, image: np.ndarray, axis: list[list[float]], timings: dict[str, float]) -> np.ndarray:
        """Class probabilities of every text box, computed while the recogniser reads them."""
        t0 = time.perf_counter()
        probs = await asyncio.to_thread(self.regions.classify, image, axis)
        timings["regions"] = (time.perf_counter() - t0) * 1000
        return probs

    def _region_hits(self, image: np.ndarray, axis: list[list[float]], probs: np.ndarray,
                     entities: list[dict]) -> list:
        """Hits from the box probabilities, with contact classes decided by what OCR read in each box."""
        from livelens.evidence.regions import contact_flags, region_hits

        flags = contact_flags(axis, [e["box"] for e in entities if e["kind"] != "qrcode" and len(e["box"]) == 4])
        return region_hits(self.regions, image, axis, contacts=flags, probs=probs)

    def _entities(self, image, lines) -> list[dict[str, Any]]:
        from livelens.ocr import TextLine

        if self._extract is None:
            return []
        objs = [TextLine(polygon=ln["polygon"], box=ln["box"], text=ln["text"], score=ln["score"]) for ln in lines]
        found = self._extract(image, objs, qr=self.args.decode_qr)
        return [{"kind": _field(e, "kind"), "value": _field(e, "value"),
                 "box": [float(v) for v in (_field(e, "box") or [])],
                 "label": _field(e, "label"), "score": float(_field(e, "score", 1.0) or 0.0)} for e in found]

    def _ads_labels(self, entities: list[dict], ref: str) -> list[dict[str, Any]]:
        """One taxonomy label per entity kind, its strongest entity's score, every box as evidence."""
        return self._grouped_labels(
            entities, lambda e: "qr_decoder@1" if e["kind"] == "qrcode" else ref,
            lambda e: {"kind": "box", "box": e["box"], "source": e["kind"], "value": e["value"]})

    def _grouped_labels(self, items: list, model_of, evidence_of) -> list[dict[str, Any]]:
        """One taxonomy label per item label (entities or text regions): the best score, every item as evidence.

        The label's model is the items' one model, or the first non-QR one when they mix (a phone
        read by OCR and a QR code name two models; OCR's stands for the label).
        """
        by_label: dict[str, list] = {}
        for it in items:
            name = it["label"] if isinstance(it, dict) else it.label
            if name and name in self.tax.labels:
                by_label.setdefault(name, []).append(it)
        labels = []
        for name, its in by_label.items():
            score = max(float(it["score"] if isinstance(it, dict) else it.score) for it in its)
            models = [model_of(it) for it in its]
            model = next((m for m in models if m != "qr_decoder@1"), models[0])
            labels.append({**self.tax.describe(name, score), "group": self.tax.labels[name].group, "model": model,
                           "evidence": [evidence_of(it) for it in its]})
        return labels


def bind_ocr(args: dict | None = None):
    """The OCR sub-graph (detector and recogniser handles into the composer), bound."""
    a = OcrArgs.model_validate(args or {})
    raw = a.model_dump()
    det = TextDetector.options(**a.det_deploy.to_options()).bind(raw)
    rec = TextRecognizer.options(**a.rec_deploy.to_options()).bind(raw)
    return Ocr.options(**a.deploy.to_options()).bind(raw, det, rec)


def build_app(args: OcrArgs | dict | None = None):
    """OCR alone (used through a handle)."""
    return bind_ocr(args.model_dump() if isinstance(args, OcrArgs) else args)
