"""The OCR engines: PP-OCR (rapidocr's shipped ONNX models, the default) behind one interface.

``detect`` → ``crop_lines`` → ``recognize`` are separate steps so a Serve graph can run them
on different replicas; ``read`` chains them for a batch of images. Throughput comes from
pooling the line crops of *all* images of a batch, sorting them by aspect ratio and running
recognition in large batches, where rapidocr called directly recognises each image's lines
on their own in batches of 6.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livelens.errors import ConfigError, InvalidArgumentError, LivelensError
from livelens.imageio import DEFAULT_LIMITS, ImageLimits, load_image
from livelens.ocr import decode, layout
from livelens.ocr.layout import is_line_shaped
from livelens.ocr.types import OcrEngine, TextBox, TextLine
from livelens.registry import Registry

# Below this many pixels on a side there is no legible text; answering "nothing" is the
# documented behaviour for 1×1 and empty frames (not an error).
MIN_SIDE = 8

PPOCR_MODEL_FILES = {
    "det": "PP-OCRv6_det_small.onnx",
    "rec": "PP-OCRv6_rec_small.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
}


def _stop_spinning(wrapper: Any, model_path: Path, threads: int | None) -> None:
    """Rebuild a rapidocr stage's ONNX Runtime session with idle workers that sleep instead of spin.

    detect → classify → recognise run three sessions one after the other, each with its own
    intra-op pool. ONNX Runtime's workers spin after a run, so the pool that just finished kept
    both cores busy while the next stage's pool wanted them (the same fault cost open_nsfw 20 CPU-ms
    per request in serving). rapidocr 3.10 has no option for it, so the session is rebuilt from
    the same file with the options rapidocr would set, plus ``allow_spinning=0`` and no memory
    patterns (they are kept per input shape, and line crops have every width).
    """
    import onnxruntime as ort

    if not hasattr(wrapper, "session"):
        return  # not the onnxruntime engine: nothing to change
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.enable_cpu_mem_arena = False  # rapidocr's default
    # Memory patterns are planned and kept per input shape. Line crops come in every width, so
    # the recogniser kept growing: +18.9 % RSS over a 10-minute soak, and +112 MB over 200 more
    # calls on varied crops in-process, against a plateau without them.
    opts.enable_mem_pattern = False
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    wrapper.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])


def ppocr_model_dir() -> Path:
    """Where rapidocr's wheel ships its ONNX models."""
    import rapidocr

    return Path(rapidocr.__file__).resolve().parent / "models"


@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """Make any attempt by rapidocr to fetch a model or dictionary fail loudly.

    We pass explicit model paths, so nothing should download; this guard turns a future
    rapidocr change that would silently reach the network into a clear error.
    """
    from rapidocr.utils.download_file import DownloadFile

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConfigError("rapidocr tried to download a file; livelens runs offline with the shipped models")

    original = DownloadFile.__dict__["run"]
    DownloadFile.run = staticmethod(refuse)
    try:
        yield
    finally:
        DownloadFile.run = original


