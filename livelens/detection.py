"""The graph's detection stage: livelens' mmdet detector on the whole frame, and where its boxes go.

The detector (``persons_det@N``, :class:`livelens.ocr.mmocr_adapter.ObjectDetector`, ``make
train-persons``) finds faces and the overlays a stream carries. Each overlay class is routed:

* ``pip`` (a picture-in-picture window) raises ``ads_picture_in_picture`` with its box, and the
  window's content gets a **second-pass classification**: the safety classifier and open_nsfw
  run on the crop (:meth:`livelens.moderation.ModerationEngine.classify_regions`), because an
  inset a quarter of the frame wide is a few dozen pixels at the classifier's input size;
* ``qrcode`` boxes go to the **QR decoder**, zoomed to the code: a payload read there raises
  ``ads_qrcode`` with the payload as evidence, as OCR's whole-frame decoder does;
* ``logo``, ``text_overlay`` and ``hud`` boxes are answered as objects (evidence for a reviewer);
  they raise no label of their own: each class merges labels the taxonomy keeps apart (a logo or
  a watermark; a banner or a contact pill), and OCR and the text-region model decide those (shown
  to that model as extra proposals, they add about a frame of recall for more false alarms:
  ``python -m livelens.detection_eval overlay-route``, docs/persons.md);
* ``face`` boxes are never answered here: faces are personal data, the ``persons`` stage (scope
  ``persons``) answers them.

Detector scores are mapped onto the taxonomy's scale so that a box at its class threshold (chosen
on held-out generated frames, :func:`choose_thresholds`) scores the ``ads`` group's review
threshold and a certain box scores 1 (:func:`label_score`).

``/v1/analyze`` (the gateway, ``serve_apps.detection``) and :class:`livelens.analyzer.LocalAnalyzer`
both run :meth:`DetectionEngine.analyze` and then :func:`second_pass_boxes` /
:func:`attach_second_pass`, so an evaluation of this stage measures the service.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from livelens import fusion
from livelens.errors import ConfigError
from livelens.imageio import EncodedImage, as_rgb
from livelens.taxonomy import Taxonomy, load_taxonomy

#: Detector classes that become labels, and the label.
LABEL_OF = {"pip": "ads_picture_in_picture", "qrcode": "ads_qrcode"}
#: Classes answered as objects (never ``face``: personal data, answered by the persons stage).
ANSWERED = ("pip", "qrcode", "logo", "text_overlay", "hud")
#: QR boxes under the class threshold still worth a decode (``qr_probe``): chosen on make data's
#: frames at seed 12, where 0.1 read every code the threshold's boxes and OCR's whole-frame
#: pass missed, at about one extra decode per frame without a code.
DEFAULT_QR_PROBE = 0.1
#: At most this many probe decodes per frame (each costs about as much as a readable box).
QR_PROBES = 4
#: A class threshold when neither the live config nor the model's card gives one.
DEFAULT_MIN_SCORE = 0.3
#: Frames with a shorter side get no objects; boxes narrower than MIN_BOX px are dropped.
MIN_SIDE, MIN_BOX = 16, 4
#: The window check sees a picture-in-picture box with this margin on each side (a pasted window's
#: evidence is its border against the stream around it) at this square size.
WINDOW_PAD, WINDOW_SIZE = 0.15, 128
#: Evidence ``source`` of labels the second pass raised inside a window.
SECOND_PASS_SOURCE = "pip_window"
#: Label groups the second pass does not report: ads (OCR and the text regions read the whole
#: frame, window included, and decide those), the scene (the inset's is not the stream's) and
#: quality (a window's blur is not the frame's).
SECOND_PASS_SKIP_GROUPS = frozenset(("ads", "scene", "quality"))


def label_score(score: float, threshold: float, review: float) -> float:
    """A detector score on the taxonomy's scale: ``threshold`` ↦ ``review``, 1 ↦ 1, linear between.

    Below the threshold the score is scaled down the same way, so a box under it stays under the
    review threshold (and is not answered: :meth:`DetectionEngine.analyze` drops it).
    """
    score, threshold = float(score), float(threshold)
    if threshold >= 1.0:
        return 0.0
    if score >= threshold:
        return review + (score - threshold) / (1.0 - threshold) * (1.0 - review)
    return review * score / threshold if threshold > 0 else review


def choose_thresholds(scored: Mapping[str, Sequence[tuple[float, bool]]], positives: Mapping[str, int],
                      grid: Sequence[float] = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))) -> dict[str, float]:
    """Per class, the score threshold that maximises min(precision, recall) over frames (then F1).

    Args:
        scored: Per class, each frame's best detection as ``(score, frame has the class)``; a frame
            with no detection of the class is left out (it can only be a miss or a true negative).
        positives: Per class, how many frames have it.
        grid: Thresholds tried.
    """
    out = {}
    for cls, pairs in scored.items():
        if not positives.get(cls):  # nothing to choose on: the default stands
            out[cls] = DEFAULT_MIN_SCORE
            continue
        best, best_t = (-1.0, -1.0), DEFAULT_MIN_SCORE
        for t in grid:
            tp = sum(1 for s, pos in pairs if s >= t and pos)
            fp = sum(1 for s, pos in pairs if s >= t and not pos)
            rec = tp / max(1, positives.get(cls, 0))
            prec = tp / max(1, tp + fp)
            # Ties on the weaker of the two go to the better F1 (fewer false alarms at equal recall).
            key = (min(rec, prec), 2 * rec * prec / max(1e-9, rec + prec))
            if key > best:
                best, best_t = key, float(t)
        out[cls] = best_t
    return out


def decode_qr_box(rgb: np.ndarray, box: Sequence[float], pad: float = 0.15) -> str | None:
    """The payload of the QR code inside ``box`` (padded by ``pad`` of its side), or None.

    The crop is zoomed so the code is about 300 px: OpenCV's decoder needs a few pixels per
    module, which a 40 px corner code in a 720p frame does not have.
    """
    from livelens.ocr.qr import _decode_single, _decode_small

    h, w = rgb.shape[:2]
    bw, bh = box[2] - box[0], box[3] - box[1]
    x0, y0 = max(0, int(box[0] - pad * bw)), max(0, int(box[1] - pad * bh))
    x1, y1 = min(w, int(np.ceil(box[2] + pad * bw))), min(h, int(np.ceil(box[3] + pad * bh)))
    if x1 - x0 < 8 or y1 - y0 < 8:
        return None
    gray = cv2.cvtColor(np.ascontiguousarray(rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    zoom = float(np.clip(300.0 / max(x1 - x0, y1 - y0), 1.0, 8.0))
    det = cv2.QRCodeDetector()
    hits = _decode_single(det, cv2.resize(gray, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_CUBIC)) or \
        _decode_small(det, gray, zoom)
    return hits[0][0] if hits else None


def window_crops(rgb: np.ndarray, boxes: Sequence[Sequence[float]], pad: float = WINDOW_PAD,
                 size: int = WINDOW_SIZE) -> np.ndarray:
    """Each box with ``pad`` of its size around it, clipped to the frame, as an ImageNet-normalised
    ``(N, 3, size, size)`` float32 batch: what :class:`WindowCheck` classifies."""
    from livelens.models.factory import IMAGENET_MEAN, IMAGENET_STD

    h, w = rgb.shape[:2]
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    out = np.zeros((len(boxes), 3, size, size), np.float32)
    for i, b in enumerate(boxes):
        bw, bh = b[2] - b[0], b[3] - b[1]
        x0, y0 = int(max(0, b[0] - pad * bw)), int(max(0, b[1] - pad * bh))
        x1, y1 = int(min(w, b[2] + pad * bw)), int(min(h, b[3] + pad * bh))
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue  # nothing to see: an all-zero crop, which the check scores low
        crop = cv2.resize(rgb[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)
        out[i] = ((crop.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
    return out


class WindowCheck:
    """A second opinion on the detector's picture-in-picture boxes: is this a window pasted on the stream?

    The detector learned windows on backgrounds without people; on the serving distribution its
    false windows are rectangles inside real photos (a shop window, a sign). The check is a
    classifier from the model factory (a frozen ImageNet backbone and one sigmoid head, ``window``)
    over the box and a margin around it; ``python -m livelens.detection_eval window-check`` fits
    it on the detector's own proposals and stores it. Boxes the detector scores at ``floor`` or
    more are shown to it, and it keeps those scoring ``threshold`` or more (both in its card).

    Args:
        model: The classifier (``heads={"window": sigmoid ["pip"]}``).
        ref: Its store ref.
        threshold: The check's score a box needs.
        floor: The detector's score a box needs to be looked at.
    """

    def __init__(self, model: Any, ref: str, threshold: float, floor: float):
        if not (0.0 <= threshold <= 1.0 and 0.0 <= floor <= 1.0):
            raise ConfigError(f"{ref}: window check threshold and floor must be within [0, 1], got {threshold}, {floor}")
        self.model, self.ref = model.eval(), ref
        self.threshold, self.floor = float(threshold), float(floor)

    @classmethod
    def load(cls, ref: str, stores: Sequence[str] | None = None) -> WindowCheck:
        """The stored check ``ref``.

        Raises:
            ModelNotFoundError: No store has ``ref``.
            ConfigError: Its card has no ``threshold``/``floor`` or its head is not ``window``.
        """
        from livelens.models.io import load_from_store
        from livelens.store import open_in_stores

        store, full = open_in_stores(ref, list(stores) if stores else None)
        model = load_from_store(store, full)
        card = store.card(full)
        if "window" not in getattr(model, "heads", {}) or "threshold" not in card or "floor" not in card:
            raise ConfigError(f"{full} is not a window check (a 'window' head, and 'threshold' and 'floor' in its card)")
        return cls(model, full, card["threshold"], card["floor"])

    def features(self, rgb: np.ndarray, boxes: Sequence[Sequence[float]]) -> Any:
        """The pooled backbone features of each box's crop (``(N, F)`` tensor): what the head reads,
        and what :func:`livelens.detection_eval.fit_window_check` fits it on."""
        import torch

        x = torch.from_numpy(window_crops(rgb, boxes))
        with torch.inference_mode():
            m = self.model
            return m.forward_head(m.forward_features(x.to(next(m.parameters()).device)), pre_logits=True)

    def scores(self, rgb: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        """The check's probability that each box is a pasted window (one forward pass for all)."""
        if not len(boxes):
            return np.zeros(0, np.float32)
        import torch

        feats = self.features(rgb, boxes)
        with torch.inference_mode():
            logits = self.model.head(feats)["window"][:, 0]
        return torch.sigmoid(logits).float().cpu().numpy()


