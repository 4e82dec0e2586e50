"""One call for every per-frame quality measure, with taxonomy labels for the flags."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from livelens.quality import measures as m

if TYPE_CHECKING:
    from livelens.quality.flags import FlagModel
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


def _classical(rgb: np.ndarray, th: m.Thresholds) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """The classical measures of an RGB frame, with the thumbnail they were computed on and the
    full frame's luminance (the learned flags' tilt reads it too)."""
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
    return out, thumb_rgb, thumb, gray_full


def _flag_inputs(rgb: np.ndarray, feats: np.ndarray, out: dict[str, Any], thumb_rgb: np.ndarray,
                 thumb: np.ndarray, grey: np.ndarray, default_thresholds: bool,
                 tilt: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The learned flag model's feature vector and occluder map (shared by :func:`assess` and
    :func:`flag_inputs`, so training features are the served ones)."""
    from livelens.quality import flags as fl

    # The learned decisions need the default-threshold classical scores they were trained on.
    base = out if default_thresholds else _classical(rgb, m.DEFAULT_THRESHOLDS)[0]
    # ``tilt=False`` skips the focus features (their FFTs) for a model fitted before them.
    return fl.features(feats, base, thumb_rgb, thumb, grey if tilt else None), fl.OccluderMap.features(rgb)


def flag_inputs(image: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The learned flag model's inputs of a frame, exactly as :func:`assess` computes them.

    Returns:
        The feature vector, the occluder feature map and the classical result (default thresholds).
    """
    from livelens.quality import iqa as iq

    rgb = m.to_rgb(image)
    out, thumb_rgb, thumb, grey = _classical(rgb, m.DEFAULT_THRESHOLDS)
    x, omap = _flag_inputs(rgb, iq.features(rgb), out, thumb_rgb, thumb, grey, True)
    return x, omap, out


def assess(image: Any, *, thresholds: m.Thresholds | None = None, iqa: IqaModel | None = None,
           flags: FlagModel | None = None) -> dict[str, Any]:
    """Measure a frame's picture quality.

    Args:
        image: RGB array (any dtype/channels :func:`livelens.imageio.array_to_rgb` accepts),
            encoded bytes, a path or a PIL image.
        thresholds: Flag thresholds; :data:`~livelens.quality.measures.DEFAULT_THRESHOLDS` when None.
        iqa: A loaded learned quality model; when given, the result has an ``iqa`` entry.
        flags: A loaded learned flag model (:mod:`livelens.quality.flags`); when given, it decides
            the dark, bright, blur and occlusion flags (the classical scores stay in the answer) and
            the result has a ``flags_model`` entry with each flag's probability.

    Returns:
        A JSON-friendly dict: ``brightness``, ``blur``, ``occlusion``, ``black``, ``noise``,
        ``compression`` (each with ``score`` and ``flag``), optionally ``iqa`` and ``flags_model``,
        the taxonomy ``labels`` that fired, and the frame ``size`` ``[width, height]``.

    Raises:
        InvalidImageError: The input is not an image.
    """
    th = thresholds or m.DEFAULT_THRESHOLDS
    rgb = m.to_rgb(image)
    h, w = rgb.shape[:2]
    out, thumb_rgb, thumb, grey = _classical(rgb, th)
    feats = None
    if iqa is not None or flags is not None:
        from livelens.quality import iqa as iq

        feats = iq.features(rgb)  # computed once for both learned models
        iqa_feats = feats if iqa is None or iqa.net.arch.side == iq.IQA_SIDE else iq.features(rgb, iqa.net.arch.side)
    if flags is not None:
        from livelens.quality.flags import LEGACY_FEATURES

        decided = flags.decide(*_flag_inputs(rgb, feats, out, thumb_rgb, thumb, grey, thresholds is None,
                                             flags.n_features > LEGACY_FEATURES))
        b = out["brightness"]
        b["dark"], b["bright"] = decided["dark"]["flag"], decided["bright"]["flag"]
        b["flag"] = b["dark"] or b["bright"]
        out["blur"]["flag"] = decided["blur"]["flag"]
        out["occlusion"]["flag"] = decided["occlusion"]["flag"]
        out["flags_model"] = {"model": flags.ref, "p": {k: v["p"] for k, v in decided.items()}}
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
        score = float(iqa.score_features(iqa_feats[None])[0])
        out["iqa"] = {"score": round(score, 2), "flag": bool(score < th.iqa), "model": iqa.ref}
    labels = [LABELS[k] for k in ("black", "blur", "occlusion", "noise", "compression") if out[k]["flag"]]
    if out["brightness"]["dark"]:
        labels.append(LABELS["dark"])
    if out["brightness"]["bright"]:
        labels.append(LABELS["bright"])
    out["labels"] = labels
    out["size"] = [int(w), int(h)]
    return out