def as_rgb(image: Any, limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray | None:
    """Load one image as RGB uint8, or ``None`` when it is too small to hold text.

    Zero-sized arrays count as empty frames (no text) rather than bad input; undecodable
    bytes or paths still raise :class:`~livelens.errors.InvalidImageError`.
    """
    if isinstance(image, np.ndarray) and image.size == 0:
        return None
    rgb = load_image(image, limits)
    if min(rgb.shape[:2]) < MIN_SIDE:
        return None
    return rgb


def crop_line(image: np.ndarray, polygon: Sequence[Sequence[float]]) -> np.ndarray:
    """Perspective-crop one text polygon to an upright line image (tall crops rotated to lie flat).

    The same geometry as PP-OCR's own ``get_rotate_crop_image``, so crops match rapidocr's.
    """
    from rapidocr.utils.process_img import get_rotate_crop_image

    pts = np.asarray(polygon, dtype=np.float32).reshape(4, 2).copy()
    return np.ascontiguousarray(get_rotate_crop_image(image, pts))


def crop_lines(image: np.ndarray, boxes: Sequence[TextBox]) -> list[np.ndarray]:
    """Crops for every detected box of one RGB image."""
    return [crop_line(image, b.polygon) for b in boxes]


class PpOcrEngine:
    """PP-OCRv6 detection + recognition (and the PP-OCR angle classifier) on onnxruntime.

    Three separate rapidocr stages: one instance for detection only and separate ones for
    classification and recognition, so recognition can be called on crops alone.

    Args:
        rec_batch_num: Line crops per recognition batch (rapidocr's default is 6).
        use_cls: Run the 0/180° line classifier before recognition (rapidocr's default).
        text_score: Lines recognised below this score are dropped (rapidocr's default 0.5).
        box_thresh: Detection box threshold.
        threads: onnxruntime intra-op threads; ``None`` lets onnxruntime decide.
        model_dir: Directory with the three ONNX files; default the rapidocr wheel's.
        limits: Image limits applied when decoding inputs.
        line_fallback: When detection finds nothing in a small line-shaped image (a crop
            such as ``text_rec.jpg``, which PP-OCR's detector misses), the whole image is one
            line box. rapidocr itself returns nothing there.
        max_upscale: Pad small images so detection scales them up at most this much
            (:func:`~livelens.ocr.layout.pad_for_detection`); ``None``: rapidocr's scaling.
        check_flips: Also read a line the angle classifier turned over as it came, and keep the
            read with the higher score.
        undouble, simplify: The recogniser's decoding fixes (:class:`~livelens.ocr.decode.LineDecoder`);
            ``None`` turns one off.

    The defaults are livelens's reading; every fix off is PP-OCR as rapidocr runs it
    (:meth:`plain`). The fixes were chosen on the ``val`` split of :mod:`livelens.ocr.userset`.
    """

    name = "ppocr"

    def __init__(
        self,
        *,
        rec_batch_num: int = 32,
        use_cls: bool = True,
        text_score: float = 0.5,
        box_thresh: float = 0.5,
        threads: int | None = None,
        model_dir: str | Path | None = None,
        limits: ImageLimits = DEFAULT_LIMITS,
        line_fallback: bool = True,
        max_upscale: float | None = layout.MAX_UPSCALE,
        check_flips: bool = True,
        undouble: float | None = decode.UNDOUBLE,
        simplify: float | None = decode.SIMPLIFY,
    ):
        if rec_batch_num < 1:
            raise InvalidArgumentError(f"rec_batch_num must be >= 1, got {rec_batch_num}")
        from rapidocr import RapidOCR

        model_dir = Path(model_dir) if model_dir else ppocr_model_dir()
        paths = {k: model_dir / f for k, f in PPOCR_MODEL_FILES.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise ConfigError(f"PP-OCR model files missing: {missing}; reinstall rapidocr==3.10.0 (ships them)")
        self.use_cls = use_cls
        self.text_score = text_score
        self.limits = limits
        self.line_fallback = line_fallback
        self.max_upscale = max_upscale
        self.check_flips = check_flips
        base = {
            "Global.log_level": "error",
            "Det.model_path": str(paths["det"]),
            "Cls.model_path": str(paths["cls"]),
            "Rec.model_path": str(paths["rec"]),
            "Det.box_thresh": box_thresh,
            "Rec.rec_batch_num": rec_batch_num,
            "Cls.cls_batch_num": rec_batch_num,
        }
        if threads:
            base["EngineConfig.onnxruntime.intra_op_num_threads"] = int(threads)
        with _no_downloads():
            self._det_ocr = RapidOCR(params={**base, "Global.use_cls": False, "Global.use_rec": False})
            self._det_ocr._load_det_model()
            # Separate instances for crop-only stages, as rapidocr's own det/rec split suggests.
            self._cls = RapidOCR(params={**base, "Global.use_det": False, "Global.use_rec": False})._load_cls_model()
            self._rec = RapidOCR(params={**base, "Global.use_det": False, "Global.use_cls": False})._load_rec_model()
        if undouble is not None or simplify is not None:
            self._rec.postprocess_op = decode.LineDecoder(self._rec.postprocess_op.character,
                                                          undouble=undouble, simplify=simplify)
        for stage, key in ((self._det_ocr.text_det, "det"), (self._cls, "cls"), (self._rec, "rec")):
            _stop_spinning(stage.session, paths[key], threads)
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)

    @classmethod
    def plain(cls, **kwargs: Any) -> PpOcrEngine:
        """PP-OCR as rapidocr runs it: none of livelens's reading fixes (the evaluation's anchor)."""
        return cls(line_fallback=False, max_upscale=None, check_flips=False, undouble=None, simplify=None, **kwargs)

    # -- detection -------------------------------------------------------------------
    def _detect_rgb(self, rgb: np.ndarray | None) -> list[TextBox]:
        if rgb is None:
            return []
        canvas, offset = (layout.pad_for_detection(rgb, self.max_upscale) if self.max_upscale else (rgb, (0, 0)))
        try:
            res = self._det_ocr(np.ascontiguousarray(canvas[:, :, ::-1]))
        except Exception as exc:  # rapidocr raises plain errors on odd shapes; keep ours typed
            raise LivelensError(f"PP-OCR detection failed: {exc}") from exc
        boxes = getattr(res, "boxes", None)
        found: list[TextBox] = []
        if boxes is not None and len(boxes) > 0:
            scores = res.scores if res.scores is not None else [1.0] * len(boxes)
            found = layout.unpad([TextBox.from_polygon(b, s) for b, s in zip(boxes, scores, strict=True)],
                                 offset, rgb.shape)
        if not found and self.line_fallback and is_line_shaped(rgb):
            found = [layout.whole_line(rgb)]
        return found

    def detect(self, images: Sequence[Any]) -> list[list[TextBox]]:
        """Text boxes per image (polygons in original pixel coordinates)."""
        return [self._detect_rgb(as_rgb(img, self.limits)) for img in images]

    # -- recognition -----------------------------------------------------------------
    def recognize(self, crops: Sequence[np.ndarray], use_cls: bool | None = None) -> list[tuple[str, float]]:
        """``(text, score)`` per RGB line crop, all crops in width-sorted batches.

        Args:
            crops: Line images (H, W, 3) RGB uint8, e.g. from :func:`crop_lines`.
            use_cls: Override the engine's angle-classifier setting for this call.
        """
        from rapidocr.ch_ppocr_rec import TextRecInput

        out: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        valid = [i for i, c in enumerate(crops) if isinstance(c, np.ndarray) and c.ndim == 3 and min(c.shape[:2]) >= 2]
        if not valid:
            return out
        bgr = [np.ascontiguousarray(crops[i][:, :, ::-1]) for i in valid]
        flipped: list[int] = []
        upright = bgr
        if self.use_cls if use_cls is None else use_cls:
            cls = self._cls(bgr)
            upright = cls.img_list
            if self.check_flips:  # rapidocr's own rule for turning a line over
                flipped = [k for k, (label, score) in enumerate(cls.cls_res)
                           if "180" in label and score > self._cls.cls_thresh]
        # A line the classifier turned over is also read as it came, and the likelier read wins:
        # the classifier turns short symmetric lines (666 → 999, 'Hello' → '1eH') that were upright.
        res = self._rec(TextRecInput(img=list(upright) + [bgr[k] for k in flipped]))
        reads = [(str(t), float(s)) for t, s in zip(res.txts, res.scores, strict=True)]
        for j, k in enumerate(flipped):
            if reads[len(upright) + j][1] > reads[k][1]:
                reads[k] = reads[len(upright) + j]
        for i, read in zip(valid, reads, strict=False):
            out[i] = read
        return out

    # -- both ------------------------------------------------------------------------
    def read(self, images: Sequence[Any]) -> list[list[TextLine]]:
        """Detect and recognise a batch of images; line crops of all images share rec batches."""
        rgbs = [as_rgb(img, self.limits) for img in images]
        dets = [self._detect_rgb(rgb) for rgb in rgbs]
        crops: list[np.ndarray] = []
        owners: list[tuple[int, TextBox]] = []
        for i, (rgb, boxes) in enumerate(zip(rgbs, dets, strict=True)):
            for b in boxes:
                crops.append(crop_line(rgb, b.polygon))
                owners.append((i, b))
        results: list[list[TextLine]] = [[] for _ in images]
        for (i, b), (text, score) in zip(owners, self.recognize(crops), strict=True):
            if text.strip() and score >= self.text_score:
                results[i].append(TextLine(b.polygon, b.box, text, score))
        return results


def _mmocr_engine(**kwargs: Any) -> OcrEngine:
    from livelens.ocr.mmocr_adapter import MmocrEngine  # torch + mmocr: only when asked for

    return MmocrEngine(**kwargs)


#: OCR backends by name: ``**kwargs -> engine``.
ENGINES: Registry = Registry("OCR engine")
ENGINES.register("ppocr", PpOcrEngine)
ENGINES.register("mmocr", _mmocr_engine)


def engine_ref(engine: Any) -> str:
    """``model@version`` of an OCR engine (its own ``ref``/``model_refs`` when it has one)."""
    for attr in ("ref", "model_ref"):
        if isinstance(getattr(engine, attr, None), str):
            return getattr(engine, attr)
    refs = getattr(engine, "model_refs", None)
    if isinstance(refs, dict | list | tuple) and refs:
        return "+".join(refs.values() if isinstance(refs, dict) else refs)
    name = getattr(engine, "name", type(engine).__name__.lower())
    return ppocr_ref() if name == "ppocr" else f"{name}@1"


def ppocr_ref() -> str:
    """``ppocr@rapidocr-<version>``: the PP-OCR ONNX files ship inside the rapidocr wheel, whose version pins them."""
    from importlib.metadata import version

    return f"ppocr@rapidocr-{version('rapidocr')}"


def create_engine(name: str = "ppocr", **kwargs: Any) -> OcrEngine:
    """Build an OCR engine by backend name: ``ppocr`` (default) or ``mmocr``.

    Args:
        name: The backend (see :data:`ENGINES`).
        **kwargs: Passed to the backend's constructor.

    Raises:
        ConfigError: Unknown backend (an :class:`~livelens.errors.InvalidArgumentError`).
    """
    return ENGINES.get(name)(**kwargs)


def draw_lines(image: np.ndarray, lines: Sequence[TextLine], color: tuple[int, int, int] = (0, 200, 0)) -> np.ndarray:
    """A copy of an RGB image with each line's polygon and text drawn (for evaluation reports)."""
    from PIL import Image, ImageDraw

    from livelens.ocr.fonts import cjk_font

    canvas = image.copy()
    for line in lines:
        pts = np.asarray(line.polygon, dtype=np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [pts], True, color, 2)
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    size = max(12, image.shape[0] // 40)
    font = cjk_font(size)
    for line in lines:
        x0, y0 = line.box[0], max(0.0, line.box[1] - size - 2)
        draw.text((x0, y0), f"{line.text} {line.score:.2f}", fill=(255, 40, 40), font=font)
    return np.asarray(pil)
