"""Label Studio, the tool labelling teams already use: tasks out with livelens pre-annotations, labels back.

:func:`export_tasks` writes a folder a Label Studio project imports as it is:

* ``images/<frame id>.<ext>``: each frame's original bytes (not re-encoded, so a frame keeps its
  content id when it comes back);
* ``tasks.json``: one task per frame, ``data.image`` pointing at the image through Label Studio's
  local-files storage (``/data/local-files/?d=<prefix>/images/<file>``), and one *prediction* per
  task made by the serving code (:class:`livelens.analyzer.LocalAnalyzer` or any object with its
  ``analyze``): the labels the answer raised as ``choices`` and their box evidence as
  ``rectanglelabels`` in percent of the image, each with its score, the prediction with the
  answer's ``model_version`` (the served ``model@version`` refs);
* ``label_config.xml``: the labelling interface (multi-choice labels and boxes over the taxonomy).

What comes back is Label Studio's JSON export, read by
:func:`livelens.data.importers.import_label_studio` (boxes included) into a manifest.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from livelens import fusion
from livelens.errors import ConfigError

#: The control names of :func:`label_config`; a prediction's results refer to them.
CHOICES, BOXES, IMAGE = "labels", "boxes", "image"


def label_config(labels: Iterable[str]) -> str:
    """Label Studio's labelling interface: an image, its labels (several per frame) and boxes."""
    names = sorted(set(labels))
    if not names:
        raise ConfigError("a Label Studio project needs at least one label")
    choices = "\n".join(f"    <Choice value={quoteattr(n)}/>" for n in names)
    rects = "\n".join(f"    <Label value={quoteattr(n)}/>" for n in names)
    return (f'<View>\n  <Image name="{IMAGE}" value="$image"/>\n'
            f'  <Choices name="{CHOICES}" toName="{IMAGE}" choice="multiple" showInLine="true">\n{choices}\n  </Choices>\n'
            f'  <RectangleLabels name="{BOXES}" toName="{IMAGE}">\n{rects}\n  </RectangleLabels>\n</View>\n')


def prediction(answer: Mapping[str, Any], width: int, height: int) -> dict[str, Any]:
    """One served answer as a Label Studio prediction.

    Args:
        answer: The ``/v1/analyze`` body (its ``labels`` with decisions, scores and box evidence).
        width: The image's width in pixels (boxes go to percent of it).
        height: The image's height in pixels.

    Returns:
        ``{"model_version", "score", "result"}``: the raised labels (block or review) as one
        ``choices`` result, each box of their evidence as a ``rectanglelabels`` result with its
        score; ``score`` is the lowest score among the raised labels (how sure the weakest
        pre-annotation is), or 1 minus the highest score of the rest when nothing was raised.
    """
    if width <= 0 or height <= 0:
        raise ConfigError(f"image size {width}x{height}: want positive pixels")
    raised = fusion.raised(answer.get("labels"))
    result: list[dict[str, Any]] = []
    if raised:
        result.append({"id": uuid.uuid4().hex[:10], "type": "choices", "from_name": CHOICES, "to_name": IMAGE,
                       "value": {"choices": sorted({lab["name"] for lab in raised})}})
    for lab in raised:
        for ev in lab.get("evidence") or ():
            box = ev.get("box") if isinstance(ev, Mapping) else None
            if not box or len(box) != 4:
                continue
            x0, y0 = max(0.0, float(box[0])), max(0.0, float(box[1]))
            x1, y1 = min(float(width), float(box[2])), min(float(height), float(box[3]))
            if x1 <= x0 or y1 <= y0:
                continue
            result.append({"id": uuid.uuid4().hex[:10], "type": "rectanglelabels", "from_name": BOXES,
                           "to_name": IMAGE, "original_width": width, "original_height": height,
                           "image_rotation": 0, "score": round(float(ev.get("score", lab.get("score", 0.0))), 4),
                           "value": {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
                                     "height": 100 * (y1 - y0) / height, "rotation": 0,
                                     "rectanglelabels": [lab["name"]]}})
    if raised:
        score = min(float(lab.get("score", 0.0)) for lab in raised)
    else:
        score = 1.0 - max((float(lab.get("score", 0.0)) for lab in answer.get("labels", ())), default=0.0)
    return {"model_version": ",".join(answer.get("models", ())) or "livelens", "score": round(score, 4),
            "result": result}


def _ext(data: bytes) -> str:
    """The file extension of image bytes, from the same header check the service runs on uploads."""
    from livelens.imageio import probe_image

    fmt = probe_image(data).format.lower()
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(fmt, f".{fmt}")


def export_tasks(manifest: str | Path, out: str | Path, analyzer: Any, *, labels: Sequence[str] | None = None,
                 storage_prefix: str = "", limit: int | None = None) -> dict[str, Any]:
    """Write a manifest's frames as Label Studio tasks with livelens pre-annotations.

    Args:
        manifest: The frames (e.g. a labelling queue).
        out: The folder to write (``images/``, ``tasks.json``, ``label_config.xml``).
        analyzer: What answers each frame: the serving code (:class:`livelens.analyzer.LocalAnalyzer`).
        labels: The project's labels (default: the analyzer's taxonomy).
        storage_prefix: The folder's path under Label Studio's ``LOCAL_FILES_DOCUMENT_ROOT``.
        limit: Export at most this many frames.

    Returns:
        ``{"tasks", "out", "tasks_file", "label_config", "raised"}`` (frames with a pre-annotation).

    Raises:
        ConfigError: An empty manifest.
    """
    from livelens.data.manifest import read_manifest, row_image_bytes
    from livelens.imageio import decode_image

    table = read_manifest(manifest, columns=["id", "image_bytes", "image_uri"])
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise ConfigError(f"{manifest}: no frames to export")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    tasks, raised = [], 0
    for row in table.to_pylist():
        data = row_image_bytes(row["image_bytes"], row["image_uri"])
        name = f"{row['id']}{_ext(data)}"
        (out / "images" / name).write_bytes(data)
        rgb = decode_image(data)
        pred = prediction(analyzer.analyze(rgb), rgb.shape[1], rgb.shape[0])
        raised += bool(pred["result"])
        path = "/".join(p for p in (storage_prefix.strip("/"), "images", name) if p)
        tasks.append({"data": {IMAGE: f"/data/local-files/?d={path}", "livelens_id": row["id"]},
                      "predictions": [pred]})
    tmp = out / f".tasks.{uuid.uuid4().hex}.json"
    tmp.write_text(json.dumps(tasks, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, out / "tasks.json")
    vocab = labels if labels is not None else analyzer.tax.labels
    (out / "label_config.xml").write_text(label_config(vocab), encoding="utf-8")
    return {"tasks": len(tasks), "out": str(out), "tasks_file": str(out / "tasks.json"),
            "label_config": str(out / "label_config.xml"), "raised": raised}
