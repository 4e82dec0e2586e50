"""``/v1/analyze`` in one process: the deployments' engines and the gateway's fusion, frame by frame.

:class:`LocalAnalyzer` holds the same pieces the Serve graph distributes — the moderation engine,
the OCR pipeline with a local PP-OCR engine, the quality engine — and merges their results with
:func:`livelens.fusion.assemble`, as the gateway does. Evaluations (``make eval-safety``, the
real-photo false-positive check) run it, so their figures are the service's; a test puts the same
frames through it and through HTTP and compares the labels.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from livelens import detection, fusion
from livelens.imageio import EncodedImage
from livelens.taxonomy import Taxonomy, load_taxonomy

CAPABILITIES = ("moderate", "ocr", "quality", "persons", "detect")
#: What ``/v1/analyze`` runs for a key without the ``persons`` scope (faces are personal data).
DEFAULT_CAPS = ("moderate", "ocr", "quality")


class LocalAnalyzer:
    """The capabilities of the service, built from the store chain, run in this process.

    Args:
        safety_ref: Safety classifier (None: open_nsfw only).
        regions_ref: Text-region model ('' or None: none).
        iqa_ref: Learned quality model (None: classical measures only).
        caps: Capabilities to run: ``/v1/analyze`` runs the first three, ``persons`` too for a key
            with that scope, and ``detect`` where the app deploys the detection stage.
        stores: The store chain (default :func:`livelens.store.store_chain`).
        use_open_nsfw: Also run open_nsfw, as the default service does.
        decode_qr: Also decode QR codes, as the default service does.
        evidence: Evidence mode, as the ``evidence`` query parameter (``boxes`` by default: its
            second pass changes scores, so it is part of what is measured).
        tax: The taxonomy (with any threshold overrides the gateway would apply).
        ocr_engine: An OCR engine to use instead of a fresh PP-OCR one.
        share_from: Another analyser whose OCR, quality and persons stages this one reuses (the
            objects themselves; their refs and the taxonomy are then that analyser's), so that
            two safety models compared on the same frames build and run those stages once
            (:func:`livelens.evaluation.evaluate_services`).
        detector: The detection stage's model (a store ref, or a ready detector), for ``detect``.
        detection: Other :class:`livelens.detection.DetectionEngine` arguments (``min_scores``,
            ``decode_qr``, ``second_pass``), as the deployment's live config gives them, and its
            ``stores`` where they differ from the other models' (the deployment's own args).
    """

    def __init__(self, safety_ref: str | None = "safety", regions_ref: str | None = "ads_regions",
                 iqa_ref: str | None = "quality_iqa", caps: Sequence[str] = DEFAULT_CAPS,
                 stores: Sequence[str] | None = None, use_open_nsfw: bool = True, decode_qr: bool = True,
                 evidence: str = "boxes", tax: Taxonomy | None = None, ocr_engine: Any | None = None,
                 threads: int = 2, share_from: LocalAnalyzer | None = None, detector: Any = "persons_det",
                 detection: dict[str, Any] | None = None):
        self.tax = tax or (share_from.tax if share_from is not None else load_taxonomy())
        self.caps = tuple(c for c in CAPABILITIES if c in caps)
        self.evidence = evidence
        self.moderation = self.ocr = self.quality = self.persons = self.detection = None
        self.detection_missing = ""
        if "moderate" in self.caps:
            from livelens.moderation import ModerationEngine

            self.moderation = ModerationEngine(safety_ref, stores, use_open_nsfw, threads, self.tax)
        if share_from is not None:
            for cap, attr in (("ocr", "ocr"), ("quality", "quality"), ("persons", "persons"), ("detect", "detection")):
                if cap in self.caps:
                    setattr(self, attr, getattr(share_from, attr))
        elif "ocr" in self.caps:
            from livelens.ocr import create_engine
            from livelens.ocr.pipeline import OcrPipeline

            regions = (None, None)
            if regions_ref:
                from livelens.evidence.regions import open_region_model

                model, ref, _ = open_region_model(regions_ref, stores)
                regions = (model, ref)
            engine = ocr_engine or create_engine("ppocr", threads=threads)
            self.ocr = OcrPipeline.local(engine, decode_qr=decode_qr, regions=regions[0], regions_ref=regions[1],
                                         tax=self.tax)
        if "quality" in self.caps and self.quality is None:
            from livelens.quality.engine import QualityEngine

            self.quality = QualityEngine(iqa_ref, stores, self.tax)
        if "persons" in self.caps and self.persons is None:
            from livelens.persons.engine import PersonsEngine

            self.persons = PersonsEngine(tax=self.tax)
        if "detect" in self.caps and self.detection is None:
            from livelens.detection import DetectionEngine
            from livelens.errors import ModelNotFoundError

            try:
                opts = dict(detection or {})
                self.detection = DetectionEngine(detector, opts.pop("stores", stores), tax=self.tax, **opts)
            except ModelNotFoundError as exc:
                # As the deployment: no detector stored yet (make train-persons) is an idle stage.
                self.detection_missing = str(exc)

    def models(self) -> list[str]:
        """``name@version`` of every model the analyser runs."""
        out: list[str] = []
        if self.moderation is not None:
            out += self.moderation.model_refs(self.moderation.safety)
        if self.ocr is not None:
            out += self.ocr[0].models()
        if self.quality is not None:
            out += self.quality.assess(np.zeros((16, 16, 3), np.uint8))["models"]
        if self.persons is not None:
            out += self.persons.models()
        if self.detection is not None:
            out += self.detection.models()
        return sorted(set(out))

    def parts(self, image: np.ndarray | EncodedImage, memo: dict[int, Any] | None = None) -> dict[str, dict[str, Any]]:
        """Each capability's result for one frame, as its deployment answers it (timings dropped).

        Args:
            image: The frame.
            memo: Results of this same frame by stage object (``id``): a stage another analyser
                shares (``share_from``) and has already run on the frame is not run again.
        """
        from livelens.imageio import as_rgb

        rgb = as_rgb(image)
        memo = {} if memo is None else memo

        def once(stage: Any, run: Any, variant: Any = None) -> dict[str, Any]:
            key = id(stage) if variant is None else (id(stage), variant)
            if key not in memo:
                memo[key] = run()
            # A copy: fusion and callers may change the answer in place.
            return copy.deepcopy(memo[key])

        out: dict[str, dict[str, Any]] = {}
        if self.moderation is not None:
            res = self.moderation.moderate(rgb, self.evidence)
            res.pop("_timings", None)
            out["moderate"] = res
        # As the gateway: with the detection stage, OCR's tiled QR pass waits for the detector.
        defer_qr = self.ocr is not None and (self.detection is not None or bool(self.detection_missing))
        if self.ocr is not None:
            pipe, detect, recognize = self.ocr
            res = once(self.ocr, lambda: pipe.read_sync(rgb, detect, recognize, not defer_qr), defer_qr)
            res.pop("timings_ms", None)
            out["ocr"] = res
        if self.quality is not None:
            out["quality"] = once(self.quality, lambda: self.quality.assess(rgb))
        if self.persons is not None:
            res = once(self.persons, lambda: self.persons.analyze(rgb))
            res.pop("timings_ms", None)
            out["persons"] = res
        if self.detection is None and self.detection_missing:
            out["detect"] = detection.idle_answer(self.detection_missing)
        elif self.detection is not None:
            # The detector's answer is shared; the second pass depends on this analyser's classifier.
            res = once(self.detection, lambda: self.detection.analyze(rgb))
            boxes = detection.second_pass_boxes(res) if self.detection.second_pass else []
            if boxes and self.moderation is not None:
                detection.attach_second_pass(self.tax, res, self.moderation.classify_regions(rgb, boxes))
            out["detect"] = res
        if defer_qr:
            if not detection.reads_qr(out["detect"]):
                out["detect"][detection.QR_TILES] = once(self.ocr, lambda: {"tiles": self.ocr[0].tiled_qr(rgb)},
                                                        "tiles")["tiles"]
            detection.complete_qr(self.tax, out)
        return out

    def analyze(self, image: np.ndarray | EncodedImage) -> dict[str, Any]:
        """The ``/v1/analyze`` body of one frame (without request id and timings)."""
        from livelens.imageio import as_rgb

        rgb = as_rgb(image)
        return fusion.assemble(self.tax, self.parts(rgb), (rgb.shape[1], rgb.shape[0]))
