"""How each source's findings become the labels of an answer, and how the sources are merged.

One module for the rules, called by the serving deployments (``serve_apps``), the gateway and
every evaluation (:mod:`livelens.evaluation`), so a figure measured offline is a figure of the
service. A label is a plain dict in the API's shape::

    {"name", "parent", "level", "score", "threshold", "decision", "group", "model", "evidence": [...]}

The sources and what they raise:

* the safety classifier (``safety@N``): every head's classes, scored by its probabilities;
* open_nsfw (``open_nsfw@1.1``): the ``porn`` category;
* OCR entities (``ppocr@…``/``mmocr…``) and QR codes (``qr_decoder@1``): the contact ads labels;
* text regions (``ads_regions@N``): watermarks, logos, banners;
* quality measures (``quality_classical@1``): the ``quality`` group's flags;
* the overlay detector (``persons_det@N``, :mod:`livelens.detection`): picture-in-picture windows,
  QR codes it found and the decoder read, and what the classifier saw inside each window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from livelens.ocr.entities import AUTHORITATIVE_LABELS as OCR_AUTHORITATIVE
from livelens.taxonomy import Taxonomy

QR_MODEL = "qr_decoder@1"
QUALITY_MODEL = "quality_classical@1"
OPEN_NSFW_REF = "open_nsfw@1.1"
_RANK = {"pass": 0, "review": 1, "block": 2}

#: Source name of a label, by the prefix of the model that raised it (evaluations leave each out in turn).
SOURCE_PREFIXES = (("safety", "classifier"), ("open_nsfw", "open_nsfw"), ("ppocr", "entities"),
                   ("mmocr", "entities"), ("ocr_", "entities"), (QR_MODEL.split("@")[0], "qr"),
                   ("ads_regions", "regions"), ("quality", "quality"), ("persons_det", "detector"),
                   ("window_check", "detector"))


def source_of(label: Mapping[str, Any]) -> str:
    """The source (``classifier``, ``entities``, ``regions``…) of a label, from its ``model``."""
    model = str(label.get("model", ""))
    for prefix, source in SOURCE_PREFIXES:
        if model.startswith(prefix):
            return source
    return model.split("@")[0] or "unknown"


def make_label(tax: Taxonomy, name: str, score: float, model: str, *, group: str | None = None,
               evidence: Iterable[dict] = ()) -> dict[str, Any]:
    """One label in the API's shape, decided by ``tax``."""
    lab = tax.describe(name, float(score))
    group = group or (tax.labels[name].group if name in tax.labels else lab["parent"])
    return {**lab, "group": group, "model": model, "evidence": list(evidence)}


def classifier_labels(tax: Taxonomy, classes: Mapping[str, Sequence[str]], probs: Mapping[str, np.ndarray],
                      model: str, min_score: float) -> list[dict[str, Any]]:
    """Labels of one frame from a taxonomy classifier's per-head probabilities.

    Negative classes (``ads_none``) are no label; classes scoring below ``min_score`` are left out
    of the answer (they could not be decided anything but ``pass``). Each label keeps where it came
    from (``_head``, ``_index``) for the evidence step, which removes them.

    Args:
        tax: The taxonomy deciding the labels.
        classes: Per head, its classes in output order (the negative first).
        probs: Per head, the frame's probabilities (K,).
        model: ``name@version`` of the classifier.
        min_score: Smallest score reported.
    """
    labels = []
    for head, p in probs.items():
        for idx, name in enumerate(classes.get(head, ())):
            if idx >= len(p) or tax.is_negative(name) or name not in tax.labels or float(p[idx]) < min_score:
                continue
            labels.append({**make_label(tax, name, float(p[idx]), model, group=head), "_head": head, "_index": idx})
    return sorted(labels, key=lambda x: -x["score"])


def nsfw_labels(tax: Taxonomy, score: float | None, min_score: float, model: str = OPEN_NSFW_REF) -> list[dict]:
    """open_nsfw's score as the ``porn`` category label (nothing below ``min_score``)."""
    if score is None or score < min_score:
        return []
    return [make_label(tax, "porn", score, model, group="porn")]


def grouped_labels(tax: Taxonomy, items: Iterable[Any], model_of: Callable[[Any], str],
                   evidence_of: Callable[[Any], dict]) -> list[dict[str, Any]]:
    """One label per item label (entities or text regions): the best score, every item as evidence.

    The label's model is the items' one model, or the first non-QR one when they mix (a phone
    read by OCR and a QR code name two models; OCR's stands for the label).
    """
    by_label: dict[str, list] = {}
    for it in items:
        name = it["label"] if isinstance(it, Mapping) else it.label
        if name and name in tax.labels:
            by_label.setdefault(name, []).append(it)
    labels = []
    for name, its in by_label.items():
        score = max(float(it["score"] if isinstance(it, Mapping) else it.score) for it in its)
        models = [model_of(it) for it in its]
        model = next((m for m in models if m != QR_MODEL), models[0])
        labels.append(make_label(tax, name, score, model, evidence=[evidence_of(it) for it in its]))
    return labels


