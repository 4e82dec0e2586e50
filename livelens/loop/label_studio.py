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

The gateway also speaks Label Studio's *ML backend* protocol under ``/v1/label-studio`` (connect a
project's Model settings to ``http://<gateway>/v1/label-studio`` with basic auth, any user name
and an API key with the ``label`` scope as the password):

* ``GET /health``: ``{"status": "UP"}``;
* ``POST /setup``: the served ``model@version`` refs as ``model_version``; the Label Studio
  server's address and token it sends are kept (in memory, by the labelling deployment) to read
  that project's uploaded images;
* ``POST /predict``: one prediction per task (:func:`prediction`) from the same fan-out and fusion
  as ``/v1/analyze``; a task's image is read by :func:`task_image` (the label store's frame for a
  ``livelens_id``, else a ``data:`` URI, else an allowlisted URL, else a path on the Label Studio
  server, fetched with its token when its host is on the gateway's ``url_allowlist``);
* ``POST /webhook`` (answered 201): an annotation created, updated or deleted in Label Studio
  becomes a commit to the label store (:func:`annotation_change`), made by the key's id.
"""

from __future__ import annotations

import base64
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from livelens import fusion
from livelens.errors import ConfigError, InvalidArgumentError
from livelens.loop.labels import FRAME_ID_PATTERN

#: The control names of :func:`label_config`; a prediction's results refer to them.
CHOICES, BOXES, IMAGE = "labels", "boxes", "image"

_FRAME_ID = re.compile(FRAME_ID_PATTERN)


#: The webhook actions the ML backend protocol acts on; any other is answered "Unknown event".
TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")


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


def config_labels(config: Any) -> frozenset[str] | None:
    """The labels a Label Studio labelling interface offers (its ``Choice`` and ``Label`` values).

    None when ``config`` is not a readable interface (the prediction then keeps every label).
    """
    import xml.etree.ElementTree as ET

    if not isinstance(config, str) or not config.strip() or len(config) > 1024 * 1024:
        return None
    try:
        root = ET.fromstring(config)
    except ET.ParseError:
        return None
    return frozenset(el.get("value") for el in root.iter() if el.tag in ("Choice", "Label") and el.get("value"))


def prediction(answer: Mapping[str, Any], width: int, height: int,
               labels: Iterable[str] | None = None) -> dict[str, Any]:
    """One served answer as a Label Studio prediction.

    Args:
        answer: The ``/v1/analyze`` body (its ``labels`` with decisions, scores and box evidence).
        width: The image's width in pixels (boxes go to percent of it).
        height: The image's height in pixels.
        labels: The labels the project's interface offers (:func:`config_labels`); a raised label
            it lacks is left out, since Label Studio cannot show a choice its interface has not.

    Returns:
        ``{"model_version", "score", "result"}``: the raised labels (block or review) as one
        ``choices`` result, each box of their evidence as a ``rectanglelabels`` result with its
        score; ``score`` is the lowest score among the raised labels (how sure the weakest
        pre-annotation is), or 1 minus the highest score of the rest when nothing was raised.
    """
    if width <= 0 or height <= 0:
        raise ConfigError(f"image size {width}x{height}: want positive pixels")
    raised = fusion.raised(answer.get("labels"))
    if labels is not None:
        offered = set(labels)
        raised = [lab for lab in raised if lab["name"] in offered]
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


def make_task(frame_id: str, image: str, pred: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One Label Studio task: the image (a URL, a local-files path or a ``data:`` URI), the frame
    id the labels come back under, and the livelens pre-annotation when there is one."""
    task: dict[str, Any] = {"data": {IMAGE: image, "livelens_id": frame_id}}
    if pred is not None:
        task["predictions"] = [dict(pred)]
    return task


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
        tasks.append(make_task(row["id"], f"/data/local-files/?d={path}", pred))
    tmp = out / f".tasks.{uuid.uuid4().hex}.json"
    tmp.write_text(json.dumps(tasks, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, out / "tasks.json")
    vocab = labels if labels is not None else analyzer.tax.labels
    (out / "label_config.xml").write_text(label_config(vocab), encoding="utf-8")
    return {"tasks": len(tasks), "out": str(out), "tasks_file": str(out / "tasks.json"),
            "label_config": str(out / "label_config.xml"), "raised": raised}


@dataclass(frozen=True)
class TaskImage:
    """Where one task's image is: a frame of the label store, inline bytes, a URL to fetch, or a
    path on the Label Studio server (an upload or a storage link) read with that server's token."""

    frame_id: str | None = None
    data_uri: str | None = None
    url: str | None = None
    path: str | None = None


def task_image(task: Any) -> TaskImage:
    """Where a Label Studio task's image comes from, checked in the order the ML backend reads it.

    Raises:
        InvalidArgumentError: The task is not an object with a ``data`` object, or names no image
            livelens can read (a path on the Label Studio server, e.g. an upload, needs that
            server's credentials, which livelens does not hold).
    """
    data = task.get("data") if isinstance(task, Mapping) else None
    if not isinstance(data, Mapping):
        raise InvalidArgumentError("a Label Studio task needs a 'data' object", code="bad_task")
    fid = data.get("livelens_id")
    image = data.get(IMAGE)
    frame_id = fid if isinstance(fid, str) and _FRAME_ID.match(fid) else None
    if isinstance(image, str) and image.startswith("data:"):
        return TaskImage(frame_id=frame_id, data_uri=image)
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        return TaskImage(frame_id=frame_id, url=image)
    if isinstance(image, str) and image.startswith("/") and not image.startswith("//") and len(image) <= 2048:
        return TaskImage(frame_id=frame_id, path=image)
    if frame_id:
        return TaskImage(frame_id=frame_id)
    shown = image[:100] if isinstance(image, str) else type(image).__name__
    raise InvalidArgumentError(f"task image {shown!r}: livelens reads a data.livelens_id of its label store, a "
                               "data: URI, an allowlisted http(s) URL or a path on the Label Studio server",
                               code="unreadable_task_image")


def server_url(hostname: Any, path: str) -> str:
    """The URL of a path on the Label Studio server that sent ``hostname`` in its ``/setup``.

    Raises:
        InvalidArgumentError: ``hostname`` is not an http(s) origin.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(hostname if isinstance(hostname, str) else "")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise InvalidArgumentError(f"Label Studio hostname {str(hostname)[:100]!r}: want http(s)://host[:port]",
                                   code="bad_label_studio_host")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}{path}"


def data_uri(data: bytes) -> str:
    """Image bytes as a ``data:`` URI, its media type from the service's own header probe."""
    from livelens.imageio import probe_image

    fmt = probe_image(data).format.lower()
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass(frozen=True)
class AnnotationChange:
    """What one Label Studio webhook asks of the label store.

    Attributes:
        frame_id: The label store frame (the task's ``data.livelens_id``).
        labels: The annotation's labels (choices and box labels).
        replace: True: the frame's labels become ``labels`` (an annotation made or edited is the
            labeller's whole answer for the frame); False: ``labels`` are removed (it was deleted).
        note: Where the change came from (task, annotation and Label Studio user ids).
    """

    frame_id: str
    labels: frozenset[str]
    replace: bool
    note: str


def annotation_change(payload: Mapping[str, Any]) -> AnnotationChange | None:
    """The label-store change an ``ANNOTATION_*`` webhook carries; None for other actions.

    Raises:
        InvalidArgumentError: An annotation event without a task and annotation, or whose task has
            no ``data.livelens_id`` (only frames livelens exported can be labelled back).
    """
    from livelens.data.importers import label_studio_result

    action = payload.get("action")
    if action not in TRAIN_EVENTS or action == "START_TRAINING":
        return None
    task, ann = payload.get("task"), payload.get("annotation")
    if not isinstance(task, Mapping) or not isinstance(ann, Mapping):
        raise InvalidArgumentError(f"{action} needs 'task' and 'annotation' objects", code="bad_webhook")
    fid = (task.get("data") or {}).get("livelens_id") if isinstance(task.get("data"), Mapping) else None
    if not isinstance(fid, str) or not _FRAME_ID.match(fid):
        raise InvalidArgumentError(f"task {task.get('id')!r} has no data.livelens_id: only frames exported from "
                                   "livelens can be labelled back into its label store", code="unknown_task")
    labels, _, _ = label_studio_result(ann.get("result"))
    cancelled = bool(ann.get("was_cancelled"))
    note = (f"label studio {action.lower()}: task {task.get('id')}, annotation {ann.get('id')}, "
            f"user {ann.get('completed_by')}" + (" (skipped)" if cancelled else ""))
    if action == "ANNOTATION_DELETED" or cancelled:
        # A skipped task says nothing about the frame: nothing is added; a deleted annotation takes
        # back the labels it gave.
        return AnnotationChange(fid, frozenset(labels) if not cancelled else frozenset(), False, note)
    return AnnotationChange(fid, frozenset(labels), True, note)
