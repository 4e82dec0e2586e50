"""Importers: real image sets and the annotation formats users bring, into manifest rows.

Formats: a folder with one subfolder per class; COCO detection JSON; MMOCR text-detection
and text-recognition JSON; Label Studio JSON export; dlib imglab XML (faces). Real sets:
the ones in ../shared/data and the photos bundled in scikit-image and scikit-learn.

Images are embedded as their original file bytes (the id is their sha256), so a manifest
stays valid when the source folder moves. A file that does not decode raises
:class:`ManifestError` naming it, or is skipped and counted with ``on_error="skip"``.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from livelens.errors import LivelensError, ManifestError
from livelens.imageio import decode_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
OnError = Literal["raise", "skip"]


class _Reader:
    """Reads image files into row stubs, applying one error policy and counting skips."""

    def __init__(self, source: str, on_error: OnError = "raise"):
        self.source = source
        self.on_error = on_error
        self.skipped: list[str] = []

    def row(self, path: Path, **fields: Any) -> dict | None:
        try:
            data = path.read_bytes()
            h, w = decode_image(data).shape[:2]
        except (OSError, LivelensError) as exc:
            if self.on_error == "skip":
                self.skipped.append(f"{path}: {exc}")
                return None
            raise ManifestError(f"cannot import {path}: {exc}") from exc
        return {"image_bytes": data, "image_uri": path.resolve().as_uri(), "width": w, "height": h,
                "source": self.source, **fields}

    def inline(self, data_uri: str, name: str, **fields: Any) -> dict | None:
        """A row from a ``data:`` URI (an image carried inside the annotation file)."""
        import base64
        import binascii

        try:
            data = base64.b64decode(data_uri.partition(",")[2], validate=True)
            h, w = decode_image(data).shape[:2]
        except (binascii.Error, ValueError, LivelensError) as exc:
            if self.on_error == "skip":
                self.skipped.append(f"{name}: {exc}")
                return None
            raise ManifestError(f"cannot import {name}: {exc}") from exc
        return {"image_bytes": data, "image_uri": None, "width": w, "height": h, "source": self.source, **fields}


def dedupe(rows: list[dict]) -> list[dict]:
    """Drop rows whose bytes repeat an earlier row (ids are content hashes and must be unique).

    The kept row lists the other names in ``attributes.duplicates`` (e.g. zh_text ships
    ``text_det.jpg`` and ``ch_en_num.jpg`` as the same file).
    """
    from livelens.data.manifest import content_id

    seen: dict[str, dict] = {}
    for r in rows:
        key = content_id(r["image_bytes"])
        if key in seen:
            seen[key].setdefault("attributes", {}).setdefault("duplicates", []).append(r.get("image_uri"))
        else:
            seen[key] = r
    return list(seen.values())


def _load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"annotation file {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc


def _card(name: str, importer: str, rows: list[dict], reader: _Reader, **extra: Any) -> dict:
    return {"name": name, "version": 1, "generator": f"livelens.data.importers.{importer}", "seed": None,
            "skipped": reader.skipped, **extra}


def _rect_poly(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# ---------------------------------------------------------------- user formats
def import_class_folders(root: str | Path, *, on_error: OnError = "raise", taxonomy: Any | None = None) -> list[dict]:
    """A folder with one subfolder per class; each subfolder name must be a taxonomy name.

    Raises:
        ManifestError: A subfolder that is not a taxonomy label, or an unreadable image.
    """
    from livelens.taxonomy import load_taxonomy

    tax = taxonomy or load_taxonomy()
    known = set(tax.labels) | {c for g in tax.groups.values() for c in g.classes}
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root} is not a folder")
    reader = _Reader(f"folder:{root.name}", on_error)
    rows = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name not in known:
            raise ManifestError(f"class folder {sub.name!r} in {root} is not a taxonomy label")
        negative = any(sub.name == g.negative for g in tax.groups.values())
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                r = reader.row(f, labels=[] if negative else [sub.name], attributes={"class": sub.name})
                if r:
                    rows.append(r)
    return dedupe(rows)


def import_coco(ann_file: str | Path, img_dir: str | Path | None = None, *,
                category_map: Mapping[str, str] | None = None, on_error: OnError = "raise") -> list[dict]:
    """COCO detection JSON: ``bbox`` [x, y, w, h] per annotation, category names mapped to labels.

    Args:
        ann_file: The COCO JSON.
        img_dir: Folder of ``file_name``s (default: the JSON's folder).
        category_map: COCO category name → taxonomy label (default: identity).
    """
    coco = _load_json(Path(ann_file))
    img_dir = Path(img_dir) if img_dir else Path(ann_file).parent
    try:
        cats = {c["id"]: c["name"] for c in coco["categories"]}
        anns: dict[int, list] = {}
        for a in coco.get("annotations", []):
            anns.setdefault(a["image_id"], []).append(a)
        images = coco["images"]
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"{ann_file} is not COCO detection JSON: missing {exc}") from exc
    reader = _Reader(f"coco:{Path(ann_file).stem}", on_error)
    rows = []
    for im in images:
        boxes = []
        for a in anns.get(im["id"], []):
            name = cats[a["category_id"]]
            label = (category_map or {}).get(name, name)
            x, y, w, h = (float(v) for v in a["bbox"])
            boxes.append({"label": label, "x0": x, "y0": y, "x1": x + w, "y1": y + h})
        r = reader.row(img_dir / im["file_name"], labels=sorted({b["label"] for b in boxes}), boxes=boxes,
                       attributes={"coco_id": im["id"]})
        if r:
            for b in r["boxes"]:
                b["x1"], b["y1"] = min(b["x1"], r["width"]), min(b["y1"], r["height"])
            rows.append(r)
    return dedupe(rows)


def import_mmocr_textdet(ann_file: str | Path, img_dir: str | Path | None = None, *,
                         on_error: OnError = "raise") -> list[dict]:
    """MMOCR TextDetDataset JSON: polygons per image; ``ignore`` instances get the text ``###``.

    ``###`` is the ICDAR convention for "don't care" regions, which detectors skip in loss and
    evaluation alike.
    """
    ann = _load_json(Path(ann_file))
    img_dir = Path(img_dir) if img_dir else Path(ann_file).parent / "imgs"
    reader = _Reader(f"mmocr_textdet:{Path(ann_file).parent.name}", on_error)
    rows = []
    try:
        for item in ann["data_list"]:
            texts = [{"polygon": [float(v) for v in inst["polygon"]],
                      "text": "###" if inst.get("ignore") else inst.get("text", "")} for inst in item["instances"]]
            r = reader.row(img_dir / Path(item["img_path"]).name, texts=texts, attributes={"img_path": item["img_path"]})
            if r:
                rows.append(r)
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"{ann_file} is not MMOCR TextDetDataset JSON: missing {exc}") from exc
    return dedupe(rows)


def import_mmocr_textrecog(ann_file: str | Path, img_dir: str | Path | None = None, *,
                           on_error: OnError = "raise") -> list[dict]:
    """MMOCR TextRecogDataset JSON: one text per crop (the polygon is the whole crop)."""
    ann = _load_json(Path(ann_file))
    img_dir = Path(img_dir) if img_dir else Path(ann_file).parent / "imgs"
    reader = _Reader(f"mmocr_textrecog:{Path(ann_file).parent.name}", on_error)
    rows = []
    try:
        for item in ann["data_list"]:
            r = reader.row(img_dir / Path(item["img_path"]).name, attributes={"img_path": item["img_path"]})
            if r:
                r["texts"] = [{"polygon": _rect_poly(0, 0, r["width"], r["height"]), "text": item["instances"][0]["text"]}]
                rows.append(r)
    except (KeyError, TypeError, IndexError) as exc:
        raise ManifestError(f"{ann_file} is not MMOCR TextRecogDataset JSON: {exc!r}") from exc
    return dedupe(rows)


def label_studio_result(results: Any) -> tuple[set[str], list[dict], list[dict]]:
    """One Label Studio annotation's ``result`` list as livelens labels, boxes and texts.

    ``rectanglelabels`` become boxes in pixels (Label Studio gives percent of ``original_width`` /
    ``original_height``) and their labels; ``choices`` become labels; ``polygonlabels`` and
    ``textarea`` become texts. Entries of other types, or malformed ones, are skipped.
    """
    boxes: list[dict] = []
    labels: set[str] = set()
    texts: list[dict] = []
    for res in results if isinstance(results, list) else ():
        if not isinstance(res, dict) or not isinstance(res.get("value"), dict):
            continue
        v, kind = res["value"], res.get("type")
        ow, oh = res.get("original_width"), res.get("original_height")
        try:
            if kind == "rectanglelabels" and ow and oh:
                x0, y0 = v["x"] / 100 * ow, v["y"] / 100 * oh
                x1, y1 = x0 + v["width"] / 100 * ow, y0 + v["height"] / 100 * oh
                for lab in v.get("rectanglelabels", []):
                    boxes.append({"label": lab, "x0": x0, "y0": y0, "x1": min(x1, ow), "y1": min(y1, oh)})
                    labels.add(lab)
            elif kind == "choices":
                labels.update(v.get("choices", []))
            elif kind == "polygonlabels" and ow and oh:
                poly = [c for x, y in v["points"] for c in (x / 100 * ow, y / 100 * oh)]
                texts.append({"polygon": poly, "text": ",".join(v.get("polygonlabels", []))})
            elif kind == "textarea":
                texts.extend({"polygon": [], "text": t} for t in v.get("text", []))
        except (KeyError, TypeError, ValueError):
            continue
    return labels, boxes, texts


def import_label_studio(export_file: str | Path, img_root: str | Path | None = None, *,
                        on_error: OnError = "raise") -> list[dict]:
    """Label Studio JSON export: ``rectanglelabels`` → boxes, ``choices`` → labels,
    ``polygonlabels``/``textarea`` → texts. Coordinates in Label Studio are percentages.

    Image paths like ``/data/upload/3/abc-name.jpg`` are resolved to ``img_root/name.jpg``
    (uploads get a hash prefix) or ``img_root/abc-name.jpg``.
    """
    tasks = _load_json(Path(export_file))
    if not isinstance(tasks, list):
        raise ManifestError(f"{export_file} is not a Label Studio JSON export (expected a list of tasks)")
    img_root = Path(img_root) if img_root else Path(export_file).parent
    reader = _Reader(f"label_studio:{Path(export_file).stem}", on_error)
    rows = []
    for task in tasks:
        try:
            uri = task["data"]["image"]
            # The first annotation nobody cancelled (a skipped task has only cancelled ones).
            done = [a for a in task.get("annotations") or () if not a.get("was_cancelled")]
            results = (done or [{}])[0].get("result", [])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"{export_file}: task without data.image or annotations: {exc!r}") from exc
        labels, boxes, texts = label_studio_result(results)
        fields = {"labels": sorted(labels), "boxes": boxes, "texts": texts, "attributes": {"ls_id": task.get("id")}}
        if isinstance(uri, str) and uri.startswith("data:"):
            # A task that carries its image inline (livelens's /v1/label/export writes these).
            r = reader.inline(uri, f"ls-task-{task.get('id')}", **fields)
            if r:
                rows.append(r)
            continue
        # Local-files storage names the file in its query: /data/local-files/?d=queue/images/<id>.png
        parts = urlsplit(uri)
        local = parse_qs(parts.query).get("d")
        name = Path(local[0] if local else parts.path).name
        path = img_root / name
        if not path.exists() and "-" in name:
            path = img_root / name.split("-", 1)[1]
        r = reader.row(path, **fields)
        if r:
            rows.append(r)
    return dedupe(rows)


def import_dlib_xml(xml_file: str | Path, img_dir: str | Path | None = None, *, on_error: OnError = "raise") -> list[dict]:
    """dlib imglab XML (faces): boxes go to ``attributes.faces`` as [x0, y0, x1, y1].

    Faces are not a taxonomy label (they are evidence for others, e.g. minors), so they are
    kept as attributes rather than ``boxes``.
    """
    try:
        tree = ET.parse(xml_file)
    except (OSError, ET.ParseError) as exc:
        raise ManifestError(f"cannot parse {xml_file}: {exc}") from exc
    img_dir = Path(img_dir) if img_dir else Path(xml_file).parent
    reader = _Reader(f"dlib:{Path(xml_file).stem}", on_error)
    rows = []
    for im in tree.getroot().iter("image"):
        faces = []
        for b in im.iter("box"):
            x, y, w, h = (int(b.get(k)) for k in ("left", "top", "width", "height"))
            faces.append([x, y, x + w, y + h])
        r = reader.row(img_dir / im.get("file"), attributes={"faces": faces, "file": im.get("file")})
        if r:
            rows.append(r)
    return dedupe(rows)


# ---------------------------------------------------------------- real sets
#: Ground truth of ../shared/data/zh_text stated in its README.
ZH_TEXT_TRUTH = {
    "text_rec.jpg": {"text": "韩国小馆"},
    "ch_en_num.jpg": {"first_line": "正品促销", "lines": [17, 18]},
    "text_cls.jpg": {"text": "怪我咯", "upside_down": True},
    "empty_black.jpg": {"text": "", "black": True},
}


def import_zh_text(root: str | Path, *, on_error: OnError = "raise") -> list[dict]:
    """The zh_text set: every image, with the README's ground truth where it gives one."""
    reader = _Reader("shared:zh_text", on_error)
    rows = []
    for f in sorted(Path(root).iterdir()):
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        truth = ZH_TEXT_TRUTH.get(f.name, {})
        texts = [{"polygon": [], "text": truth["text"]}] if truth.get("text") else []
        r = reader.row(f, labels=["quality_black"] if truth.get("black") else [], texts=texts,
                       attributes={"file": f.name, **truth})
        if r:
            rows.append(r)
    return dedupe(rows)


def import_bundled() -> list[dict]:
    """scikit-image's and scikit-learn's bundled photos (no labels), as their original file bytes."""
    from livelens.data.render import photo_paths

    rows = []
    for name, path in photo_paths(include_shared=False):
        r = _Reader(name.split(":")[0]).row(path, attributes={"photo": name})
        if r:
            rows.append(r)
    return dedupe(rows)


def import_shared(root: str | Path) -> dict[str, tuple[list[dict], dict]]:
    """Every real set of ../shared/data plus the bundled photos: name → (rows, card)."""
    root = Path(root)
    out: dict[str, tuple[list[dict], dict]] = {}

    def add(name: str, importer: str, rows: list[dict], **extra: Any) -> None:
        out[name] = (rows, _card(name, importer, rows, _Reader(name), origin=extra.pop("origin", ""), **extra))

    add("icdar2015_toy", "import_mmocr_textdet", import_mmocr_textdet(root / "icdar2015_toy" / "textdet_test.json"),
        origin="open-mmlab/mmocr tests/data (ICDAR 2015, research use)")
    add("word_crops", "import_mmocr_textrecog", import_mmocr_textrecog(root / "word_crops" / "labels.json"),
        origin="open-mmlab/mmocr tests/data")
    add("zh_text", "import_zh_text", import_zh_text(root / "zh_text"), origin="RapidAI/RapidOCR tests (Apache-2.0)")
    faces = import_dlib_xml(root / "faces" / "training.xml") + import_dlib_xml(root / "faces" / "testing.xml")
    add("faces", "import_dlib_xml", faces, origin="davisking/dlib examples/faces (Boost)")
    add("bundled", "import_bundled", import_bundled(), origin="scikit-image and scikit-learn wheels")
    return out


def count_texts(rows: Iterable[Mapping[str, Any]], include_ignored: bool = True) -> int:
    """Number of text instances (``###`` ones only if ``include_ignored``)."""
    return sum(1 for r in rows for t in r.get("texts") or [] if include_ignored or t["text"] != "###")