def entity_labels(tax: Taxonomy, entities: Iterable[Mapping[str, Any]], ocr_model: str) -> list[dict[str, Any]]:
    """Contact ads labels from OCR entities and QR codes, every entity's box as evidence."""
    return grouped_labels(tax, entities, lambda e: QR_MODEL if e["kind"] == "qrcode" else ocr_model,
                          lambda e: {"kind": "box", "box": list(e["box"]), "source": e["kind"], "value": e["value"]})


def region_labels(tax: Taxonomy, hits: Iterable[Any], model: str) -> list[dict[str, Any]]:
    """Overlay ads labels from text-region hits (:class:`~livelens.evidence.regions.RegionHit`)."""
    return grouped_labels(tax, hits, lambda h: model, lambda h: {
        "kind": "box", "box": list(h.box), "source": "text_region", "score": round(float(h.score), 4)})


#: Quality labels the learned flag model decides when it is served, by its flag name.
LEARNED_QUALITY = {"quality_dark": "dark", "quality_bright": "bright", "quality_blur": "blur",
                   "quality_occluded": "occlusion"}


def quality_labels(tax: Taxonomy, assessed: Mapping[str, Any], model: str = QUALITY_MODEL) -> list[dict[str, Any]]:
    """The ``quality`` group's labels from :func:`livelens.quality.assess` (flags score 1.0).

    A flag the learned model decided names that model (``quality_flags@N``) and carries its
    probability as evidence; the others name the classical measures.
    """
    learned = assessed.get("flags_model") or {}
    labels = []
    for name in assessed.get("labels", []):
        box = (assessed.get("occlusion") or {}).get("box") if name == "quality_occluded" else None
        ev = [{"kind": "box", "box": box, "source": "quality"}] if box else []
        by = model
        if learned and name in LEARNED_QUALITY:
            by = learned["model"]
            ev.append({"kind": "score", "p": learned["p"][LEARNED_QUALITY[name]], "source": "quality_flags"})
        labels.append(make_label(tax, name, 1.0, by, evidence=ev))
    return labels


#: The overlay labels the text-region model decides once it has looked at every OCR text box.
REGION_AUTHORITATIVE = frozenset(("ads_watermark", "ads_logo", "ads_text_banner"))


def regions_ran(ocr_result: Mapping[str, Any] | None) -> bool:
    """Whether the OCR capability's answer came with the text-region model (``ads_regions@N``)."""
    return any(source_of({"model": m}) == "regions" for m in (ocr_result or {}).get("models", []))


#: The labels the detection stage decides once its detector has looked at the frame.
DETECTOR_AUTHORITATIVE = frozenset(("ads_picture_in_picture",))


def detector_ran(result: Mapping[str, Any] | None) -> bool:
    """Whether the ``detect`` capability's answer came from a detector (not an idle stage)."""
    return bool(result) and bool(result.get("models")) and not result.get("missing")


def overrule_undetected(labels: list[dict], detected: list[dict]) -> list[dict]:
    """Demote to ``pass`` the classifier's :data:`DETECTOR_AUTHORITATIVE` labels the detector did not raise.

    On frames of the serving distribution the classifier's window guesses added false alarms
    (precision 0.72 alone) and almost no recall the detector lacked (docs/persons.md).
    """
    seen = {lab["name"] for lab in detected if lab.get("decision") != "pass"}
    return [{**lab, "decision": "pass", "overruled": "the detector looked at the frame and found no such window"}
            if lab["name"] in DETECTOR_AUTHORITATIVE and lab["name"] not in seen and lab.get("decision") != "pass"
            else lab for lab in labels]


def overrule_unread(labels: list[dict], ocr_labels: list[dict], regions: bool = False) -> list[dict]:
    """Demote to ``pass`` the classifier labels that a reading source decides and did not raise.

    When OCR ran on the frame, its reading decides :data:`OCR_AUTHORITATIVE`: a classifier's
    "phone number" where OCR read no phone number is a false positive (the classifier alone had
    ads_phone at recall 0 and precision 0 on held-out frames). When the text-region model ran as
    well (``regions``), it decides :data:`REGION_AUTHORITATIVE` the same way: on held-out frames
    the fused watermark, logo and banner figures were the regions' own, and the classifier's
    extra guesses only added false positives (on real photos too: a dog photo's "watermark").
    The score stays, so a reviewer can still see what the classifier thought; ``overruled`` says why.
    """
    read = {lab["name"] for lab in ocr_labels}
    out = []
    for lab in labels:
        if lab["name"] not in read and lab.get("decision") != "pass":
            if lab["name"] in OCR_AUTHORITATIVE:
                lab = {**lab, "decision": "pass", "overruled": "OCR read the frame and found no such entity"}
            elif regions and lab["name"] in REGION_AUTHORITATIVE:
                lab = {**lab, "decision": "pass",
                       "overruled": "the text-region model saw every text box and found no such overlay"}
        out.append(lab)
    return out


