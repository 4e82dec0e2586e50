"""One frame's OCR answer: detect → crop → recognise → lines → entities, QR and text regions → labels.

:class:`OcrPipeline` is the composition the ``Ocr`` Serve deployment runs, with the detector and
the batched recogniser behind handles, and the one evaluations run with a local engine
(:meth:`OcrPipeline.local`). Only *where* detection and recognition run differs; the crops, the
rule that turns detector output into lines (:func:`lines_from_detections`), the entities, the
text-region decisions and the labels are this module's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from livelens import fusion
from livelens.imageio import EncodedImage, as_rgb
from livelens.taxonomy import Taxonomy, load_taxonomy

#: Most detected boxes read per frame (a frame of dense text is not a live-stream ad).
MAX_LINES = 64
#: Recognition score below which a read line is dropped; rapidocr's own default, at which the
#: entity rules, the text-region thresholds and the contact flags were all chosen.
TEXT_SCORE = 0.5

Detect = Callable[[Any], Awaitable[list[dict[str, Any]]]]
Recognize = Callable[[list[np.ndarray]], Awaitable[list[tuple[str, float]]]]


def detections(boxes: Sequence[Any]) -> list[dict[str, Any]]:
    """A detector's boxes (``TextBox`` or dicts) as ``{"polygon", "score"}`` dicts, at most :data:`MAX_LINES`."""
    out = []
    for b in list(boxes)[:MAX_LINES]:
        poly = b["polygon"] if isinstance(b, dict) else b.polygon
        score = b.get("score", 1.0) if isinstance(b, dict) else b.score
        out.append({"polygon": np.asarray(poly, np.float32).reshape(-1, 2).tolist(), "score": float(score or 1.0)})
    return out


def axis_boxes(dets: Sequence[dict[str, Any]]) -> list[list[float]]:
    """The axis-aligned ``[x0, y0, x1, y1]`` of each detection."""
    out = []
    for d in dets:
        pts = np.asarray(d["polygon"], np.float32)
        out.append([float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())])
    return out


def lines_from_detections(dets: Sequence[dict[str, Any]], axis: Sequence[Sequence[float]],
                          texts: Sequence[tuple[str, float]], min_score: float = TEXT_SCORE) -> list[dict[str, Any]]:
    """The lines an answer reports: every detection whose read text is non-blank and scores ``min_score``."""
    return [{"polygon": d["polygon"], "box": list(box), "text": text, "score": float(score)}
            for d, box, (text, score) in zip(dets, axis, texts, strict=True) if text.strip() and score >= min_score]