class DetectionEngine:
    """The detection stage for one frame at a time.

    Args:
        model: A model-store ref of an mmdet detector (``persons_det``, ``persons_det@2``) or a
            ready detector with ``detect(rgb, min_score) -> [{"class", "box", "score"}]``,
            ``ref``, ``classes`` and ``card``.
        stores: Model stores a ref is searched in, in order (default: the store chain).
        min_scores: Per class, the score a box needs; classes not given take the thresholds
            training chose on held-out frames (the card's ``heldout_thr_<class>``), then
            :data:`DEFAULT_MIN_SCORE`.
        decode_qr: Send ``qrcode`` boxes to the QR decoder.
        qr_probe: With ``decode_qr``, QR boxes scoring this or more but under their class
            threshold are decoded too (at most :data:`QR_PROBES` per frame), and answered only
            when a payload is read: a payload is its own proof, so a doubtful box costs a decode,
            never a false label. Above the threshold: off.
        second_pass: Classify picture-in-picture windows (the caller runs the classifier).
        max_objects: Objects answered per frame, highest score first.
        tax: The taxonomy.
        window_check: Who decides ``pip`` boxes: ``True`` the :class:`WindowCheck` the detector's
            card names (``window_check``; none named, the class threshold), ``False`` the class
            threshold, a ref that stored check, or a ready :class:`WindowCheck`. With a check, a
            ``pip`` entry in ``min_scores`` is not used.

    Raises:
        ModelNotFoundError: ``model``, or the window check, is in no store.
        ConfigError: The stored model has none of the routed classes, or a threshold is out of [0, 1].
    """

    def __init__(self, model: str | Any, stores: Sequence[str] | None = None,
                 min_scores: Mapping[str, float] | None = None, decode_qr: bool = True, second_pass: bool = True,
                 max_objects: int = 50, tax: Taxonomy | None = None, qr_probe: float = DEFAULT_QR_PROBE,
                 window_check: bool | str | WindowCheck = True):
        if isinstance(model, str):
            from livelens.ocr.mmocr_adapter import ObjectDetector

            store = None
            if stores:
                from livelens.store import open_in_stores

                found, _ = open_in_stores(model, list(stores))
                store = found.uri
            model = ObjectDetector(model, store)
            import torch

            if torch.cuda.is_available():  # a replica given a GPU share runs the detector there
                model.model.cuda()
        self.detector = model
        self.tax = tax or load_taxonomy()
        if not set(ANSWERED) & set(self.detector.classes):
            raise ConfigError(f"{self.detector.ref} detects {list(self.detector.classes)}, none of {list(ANSWERED)}")
        metrics = (getattr(self.detector, "card", None) or {}).get("metrics") or {}
        self.min_scores = {c: float((min_scores or {}).get(c, metrics.get(f"heldout_thr_{c}", DEFAULT_MIN_SCORE)))
                           for c in ANSWERED}
        if not all(0.0 <= v <= 1.0 for v in self.min_scores.values()):
            raise ConfigError(f"detection thresholds must be within [0, 1], got {self.min_scores}")
        if not 0.0 <= qr_probe <= 1.0:
            raise ConfigError(f"qr_probe must be within [0, 1], got {qr_probe}")
        self.decode_qr, self.second_pass, self.max_objects = decode_qr, second_pass, max_objects
        self.qr_probe = qr_probe
        if window_check is True:
            window_check = (getattr(self.detector, "card", None) or {}).get("window_check") or False
        if isinstance(window_check, str):
            window_check = WindowCheck.load(window_check, stores)
            import torch

            if torch.cuda.is_available():  # as the detector: a replica given a GPU share runs it there
                window_check.model.cuda()
        self.window_check: WindowCheck | None = window_check or None

    @property
    def ref(self) -> str:
        return self.detector.ref

    def models(self) -> list[str]:
        return ([self.ref] + ([self.window_check.ref] if self.window_check else [])
                + ([fusion.QR_MODEL] if self.decode_qr else []))

    def pip_floor(self) -> float:
        """The detector score a ``pip`` box needs before anything else decides."""
        return self.window_check.floor if self.window_check else self.min_scores["pip"]

    def detect(self, rgb: np.ndarray) -> list[dict[str, Any]]:
        """Objects at or above their class threshold, boxes clipped to ``rgb``'s pixels, best first.

        QR boxes under their threshold that ``qr_probe`` lets through are marked ``"probe"``:
        :meth:`analyze` answers them only when it reads a payload. With a window check, ``pip``
        boxes from its floor up are kept when it says so, with its score as ``"check"``.
        """
        h, w = rgb.shape[:2]
        if min(h, w) < MIN_SIDE:  # no overlay fits; a detector would only invent one
            return []
        needs = {**self.min_scores, "pip": self.pip_floor()}
        floor = min(needs.values())
        probe = self.qr_probe if self.decode_qr and self.qr_probe < self.min_scores["qrcode"] else None
        if probe is not None:
            floor = min(floor, probe)
        objs, probes = [], 0
        for o in sorted(self.detector.detect(rgb, min_score=max(0.01, floor)), key=lambda o: -o["score"]):
            if o["class"] not in needs:
                continue
            if o["score"] < needs[o["class"]]:
                if o["class"] != "qrcode" or probe is None or o["score"] < probe or probes >= QR_PROBES:
                    continue
                probes += 1
                o = {**o, "probe": True}  # answered only if decoded (analyze)
            box = [min(max(float(v), 0.0), lim) for v, lim in zip(o["box"], (w, h, w, h), strict=True)]
            if box[2] - box[0] >= MIN_BOX and box[3] - box[1] >= MIN_BOX:
                objs.append({**o, "box": box})
        if self.window_check is not None:
            windows = [o for o in objs if o["class"] == "pip"]
            checks = self.window_check.scores(rgb, [o["box"] for o in windows])
            for o, c in zip(windows, checks, strict=True):
                o["check"] = float(c)
            objs = [o for o in objs if o["class"] != "pip" or o["check"] >= self.window_check.threshold]
        return sorted(objs, key=lambda o: -o["score"])[: self.max_objects]

    def analyze(self, image: np.ndarray | EncodedImage) -> dict[str, Any]:
        """The ``detection`` answer of one frame, before the second pass.

        Returns:
            ``{"objects": [{"class", "box", "score"}], "labels", "models"}``; a ``qrcode`` object
            the decoder read has its ``value``.
        """
        rgb = as_rgb(image)
        objects = []
        for o in self.detect(rgb):
            item = {"class": o["class"], "box": [round(float(v), 1) for v in o["box"]], "score": round(float(o["score"]), 4)}
            if "check" in o:
                item["check"] = round(o["check"], 4)
            if o["class"] == "qrcode" and self.decode_qr:
                value = decode_qr_box(rgb, item["box"])
                if value is not None:
                    item["value"] = value
                elif o.get("probe"):
                    continue
            objects.append(item)
        return {"objects": objects, "labels": self.labels(objects), "models": self.models()}

    def labels(self, objects: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """``ads_picture_in_picture`` from windows, ``ads_qrcode`` from decoded codes; each box as evidence."""
        labels = []
        for o in objects:
            name = LABEL_OF.get(o["class"])
            if name is None or name not in self.tax.labels or (o["class"] == "qrcode" and "value" not in o):
                continue
            ev = {"kind": "box", "box": list(o["box"]), "source": "detector", "score": o["score"]}
            if o["class"] == "qrcode":
                # A decoded payload is as sure as OCR's decoder; the detector only said where to look.
                ev["value"] = o["value"]
                labels.append(fusion.make_label(self.tax, name, 0.9, fusion.QR_MODEL, evidence=[ev]))
            elif "check" in o and self.window_check is not None:
                # The check decided this window: its score, on its threshold, is the label's.
                ev["check"] = o["check"]
                score = label_score(o["check"], self.window_check.threshold, self.tax.raise_threshold(name))
                labels.append(fusion.make_label(self.tax, name, score, self.window_check.ref, evidence=[ev]))
            else:
                score = label_score(o["score"], self.min_scores[o["class"]], self.tax.raise_threshold(name))
                labels.append(fusion.make_label(self.tax, name, score, self.ref, evidence=[ev]))
        return fusion.merge_labels(labels)


def idle_answer(reason: str) -> dict[str, Any]:
    """The ``detection`` answer when the stage runs no model: no detector stored yet, or switched off."""
    return {"objects": [], "labels": [], "models": [], "missing": reason}


def reads_qr(result: Mapping[str, Any]) -> bool:
    """Whether a ``detection`` answer came from a detector that decoded its QR boxes.

    Then OCR's tiled QR pass is not needed for that frame: the detector found where the small
    codes are and the box decoder read them (``make eval-detection`` compares the two).
    """
    return not result.get("missing") and fusion.QR_MODEL in result.get("models", ())


#: Where the detection branch of a fan-out hands back OCR's deferred tiled QR pass (gone after
#: :func:`complete_qr`).
QR_TILES = "_ocr_qr_tiles"


def complete_qr(tax: Taxonomy, parts: dict[str, dict[str, Any]]) -> None:
    """Finish OCR's deferred tiled QR pass in a fan-out's answers, before fusion (in place).

    Either the detector read the QR boxes (the OCR answer says ``"qr_tiles": "detection"``) or
    the pass ran after all, and what it found joins OCR's entities and labels.
    """
    from livelens.ocr.pipeline import add_entities

    ocr, det = parts.get("ocr"), parts.get("detect")
    tiles = det.pop(QR_TILES, None) if det is not None else None
    if ocr is None or ocr.get("qr_tiles") != "deferred":
        return
    if tiles is not None:
        add_entities(tax, ocr, tiles)
    elif det is not None and reads_qr(det):
        ocr["qr_tiles"] = "detection"


def second_pass_boxes(result: Mapping[str, Any]) -> list[list[float]]:
    """The picture-in-picture windows of a ``detection`` answer that get the second pass."""
    return [list(o["box"]) for o in result.get("objects", []) if o["class"] == "pip"]


def attach_second_pass(tax: Taxonomy, result: dict[str, Any], per_box: Sequence[Sequence[dict[str, Any]]]) -> None:
    """Add the labels the classifier raised inside each window to the ``detection`` answer (in place).

    Args:
        tax: The taxonomy.
        result: A ``detection`` answer.
        per_box: Per :func:`second_pass_boxes` box, the labels of its crop
            (:meth:`livelens.moderation.ModerationEngine.classify_regions`).
    """
    boxes = second_pass_boxes(result)
    found = []
    for box, labels in zip(boxes, per_box, strict=True):
        for lab in labels:
            if lab.get("group") in SECOND_PASS_SKIP_GROUPS or lab["name"] == "ads_picture_in_picture":
                continue
            ev = {"kind": "box", "box": list(box), "source": SECOND_PASS_SOURCE}
            found.append({**lab, "evidence": [ev]})
    if found:
        result["labels"] = fusion.merge_labels([*result.get("labels", []), *fusion.redecide(tax, found)])
    result["second_pass"] = {"windows": len(boxes), "labels": sorted({lab["name"] for lab in found})}