def merge_labels(labels: Iterable[dict]) -> list[dict]:
    """One entry per label name: the highest score wins, evidence is pooled."""
    best: dict[str, dict] = {}
    for lab in labels:
        cur = best.get(lab["name"])
        if cur is None:
            best[lab["name"]] = {**lab, "evidence": list(lab.get("evidence", []))}
            continue
        pooled = cur["evidence"] + list(lab.get("evidence", []))
        if lab["score"] > cur["score"]:
            cur.update(lab)
        cur["evidence"] = pooled
    return sorted(best.values(), key=lambda x: -x["score"])


def redecide(tax: Taxonomy, labels: Iterable[dict]) -> list[dict]:
    """Every label's threshold and decision from its score under ``tax`` (live threshold overrides).

    A label overruled by OCR stays ``pass``.
    """
    out = []
    for lab in labels:
        if lab["name"] in tax.labels and not lab.get("overruled"):
            d = tax.describe(lab["name"], lab["score"])
            lab = {**lab, "threshold": d["threshold"], "decision": d["decision"]}
        out.append(lab)
    return out


def worst_decision(labels: Iterable[dict]) -> str:
    """The most severe decision among labels (pass when none)."""
    return max((lab["decision"] for lab in labels), key=_RANK.__getitem__, default="pass")


def raised(labels: Iterable[Any]) -> list[dict]:
    """The labels a served answer raised: its decision is block or review (what a labeller sees).

    Reads an answer as returned (no taxonomy needed), skipping entries that are not labels, so it
    serves both live answers and ones read back from the capture store.
    """
    return [lab for lab in labels or () if isinstance(lab, Mapping) and lab.get("name")
            and lab.get("decision") in ("block", "review")]


def fuse(tax: Taxonomy, by_cap: Mapping[str, list[dict]], regions: bool = False,
         detected: bool = False) -> tuple[list[dict], str]:
    """The answer's labels and decision from each capability's labels (``moderate``, ``ocr``, ``quality``…).

    OCR (and, with ``regions``, the text-region model) overrules the classifier's labels it
    decides when both ran, and so does the detector (``detected``) for picture-in-picture;
    duplicates merge (best score, pooled evidence); each label is decided under ``tax``.
    """
    caps = dict(by_cap)
    if "ocr" in caps and "moderate" in caps:
        caps["moderate"] = overrule_unread(caps["moderate"], caps["ocr"], regions)
    if detected and "moderate" in caps:
        caps["moderate"] = overrule_undetected(caps["moderate"], caps.get("detect", []))
    labels = redecide(tax, merge_labels(lab for labs in caps.values() for lab in labs))
    return labels, worst_decision(labels)


#: The answer's section of each capability whose name differs from it.
SECTIONS = {"moderate": "moderation", "detect": "detection"}


def assemble(tax: Taxonomy, results: Mapping[str, dict[str, Any]], image_size: tuple[int, int]) -> dict[str, Any]:
    """The body of an analyse answer from each capability's result (what the gateway returns).

    Args:
        tax: The taxonomy (with the gateway's live threshold overrides).
        results: Per capability (``moderate``, ``ocr``, ``quality``), its deployment's answer
            without timings; each has ``labels`` and ``models``.
        image_size: ``(width, height)``.
    """
    out: dict[str, Any] = {"models": []}
    by_cap: dict[str, list[dict]] = {}
    for cap, res in results.items():
        res = dict(res)
        out["models"] += res.pop("models", [])
        by_cap[cap] = res.pop("labels", [])
        out[SECTIONS.get(cap, cap)] = res
    out["labels"], out["decision"] = fuse(tax, by_cap, regions_ran(results.get("ocr")),
                                          detector_ran(results.get("detect")))
    out["models"] = sorted(set(out["models"]))
    out["image"] = {"width": int(image_size[0]), "height": int(image_size[1])}
    return out


def fires(tax: Taxonomy, label: Mapping[str, Any]) -> bool:
    """Whether the answer acts on a label: what every precision/recall figure counts as predicted.

    Acting means reaching :meth:`Taxonomy.raise_threshold` (review for block/review groups, the
    tag threshold for informational groups); a label OCR overruled does not act.
    """
    name = label["name"]
    if name not in tax.labels or label.get("overruled"):
        return False
    return float(label["score"]) >= tax.raise_threshold(name)


def fired(tax: Taxonomy, labels: Iterable[Mapping[str, Any]]) -> set[str]:
    """The names of the labels that act (see :func:`fires`)."""
    return {lab["name"] for lab in labels if fires(tax, lab)}