class OcrPipeline:
    """The OCR answer of one frame, given where detection and recognition run.

    Args:
        engine_ref: ``model@version`` of the OCR engine (what labels name as their model).
        decode_qr: Also look for QR codes.
        regions: A :class:`~livelens.evidence.regions.RegionClassifier` run on every detected box, or None.
        regions_ref: Its ``name@version``.
        text_score: See :data:`TEXT_SCORE`.
        tax: The taxonomy.
    """

    def __init__(self, engine_ref: str, *, decode_qr: bool = True, regions: Any | None = None,
                 regions_ref: str | None = None, text_score: float = TEXT_SCORE, tax: Taxonomy | None = None):
        self.engine_ref = engine_ref
        self.decode_qr = decode_qr
        self.regions, self.regions_ref = regions, regions_ref
        self.text_score = text_score
        self.tax = tax or load_taxonomy()

    @classmethod
    def local(cls, engine: Any, **kwargs: Any) -> tuple[OcrPipeline, Detect, Recognize]:
        """A pipeline around an in-process engine, with its ``detect`` and ``recognize`` coroutines."""
        from livelens.ocr.engine import engine_ref

        async def detect(image: Any) -> list[dict[str, Any]]:
            return detections((await asyncio.to_thread(engine.detect, [as_rgb(image)]))[0])

        async def recognize(crops: list[np.ndarray]) -> list[tuple[str, float]]:
            return [(str(t), float(s)) for t, s in await asyncio.to_thread(engine.recognize, crops)] if crops else []

        return cls(engine_ref(engine), **kwargs), detect, recognize

    def models(self) -> list[str]:
        return [self.engine_ref] + ([fusion.QR_MODEL] if self.decode_qr else []) + (
            [self.regions_ref] if self.regions is not None else [])

    async def read(self, image: np.ndarray | EncodedImage, detect: Detect, recognize: Recognize,
                   qr_tiles: bool = True) -> dict[str, Any]:
        """Lines (polygon, box, text, score), entities, QR payloads, text regions and the labels they raise.

        Args:
            image: The frame.
            detect: Text detection (where it runs).
            recognize: Text recognition (where it runs).
            qr_tiles: Run the QR decoder's tiled pass for small codes. False defers it: the answer
                then says ``"qr_tiles": "deferred"``, and the caller either has the detection stage
                read QR boxes instead or runs :meth:`tiled_qr` and :func:`add_entities`.
        """
        from livelens.ocr import crop_line

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        # The detector gets the frame as it came (bytes: it decodes its own copy) while this side
        # decodes for the crops: both are cheaper than shipping the decoded frame across a hop.
        boxes_call = asyncio.ensure_future(detect(image))
        rgb = await asyncio.to_thread(as_rgb, image)
        dets = await boxes_call
        timings["detect"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        # Axis-aligned boxes once: the lines report them and the text regions classify them.
        axis = axis_boxes(dets)
        region_task = (asyncio.ensure_future(self._region_probs(rgb, axis, timings))
                       if self.regions is not None and axis else None)
        texts = await recognize([crop_line(rgb, d["polygon"]) for d in dets])
        timings["recognize"] = (time.perf_counter() - t0) * 1000
        probs = await region_task if region_task is not None else None
        lines = lines_from_detections(dets, axis, texts, self.text_score)
        t0 = time.perf_counter()
        entities = await asyncio.to_thread(self.entities, rgb, lines, qr_tiles)
        timings["entities"] = (time.perf_counter() - t0) * 1000
        labels = fusion.entity_labels(self.tax, entities, self.engine_ref)
        hits = self.region_hits(rgb, axis, probs, entities) if probs is not None else []
        if self.regions is not None:
            labels += fusion.region_labels(self.tax, hits, self.regions_ref)
        out = {"lines": lines, "entities": entities, "regions": [h.to_dict() for h in hits], "labels": labels,
               "models": self.models(), "timings_ms": {k: round(v, 3) for k, v in timings.items()}}
        if self.decode_qr and not qr_tiles:
            out["qr_tiles"] = "deferred"
        return out

    def read_sync(self, image: np.ndarray | EncodedImage, detect: Detect, recognize: Recognize,
                  qr_tiles: bool = True) -> dict[str, Any]:
        """:meth:`read` from synchronous code (an evaluation loop)."""
        return asyncio.run(self.read(image, detect, recognize, qr_tiles))

    def tiled_qr(self, image: np.ndarray | EncodedImage) -> list[dict[str, Any]]:
        """The QR decoder's deferred tiled pass alone: codes too small for the whole-frame pass
        (what the whole-frame pass read too is dropped by :func:`add_entities`)."""
        from livelens.ocr.qr import decode_qr

        if not self.decode_qr:
            return []
        rgb = as_rgb(image)  # (an encoded upload, as the gateway hands it on)
        return [entity_dict(e) for e in decode_qr(rgb, first_pass=False)]

    async def _region_probs(self, rgb: np.ndarray, axis: list[list[float]], timings: dict[str, float]) -> np.ndarray:
        """Class probabilities of every text box, computed while the recogniser reads them."""
        t0 = time.perf_counter()
        probs = await asyncio.to_thread(self.regions.classify, rgb, axis)
        timings["regions"] = (time.perf_counter() - t0) * 1000
        return probs

    def region_hits(self, rgb: np.ndarray, axis: list[list[float]], probs: np.ndarray, entities: list[dict]) -> list:
        """Hits from the box probabilities, with contact classes decided by what OCR read in each box."""
        from livelens.evidence.regions import contact_flags, region_hits

        flags = contact_flags(axis, [e["box"] for e in entities if e["kind"] != "qrcode" and len(e["box"]) == 4])
        return region_hits(self.regions, rgb, axis, contacts=flags, probs=probs)

    def entities(self, rgb: np.ndarray, lines: list[dict[str, Any]], qr_tiles: bool = True) -> list[dict[str, Any]]:
        """Phones, URLs, ids in the lines and QR codes in the frame, as JSON-ready dicts."""
        return frame_entities(rgb, lines, qr=self.decode_qr, qr_tiles=qr_tiles)


def entity_dict(e: Any) -> dict[str, Any]:
    """An :class:`~livelens.ocr.types.Entity` as the answer's JSON-ready dict."""
    return {"kind": e.kind, "value": e.value, "box": [float(v) for v in (e.box or [])], "label": e.label,
            "score": float(e.score or 0.0)}


def frame_entities(rgb: np.ndarray, lines: Sequence[dict[str, Any]], qr: bool = True,
                   qr_tiles: bool = True) -> list[dict[str, Any]]:
    """Phones, URLs, ids in the lines (:func:`lines_from_detections`) and, with ``qr``, QR codes in the frame."""
    from livelens.ocr.qr import frame_entities as extract
    from livelens.ocr.types import TextLine

    objs = [TextLine(polygon=ln["polygon"], box=ln["box"], text=ln["text"], score=ln["score"]) for ln in lines]
    return [entity_dict(e) for e in extract(rgb, objs, qr=qr, qr_tiles=qr_tiles)]


def add_entities(tax: Taxonomy, answer: dict[str, Any], entities: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Complete an OCR answer whose tiled QR pass was deferred (in place, and returned).

    Adds the entities the pass found, with the labels they raise pooled into the answer's, and
    marks the pass as run.
    """
    known = {e["value"] for e in answer["entities"] if e["kind"] == "qrcode"}
    new = [e for e in entities if not (e["kind"] == "qrcode" and e["value"] in known)]
    answer["entities"] = answer["entities"] + new
    if new:
        engine = next((m for m in answer.get("models", ()) if m != fusion.QR_MODEL), "")
        answer["labels"] = fusion.merge_labels(answer["labels"] + fusion.entity_labels(tax, new, engine))
    answer["qr_tiles"] = "ran"
    return answer
