"""OCR: text detection → recognition as separate deployments, recognition batched over crops.

Detection runs once per frame; every detected line becomes a crop, and crops from all concurrent
frames are recognised together by ``@serve.batch``. The composer (``Ocr``) runs
:class:`livelens.ocr.pipeline.OcrPipeline` with the detector and recogniser behind handles: lines,
entities (phones, URLs, WeChat/QQ ids), QR codes, and the text-region classifier (``ads_regions``,
watermarks, logos and banners), each turned into ``ads`` labels with their boxes as evidence. That
pipeline is what ``make eval-safety`` runs locally, so the figures are this deployment's. PP-OCR
(ONNX) is the default engine; an mmocr model from the model store is used with ``engine="mmocr"``.

The text-region model, the QR switch, the line score and the recogniser's batch settings are live
(:class:`OcrConfig`, Serve's ``user_config``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from livelens.imageio import EncodedImage, as_rgb
from livelens.serving.envelope import quiet_expected_errors
from livelens.serving.heap import start_heap_trimmer
from serve_apps.common import Args, DeployOptions, once_more


class OcrConfig(BaseModel):
    """OCR knobs that change without a restart (``user_config`` of the composer and the recogniser).

    Attributes:
        regions: Text-region classifier, a name or ``name@version`` in the store chain; empty
            turns it off. A missing model is reported by ``/v1/models``, not an error.
        decode_qr: Also look for QR codes.
        text_score: Read lines scoring below this are dropped (:data:`livelens.ocr.pipeline.TEXT_SCORE`).
        max_batch_size: Crops per recognition batch.
        batch_wait_timeout_s: How long a recognition batch waits to fill.
    """

    model_config = ConfigDict(extra="forbid")
    regions: str = "ads_regions"
    decode_qr: bool = True
    text_score: float = Field(0.5, ge=0, le=1)
    max_batch_size: int = Field(16, ge=1, le=512)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5)


class OcrArgs(Args):
    """OCR settings fixed for a replica's life.

    Attributes:
        engine: ``ppocr`` (default, ONNX) or ``mmocr``.
        engine_kwargs: Passed to ``livelens.ocr.create_engine`` (e.g. the mmocr model refs).
        threads: Intra-op threads of each replica.
        stores: Model stores for the text-region model (default: the store chain).
        live: The starting :class:`OcrConfig`.
    """

    model_config = ConfigDict(extra="forbid")
    engine: str = "ppocr"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    threads: int = Field(2, ge=1)
    stores: list[str] | None = None
    live: OcrConfig = Field(default_factory=OcrConfig)
    det_deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.25))
    rec_deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.25, max_ongoing_requests=64,
                                                                            max_queued_requests=256))
    deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.1, max_ongoing_requests=16))


_BATCH = OcrConfig()


def _engine(args: OcrArgs):
    from livelens.ocr import create_engine

    kwargs = dict(args.engine_kwargs)
    if args.engine == "ppocr":
        kwargs.setdefault("threads", args.threads)
    return create_engine(args.engine, **kwargs)


def _live(config: dict[str, Any] | None) -> OcrConfig:
    from livelens.errors import ConfigError

    try:
        return OcrConfig.model_validate(config or {})
    except ValueError as exc:
        raise ConfigError(f"ocr user_config: {exc}") from None


@serve.deployment
class TextDetector:
    """Text detection: one frame in, line polygons out."""

    def __init__(self, args: OcrArgs):
        quiet_expected_errors()  # a client's 4xx: one INFO line in this replica's log, no traceback
        start_heap_trimmer()  # large images leave the heap at its peak otherwise
        self.args = args
        self.engine = _engine(args)

    def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("no OCR engine")

    def info(self) -> dict[str, Any]:
        from livelens.ocr.engine import engine_ref

        return {"ref": engine_ref(self.engine), "engine": self.args.engine}

    async def detect(self, image: np.ndarray | EncodedImage) -> list[dict[str, Any]]:
        from livelens.ocr.pipeline import detections

        return detections((await asyncio.to_thread(lambda: self.engine.detect([as_rgb(image)])))[0])


@serve.deployment
class TextRecognizer:
    """Text recognition, batched over crops from every concurrent frame."""

    def __init__(self, args: OcrArgs):
        quiet_expected_errors()  # a client's 4xx: one INFO line in this replica's log, no traceback
        start_heap_trimmer()  # large images leave the heap at its peak otherwise
        self.args = args
        self.engine = _engine(args)
        # One thread for every recognition (batches run one at a time anyway): glibc gives each
        # thread its own malloc arena, and batches of crops in every width spread over the default
        # pool's threads can grow several arenas to their peak; the recogniser's RSS grew in the soak.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocr-rec")
        self.reconfigure(args.live.model_dump())

    def reconfigure(self, config: dict[str, Any]) -> None:
        live = _live(config)
        self.recognize.set_max_batch_size(live.max_batch_size)
        self.recognize.set_batch_wait_timeout_s(live.batch_wait_timeout_s)

    def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("no OCR engine")

    @serve.batch(max_batch_size=_BATCH.max_batch_size, batch_wait_timeout_s=_BATCH.batch_wait_timeout_s)
    async def recognize(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        res = await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.recognize, crops)
        return [(str(t), float(s)) for t, s in res]


@serve.deployment
class Ocr:
    """Detect → crop → recognise → entities, QR and text regions → ads labels."""

    def __init__(self, args: OcrArgs, detector, recognizer):
        quiet_expected_errors()  # a client's 4xx: one INFO line in this replica's log, no traceback
        start_heap_trimmer()  # large images leave the heap at its peak otherwise
        self.args = args
        self.detector, self.recognizer = detector, recognizer
        self.live = args.live
        self.regions = self._regions(args.live.regions)
        self._pipeline = None  # built on the first call: the engine's ref comes from the detector

    def _regions(self, ref: str) -> tuple[Any, str | None, str, str]:
        """``(model, ref, store, problem)`` of the text-region model; a missing one is a problem, not an error."""
        if not ref:
            return None, None, "", ""
        from livelens.errors import LivelensError
        from livelens.evidence.regions import open_region_model

        try:
            import torch

            torch.set_num_threads(max(1, self.args.threads))
            model, full, root = open_region_model(ref, self.args.stores)
            return model, full, root, ""
        except LivelensError as e:  # a broken or missing card must not take OCR down with it
            return None, None, "", f"{ref}: {e}: no text-region labels"

    async def reconfigure(self, config: dict[str, Any]) -> None:
        live = _live(config)
        if live.regions != self.live.regions:
            self.regions = await asyncio.to_thread(self._regions, live.regions)
        self.live, self._pipeline = live, None

    def check_health(self) -> None:
        """The composer holds no OCR model; detector and recogniser have their own checks."""

    async def pipeline(self):
        from livelens.ocr.pipeline import OcrPipeline

        if self._pipeline is None:
            ref = (await self.detector.info.remote())["ref"]
            self._pipeline = OcrPipeline(ref, decode_qr=self.live.decode_qr, regions=self.regions[0],
                                         regions_ref=self.regions[1], text_score=self.live.text_score)
        return self._pipeline

    async def info(self) -> dict[str, Any]:
        from livelens.coverage import entity_covers, regions_covers

        pipe = await self.pipeline()
        models = [{"ref": pipe.engine_ref, "kind": "ocr (detect + recognize)", "engine": self.args.engine,
                   "source": "PP-OCR ONNX models bundled with rapidocr" if self.args.engine == "ppocr"
                   else "mmocr model from the model store", "covers": entity_covers(qr=False)}]
        if self.live.decode_qr:
            models.append({"ref": "qr_decoder@1", "kind": "qr", "source": "OpenCV QRCodeDetector (no weights)",
                           "covers": entity_covers(qr=True)})
        model, ref, root, problem = self.regions
        if model is not None:
            from livelens.store import ModelStore

            models.append({"ref": ref, "kind": "text regions (ads_watermark, ads_logo, ads_text_banner)",
                           "source": f"model store {root}", "thresholds": model.thresholds,
                           "covers": regions_covers(ModelStore(root).card(ref))})
        return {"models": models, "missing": problem, "live": self.live.model_dump()}

    async def read(self, image: np.ndarray | EncodedImage, qr_tiles: bool = True) -> dict[str, Any]:
        """Lines (polygon, box, text, score), entities, QR payloads, regions and the ads labels they raise.

        ``qr_tiles`` False defers the QR decoder's tiled pass (:meth:`OcrPipeline.read`).
        """
        pipe = await self.pipeline()

        # Both calls are retried once when their replica dies mid-request (serve_apps.common.once_more).
        async def recognize(crops: list[np.ndarray]) -> list[tuple[str, float]]:
            return list(await asyncio.gather(*(once_more(lambda c=c: self.recognizer.recognize.remote(c))
                                               for c in crops)))

        async def detect(img: np.ndarray | EncodedImage) -> list[dict[str, Any]]:
            return await once_more(lambda: self.detector.detect.remote(img))

        return await pipe.read(image, detect, recognize, qr_tiles)

    async def tiled_qr(self, image: np.ndarray | EncodedImage) -> list[dict[str, Any]]:
        """The deferred tiled QR pass alone (:meth:`OcrPipeline.tiled_qr`)."""
        pipe = await self.pipeline()
        return await asyncio.to_thread(pipe.tiled_qr, image)


def bind_ocr(args: OcrArgs | dict | None = None):
    """The OCR sub-graph (detector and recogniser handles into the composer), bound."""
    a = args if isinstance(args, OcrArgs) else OcrArgs.model_validate(args or {})
    live = a.live.model_dump()
    det = TextDetector.options(**a.det_deploy.to_options()).bind(a)
    rec = TextRecognizer.options(**a.rec_deploy.to_options(), user_config=live).bind(a)
    return Ocr.options(**a.deploy.to_options(), user_config=live).bind(a, det, rec)


def build_app(args: OcrArgs | dict | None = None):
    """OCR alone (used through a handle)."""
    return bind_ocr(args)
