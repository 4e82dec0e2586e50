"""One call for every per-frame quality measure, with taxonomy labels for the flags."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from livelens.quality import measures as m

if TYPE_CHECKING:
    from livelens.quality.iqa import IqaModel

#: Taxonomy label per flagged measure (``livelens/resources/taxonomy.yaml``, group ``quality``).
LABELS = {
    "black": "quality_black",
    "blur": "quality_blur",
    "dark": "quality_dark",
    "bright": "quality_bright",
    "occlusion": "quality_occluded",
    "noise": "quality_noisy",
    "compression": "quality_compression",
    "frozen": "quality_frozen",
}


def _grid_crop(gray: np.ndarray, side: int = 256) -> np.ndarray:
    """A central crop whose origin stays on the 8-pixel codec grid (blockiness needs full resolution)."""
    h, w = gray.shape
    y0 = max(0, (h - side) // 2) // 8 * 8
    x0 = max(0, (w - side) // 2) // 8 * 8
    return gray[y0 : y0 + side, x0 : x0 + side]


def assess(image: Any, *, thresholds: m.Thresholds | None = None, iqa: IqaModel | None = None) -> dict[str, Any]:
    """Measure a frame's picture quality.

    Args:
        image: RGB array (any dtype/channels :func:`livelens.imageio.array_to_rgb` accepts),
            encoded bytes, a path or a PIL image.
        thresholds: Flag thresholds; :data:`~livelens.quality.measures.DEFAULT_THRESHOLDS` when None.
        iqa: A loaded learned quality model; when given, the result has an ``iqa`` entry.

    Returns:
        A JSON-friendly dict: ``brightness``, ``blur``, ``occlusion``, ``black``, ``noise``,
        ``compression`` (each with ``score`` and ``flag``), optionally ``iqa``, the taxonomy
        ``labels`` that fired, and the frame ``size`` ``[width, height]``.

    Raises:
        InvalidImageError: The input is not an image.
    """
    th = thresholds or m.DEFAULT_THRESHOLDS
    rgb = m.to_rgb(image)
    h, w = rgb.shape[:2]
    gray_full = m.luminance(rgb)
    work = m._resize_long(gray_full, m.BLUR_SIDE)
    thumb_rgb = m._resize_long(rgb, m.THUMB_SIDE)
    thumb = m.luminance(thumb_rgb)

    out: dict[str, Any] = {
        "brightness": m.brightness(thumb, th),
        "blur": m.blur(work, th),
        "occlusion": m.occlusion(thumb_rgb, thumb, th),
        "black": m.black(thumb, th),
        "noise": m.noise(work, th),
        "compression": m.blockiness(_grid_crop(gray_full), th),
    }
    occ = out["occlusion"]
    if occ["box"] is not None:
        # Normalised thumbnail coordinates → pixels of the caller's frame.
        x0, y0, x1, y1 = occ["box"]
        occ["box"] = [round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)]
    if out["black"]["flag"]:
        # A black screen is trivially dark, flat and "blurred"; report only the root cause.
        for key in ("blur", "occlusion", "noise", "compression"):
            out[key]["flag"] = False
        out["brightness"]["flag"] = out["brightness"]["bright"] = False
        out["brightness"]["dark"] = False
    if iqa is not None:
        score = float(iqa.score(rgb))
        out["iqa"] = {"score": round(score, 2), "flag": bool(score < th.iqa), "model": iqa.ref}
    labels = [LABELS[k] for k in ("black", "blur", "occlusion", "noise", "compression") if out[k]["flag"]]
    if out["brightness"]["dark"]:
        labels.append(LABELS["dark"])
    if out["brightness"]["bright"]:
        labels.append(LABELS["bright"])
    out["labels"] = labels
    out["size"] = [int(w), int(h)]
    return out
