"""Per-request answer options: evidence mode, minimum confidence, category filter and a pinned model.

Moderation APIs let a caller shape the answer per request (Rekognition's ``MinConfidence``, a
category filter), and callers who compare answers over time want to pin the model version. The
gateway parses these once per request (query string or form fields) and applies the filters to
the fused answer, so every route filters the same way.

The filters change what is *returned*, never how a label is scored: ``decision`` is recomputed
over the returned labels, and ``filters.decision_unfiltered`` keeps the decision over all of them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from livelens.errors import InvalidArgumentError
from livelens.moderation import EVIDENCE_MODES
from livelens.taxonomy import Taxonomy

__all__ = ["EVIDENCE_MODES", "PINNABLE", "AnswerOptions", "apply", "category_of", "parse_options",
           "taxonomy_document"]
#: The model family a request may pin (the other models have one served version each).
PINNABLE = ("safety",)
_PIN = re.compile(rf"(?:{'|'.join(PINNABLE)})(?:@[A-Za-z0-9._-]+)?")
MAX_CATEGORIES = 64


@dataclass(frozen=True)
class AnswerOptions:
    """What one request asked of its answer.

    Attributes:
        evidence: ``none``, ``boxes``, ``heatmap`` or ``polygons``.
        min_confidence: Labels scoring below this are left out of the answer (None: all).
        categories: Level-1 categories whose labels are returned (None: all).
        model: A pinned safety version (``safety@N``), or None for the served one.
    """

    evidence: str = "boxes"
    min_confidence: float | None = None
    categories: frozenset[str] | None = None
    model: str | None = None

    @property
    def filters(self) -> bool:
        return self.min_confidence is not None or self.categories is not None


def _one(opts: Mapping[str, Any], name: str) -> str | None:
    value = opts.get(name)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def parse_options(opts: Mapping[str, Any], tax: Taxonomy) -> AnswerOptions:
    """Validate a request's options (query parameters and form fields).

    Raises:
        InvalidArgumentError: An unknown evidence mode, a confidence outside [0, 1], an unknown
            category, or a model that cannot be pinned; the message lists what is allowed.
    """
    evidence = (_one(opts, "evidence") or "boxes").lower()
    if evidence not in EVIDENCE_MODES:
        raise InvalidArgumentError(f"evidence must be one of {list(EVIDENCE_MODES)}, got {evidence!r}")
    min_conf = None
    raw = _one(opts, "min_confidence")
    if raw is not None:
        try:
            min_conf = float(raw)
        except ValueError:
            raise InvalidArgumentError(f"min_confidence must be a number in [0, 1], got {raw[:40]!r}") from None
        if not math.isfinite(min_conf) or not 0.0 <= min_conf <= 1.0:
            raise InvalidArgumentError(f"min_confidence must be a number in [0, 1], got {raw[:40]!r}")
    cats = None
    raw = _one(opts, "categories")
    if raw is not None:
        given = [c.strip() for c in raw.split(",") if c.strip()]
        if len(given) > MAX_CATEGORIES:
            raise InvalidArgumentError(f"at most {MAX_CATEGORIES} categories")
        unknown = sorted(set(given) - set(tax.groups))
        if unknown or not given:
            raise InvalidArgumentError(f"unknown categories {unknown[:5]}; the categories are {sorted(tax.groups)} "
                                       "(GET /v1/taxonomy)")
        cats = frozenset(given)
    model = _one(opts, "model")
    if model is not None and (len(model) > 100 or not _PIN.fullmatch(model)):
        raise InvalidArgumentError(f"model must be one of {list(PINNABLE)} with an optional @version "
                                   f"(e.g. safety@1), got {model[:60]!r}")
    return AnswerOptions(evidence=evidence, min_confidence=min_conf, categories=cats, model=model)


def category_of(tax: Taxonomy, name: str) -> str | None:
    """The level-1 category of a label (or of a group's negative class); None for a name not in ``tax``."""
    if name in tax.labels:
        return tax.labels[name].group
    group = next((g for g in tax.groups.values() if g.negative == name), None)
    return group.name if group is not None else None


def apply(answer: dict[str, Any], options: AnswerOptions, tax: Taxonomy) -> dict[str, Any]:
    """Filter an answer's labels (and moderation's heatmaps) as the request asked; ``answer`` is updated.

    ``decision`` becomes the worst decision of the labels returned; the unfiltered one is kept
    under ``filters``.
    """
    if not options.filters or "labels" not in answer:
        return answer
    labels = answer["labels"]
    kept = [lab for lab in labels if _keep(lab, options, tax)]
    names = {lab["name"] for lab in kept}
    moderation = answer.get("moderation")
    if isinstance(moderation, dict) and moderation.get("heatmaps"):
        moderation["heatmaps"] = [h for h in moderation["heatmaps"] if h.get("label") in names]
    answer["filters"] = {"min_confidence": options.min_confidence,
                         "categories": sorted(options.categories) if options.categories is not None else None,
                         "labels_dropped": len(labels) - len(kept),
                         "decision_unfiltered": answer.get("decision")}
    answer["labels"] = kept
    answer["decision"] = Taxonomy.worst([lab.get("decision", "pass") for lab in kept])
    return answer


def _keep(label: Mapping[str, Any], options: AnswerOptions, tax: Taxonomy) -> bool:
    if options.min_confidence is not None and float(label.get("score", 0.0)) < options.min_confidence:
        return False
    return options.categories is None or category_of(tax, label["name"]) in options.categories


def taxonomy_document(tax: Taxonomy) -> dict[str, Any]:
    """The taxonomy as ``GET /v1/taxonomy`` lists it: categories (groups) with their labels as a tree."""
    groups = []
    for g in tax.groups.values():
        groups.append({"name": g.name, "kind": g.kind, "action": g.action, "negative": g.negative,
                       "threshold": g.threshold, "review": g.review,
                       "zh": tax.labels[g.name].zh if g.name in tax.labels else "",
                       "labels": [_node(tax, c) for c in tax.children.get(g.name, [])]})
    return {"version": tax.version, "leaves": len(tax.leaves), "categories": groups}


def _node(tax: Taxonomy, name: str) -> dict[str, Any]:
    lab = tax.labels[name]
    node: dict[str, Any] = {"name": name, "zh": lab.zh, "level": lab.level, "threshold": lab.threshold,
                            "review": lab.review}
    kids = tax.children.get(name, [])
    if kids:
        node["labels"] = [_node(tax, k) for k in kids]
    return node
