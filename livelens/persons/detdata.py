"""Training frames for the persons-stage detector: generated live-stream frames with real faces pasted in.

The overlays (QR codes, logos and watermarks, picture-in-picture windows, text banners and
contact pills, game HUD panels) and their boxes come from :mod:`livelens.data.frames`, drawn on
backgrounds that show no people (:func:`livelens.data.render.people_free`), so no face in a frame
is left unlabelled. Faces are cut from real photos with a feathered elliptical mask and pasted at
scales from a small webcam window to a close-up, with colour, grey, blur and flip augmentation:

* ``faces/training.xml`` of ../shared/data (18 faces in 4 PASCAL photos, dlib's boxes);
* ../shared/data's other photos of faces that ``testing.xml`` does not name (``bald_guys.jpg``, a
  grid of 24 headshots, and ``Tom_Cruise_avp_2014_4.jpg``), scikit-image's astronaut, matplotlib's
  ``grace_hopper.jpg`` and insightface's group photo ``t1.jpg`` (read where the package is
  installed), boxed by the MTCNN teacher and mapped to dlib's box style (:data:`DLIB_FROM_MTCNN`,
  fitted on training.xml);
* scikit-image's ``lfw_subset``: 100 real 25×25 grey face crops (labelled) and 100 non-face
  crops (pasted unlabelled, as hard negatives).

``faces/testing.xml`` never enters: its photos are the detector's real test set. Every sample
is determined by ``(seed, slot)``; held-out samples come from slots from 10,000,000 on.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livelens.ocr.mm_configs import OBJECT_CLASSES

#: Generator box labels → detector classes (contact pills are text overlays, like banners).
CLASS_OF = {
    "ads_qrcode": "qrcode", "ads_watermark": "logo", "ads_logo": "logo", "ads_picture_in_picture": "pip",
    "ads_text_banner": "text_overlay", "ads_phone": "text_overlay", "ads_url": "text_overlay",
    "ads_wechat_id": "text_overlay", "ads_qq_id": "text_overlay",
    "game_battle_royale": "hud", "game_honor_of_kings": "hud",
}
#: dlib's face box relative to MTCNN's ([x0, y0, x1, y1] as fractions of MTCNN's width and height),
#: the mean over the 17 faces of training.xml both found (dlib's is wider and starts below the brow).
DLIB_FROM_MTCNN = (-0.095, 0.101, 1.095, 0.978)
HELDOUT_OFFSET = 10_000_000
LFW_FACES = 100
#: Picture-in-picture windows are one overlay kind of nine in the generator's ad frames: rare enough
#: (about 1 frame in 20) that 15 CPU minutes saw too few. A share of frames gets one more.
EXTRA_PIP = 0.25
FRAME_SIZE = (640, 360)
#: Photos of ../shared/data/faces outside both XML files whose faces the teacher boxes.
EXTRA_SHARED_PHOTOS = ("bald_guys.jpg", "Tom_Cruise_avp_2014_4.jpg")
#: Package photos (:data:`livelens.evaluation.PACKAGE_PHOTOS`) that show people.
PACKAGE_PEOPLE_PHOTOS = ("insightface/t1.jpg",)
#: One photo's faces weigh at most this many faces' worth when a face is drawn to paste, so the
#: 24 headshots of ``bald_guys.jpg`` do not make half of all photo faces one kind of face.
MAX_FACES_PER_PHOTO = 7


@functools.lru_cache(maxsize=2)
def face_photos(shared: str | None = None) -> tuple[tuple[str, np.ndarray, list[list[float]]], ...]:
    """``(name, rgb, face boxes in dlib's style)`` of every real photo faces are cut from.

    The photos of ``faces/training.xml`` with dlib's boxes (never ``testing.xml``), then the
    photos of :data:`EXTRA_SHARED_PHOTOS`, scikit-image's astronaut, matplotlib's
    ``grace_hopper.jpg`` and :data:`PACKAGE_PEOPLE_PHOTOS` boxed by the MTCNN teacher (scores
    from 0.95). Cached, since the face and the person pools both start here and the teacher is not
    free; the images are read-only.

    Args:
        shared: ../shared/data (default: the one :mod:`livelens.data.render` finds); without it
            only the packaged photos are used.
    """
    import matplotlib.cbook
    import skimage.data

    from livelens.data.render import shared_data_dir
    from livelens.evaluation import package_photo_paths
    from livelens.imageio import load_image

    out: list[tuple[str, np.ndarray, list[list[float]]]] = []
    to_box: list[tuple[str, np.ndarray]] = []
    root = Path(shared) if shared else shared_data_dir()
    if root is not None and (root / "faces" / "training.xml").is_file():
        from livelens.data.importers import import_dlib_xml

        for row in import_dlib_xml(root / "faces" / "training.xml"):  # never testing.xml
            out.append((f"shared/faces/{row['attributes']['file']}", load_image(row["image_bytes"]),
                        [list(map(float, b)) for b in row["attributes"]["faces"]]))
        to_box += [(f"shared/faces/{n}", load_image(root / "faces" / n)) for n in EXTRA_SHARED_PHOTOS
                   if (root / "faces" / n).is_file()]
    to_box += [("skimage/astronaut", skimage.data.astronaut()),
               ("matplotlib/grace_hopper.jpg",
                load_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))]
    found = package_photo_paths()
    to_box += [(n, load_image(found[n])) for n in PACKAGE_PEOPLE_PHOTOS if n in found]
    from livelens.persons.teachers import MtcnnFaces

    teacher = MtcnnFaces()
    for name, rgb in to_box:
        boxes = []
        for f in teacher.detect(rgb):
            if f.score >= 0.95:
                b, w, h = f.box, f.box[2] - f.box[0], f.box[3] - f.box[1]
                boxes.append([b[0] + DLIB_FROM_MTCNN[0] * w, b[1] + DLIB_FROM_MTCNN[1] * h,
                              b[0] + DLIB_FROM_MTCNN[2] * w, b[1] + DLIB_FROM_MTCNN[3] * h])
        out.append((name, rgb, boxes))
    for _, rgb, _ in out:
        rgb.setflags(write=False)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def face_pool(shared: str | None = None) -> tuple[list[tuple[np.ndarray, list[float]]], list[np.ndarray]]:
    """(context crop, face box in the crop) per real face of :func:`face_photos`, and the
    non-face crops.

    Args:
        shared: ../shared/data (default: the one :mod:`livelens.data.render` finds); without it
            only the packaged photos are used.
    """
    import skimage.data

    faces: list[tuple[np.ndarray, list[float]]] = []

    def add(rgb: np.ndarray, box: Sequence[float], grow: float = 1.6) -> None:
        x0, y0, x1, y1 = box
        cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * grow, (y1 - y0) * grow
        cx0, cy0 = max(0, int(cx - w / 2)), max(0, int(cy - h / 2))
        cx1, cy1 = min(rgb.shape[1], int(cx + w / 2)), min(rgb.shape[0], int(cy + h / 2))
        faces.append((rgb[cy0:cy1, cx0:cx1].copy(), [x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0]))

    for _, rgb, boxes in face_photos(shared):
        for box in boxes:
            add(rgb, box)
    lfw = skimage.data.lfw_subset()  # (200, 25, 25) floats: 100 faces, then 100 non-faces
    grey = [np.repeat((np.clip(x, 0, 1) * 255).astype(np.uint8)[:, :, None], 3, axis=2) for x in lfw]
    # An LFW crop is cut tight around the face: the face box is the crop less a thin margin.
    faces += [(g, [1.5, 1.0, 23.5, 25.0]) for g in grey[:LFW_FACES]]
    return faces, grey[100:]


@functools.lru_cache(maxsize=1)
def photo_face_p(shared: str | None = None) -> np.ndarray:
    """The chance of each photo face of :func:`face_pool` (in its order) when one is drawn to paste:
    equal, except that one photo's faces share at most :data:`MAX_FACES_PER_PHOTO` faces' worth."""
    w = np.concatenate([np.full(len(b), min(1.0, MAX_FACES_PER_PHOTO / len(b))) for _, _, b in face_photos(shared) if b])
    return w / w.sum()


def _ellipse_alpha(h: int, w: int, feather: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    d = ((xx + 0.5 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - h / 2) / (h / 2)) ** 2
    return np.clip((1.0 - d) / feather, 0.0, 1.0)[:, :, None].astype(np.float32)


def _jitter(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = crop.astype(np.float32) * rng.uniform(0.6, 1.3) * rng.uniform(0.85, 1.15, 3)
    if rng.random() < 0.15:
        out[:] = out.mean(axis=2, keepdims=True)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < 0.2:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 1.5))
    return out


def _free(box: Sequence[float], taken: list[Sequence[float]], pad: float) -> bool:
    return all(box[2] + pad <= t[0] or t[2] + pad <= box[0] or box[3] + pad <= t[1] or t[3] + pad <= box[1]
               for t in taken)


def paste_faces(rgb: np.ndarray, rng: np.random.Generator, taken: list[list[float]]) -> list[list[float]]:
    """Paste 0-5 real faces (sometimes a crowd of 8-16 small ones) and some non-faces; returns face boxes."""
    faces, non_faces = face_pool()
    h, w = rgb.shape[:2]
    crowd = rng.random() < 0.05
    n = int(rng.integers(8, 17)) if crowd else int(rng.choice([0, 1, 1, 1, 2, 2, 3, 5]))
    boxes: list[list[float]] = []
    photos = len(faces) - LFW_FACES
    for _ in range(n):
        # Photo faces two times in three: the 100 grey LFW crops would otherwise be most faces seen.
        lfw = photos == 0 or rng.random() < 0.35
        crop, fb = faces[photos + int(rng.integers(LFW_FACES)) if lfw else int(rng.choice(photos, p=photo_face_p()))]
        # An LFW crop is 25 px: enlarged past a small window it is only blur.
        top = 0.08 if crowd or lfw else 0.28
        face_w = float(np.exp(rng.uniform(np.log(0.025), np.log(top)))) * w
        s = face_w / max(1.0, fb[2] - fb[0])
        ch, cw = max(2, round(crop.shape[0] * s)), max(2, round(crop.shape[1] * s))
        if ch >= h or cw >= w:
            continue
        patch = _jitter(cv2.resize(crop, (cw, ch), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR), rng)
        box_in = [v * s for v in fb]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
            box_in = [cw - box_in[2], box_in[1], cw - box_in[0], box_in[3]]
        for _try in range(20):
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            fbox = [x + box_in[0], y + box_in[1], x + box_in[2], y + box_in[3]]
            if _free([x, y, x + cw, y + ch], taken, 2):
                break
        else:
            continue
        # Tight LFW crops get a sharper edge (a soft one would erase the cheeks); both are ellipses, so a
        # square patch never means "face".
        alpha = _ellipse_alpha(ch, cw, 0.12 if lfw else 0.35)
        region = rgb[y:y + ch, x:x + cw].astype(np.float32)
        rgb[y:y + ch, x:x + cw] = (patch * alpha + region * (1 - alpha)).astype(np.uint8)
        taken.append([x, y, x + cw, y + ch])
        boxes.append([round(v, 1) for v in fbox])
    for _ in range(int(rng.integers(0, 3))):  # hard negatives: real non-face crops of the same size range
        crop = non_faces[int(rng.integers(len(non_faces)))]
        side = int(np.exp(rng.uniform(np.log(0.025), np.log(0.12))) * w)
        x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        if _free([x, y, x + side, y + side], taken, 2):
            rgb[y:y + side, x:x + side] = _jitter(cv2.resize(crop, (side, side)), rng)
            taken.append([x, y, x + side, y + side])
    return boxes


#: Share of frames (not black) that get whole people pasted in, and how many.
P_PEOPLE, PEOPLE_PER_FRAME = 0.35, (1, 1, 2)
#: The photo whose people only held-out frames show (slots from :data:`HELDOUT_OFFSET`), so that
#: the person AP on held-out frames is measured on people the detector never saw.
HELDOUT_PEOPLE_PHOTO = "shared/faces/2008_001322.jpg"


@functools.lru_cache(maxsize=1)
def person_pool(shared: str | None = None) -> tuple[Any, ...]:
    """The person cut-outs of :func:`face_photos` (:mod:`livelens.persons.cutouts`; needs ``.venv-mp``)."""
    from livelens.persons.cutouts import person_cutouts

    return tuple(person_cutouts(shared))


def paste_people(rgb: np.ndarray, rng: np.random.Generator, taken: list[list[float]],
                 heldout: bool = False) -> list[tuple[list[float], list[float]]]:
    """Paste 1-2 whole people (a streamer's size in the frame, possibly cut by its bottom edge).

    Each person is a segmentation cut-out (:func:`person_pool`), scaled, flipped and colour-jittered,
    pasted through its own mask where it overlaps nothing already placed. The face always lies
    inside the frame, so it is labelled with the person.

    Returns:
        ``(person box, face box)`` per pasted person; the person box is the pasted mask's extent
        inside the frame, widened to hold the face box.
    """
    pool = [c for c in person_pool() if (c.photo == HELDOUT_PEOPLE_PHOTO) == heldout]
    if not pool:
        return []
    h, w = rgb.shape[:2]
    out = []
    for _ in range(int(rng.choice(PEOPLE_PER_FRAME))):
        c = pool[int(rng.integers(len(pool)))]
        body_h = c.body[3] - c.body[1]
        s = float(rng.uniform(0.35, 1.0)) * h / max(body_h, 1.0)
        ch, cw = max(2, round(c.rgb.shape[0] * s)), max(2, round(c.rgb.shape[1] * s))
        if cw >= w:
            continue
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        patch = _jitter(cv2.resize(c.rgb, (cw, ch), interpolation=interp), rng)
        alpha = cv2.resize(c.alpha, (cw, ch), interpolation=interp)
        face, body = [v * s for v in c.face], [v * s for v in c.body]
        if rng.random() < 0.5:
            patch, alpha = patch[:, ::-1], alpha[:, ::-1]
            face, body = [cw - face[2], face[1], cw - face[0], face[3]], [cw - body[2], body[1], cw - body[0], body[3]]
        # The window's top may start above the frame's top only by what lies above the body, and
        # its bottom may run past the frame's bottom (legs cut off), never the face.
        y_hi, y_lo = h - int(np.ceil(face[3])), -int(body[1])
        if c.body[3] >= c.alpha.shape[0] - 1:
            # The photo (or the segmented window) cut this body off: the cut goes at or past the
            # frame's bottom, as a webcam's does, never in mid-frame.
            y_lo = max(y_lo, h - int(body[3]))
        if y_hi < y_lo:
            continue
        for _try in range(20):
            x = int(rng.integers(-int(body[0]), w - int(np.ceil(body[2])) + 1))
            y = int(rng.integers(y_lo, y_hi + 1))
            seen = [max(0.0, x + body[0]), max(0.0, y + body[1]), min(float(w), x + body[2]), min(float(h), y + body[3])]
            if seen[2] - seen[0] >= 8 and seen[3] - seen[1] >= 8 and _free(seen, taken, 2):
                break
        else:
            continue
        # The part of the window inside the frame, pasted through the mask.
        fx0, fy0, fx1, fy1 = max(0, x), max(0, y), min(w, x + cw), min(h, y + ch)
        a = alpha[fy0 - y:fy1 - y, fx0 - x:fx1 - x].astype(np.float32)[:, :, None] / 255.0
        region = rgb[fy0:fy1, fx0:fx1].astype(np.float32)
        rgb[fy0:fy1, fx0:fx1] = (patch[fy0 - y:fy1 - y, fx0 - x:fx1 - x] * a + region * (1 - a)).astype(np.uint8)
        ys, xs = np.nonzero(a[:, :, 0] >= 0.5)
        if not len(xs):
            continue
        fbox = [min(max(v, 0.0), lim) for v, lim in zip((x + face[0], y + face[1], x + face[2], y + face[3]),
                                                        (w, h, w, h), strict=True)]
        # The person's box is the pasted mask's extent, and holds the face box (dlib's face boxes
        # run a few pixels past a mask's cheeks).
        pbox = [min(float(fx0 + xs.min()), fbox[0]), min(float(fy0 + ys.min()), fbox[1]),
                max(float(fx0 + xs.max() + 1), fbox[2]), max(float(fy0 + ys.max() + 1), fbox[3])]
        taken.append(pbox)
        out.append(([round(v, 1) for v in pbox], [round(float(v), 1) for v in fbox]))
    return out


def _extra_pip(rgb: np.ndarray, rng: np.random.Generator, taken: list[list[float]]) -> list[float] | None:
    """Draw one more picture-in-picture window (the generator's own renderer) where nothing else is."""
    from PIL import Image

    from livelens.data.frames import _fit_overlay, _place
    from livelens.data.render import alpha_bbox, people_free

    h, w = rgb.shape[:2]
    with people_free():
        ov = _fit_overlay("ads_picture_in_picture", rng, 0.1 * w * h, (w, h))
    pos = _place(ov, rng, (w, h), [tuple(int(v) for v in t) for t in taken])
    if pos is None:
        return None
    img = Image.fromarray(rgb).convert("RGBA")
    img.alpha_composite(ov.patch, pos)
    rgb[:] = np.asarray(img.convert("RGB"))
    x0, y0, x1, y1 = alpha_bbox(ov.patch)
    return [float(pos[0] + x0), float(pos[1] + y0), float(pos[0] + x1), float(pos[1] + y1)]


def make_sample(seed: int, slot: int) -> dict[str, Any]:
    """One training (or, from :data:`HELDOUT_OFFSET`, held-out) frame: JPEG bytes, boxes, class ids."""
    from livelens.data.frames import FrameConfig, generate_slot
    from livelens.data.render import encode_jpeg_bytes, people_free
    from livelens.imageio import decode_image

    cfg = FrameConfig(width=FRAME_SIZE[0], height=FRAME_SIZE[1], p_negative=0.34, p_ads=0.5, p_game=0.14,
                      p_black=0.02, p_frozen=0.0)
    with people_free():
        row = generate_slot(seed, slot, cfg)[0]
    rgb = decode_image(row["image_bytes"]).copy()
    boxes, labels = [], []
    for b in row["boxes"] or []:
        cls = CLASS_OF.get(b["label"])
        if cls is not None:
            boxes.append([b["x0"], b["y0"], b["x1"], b["y1"]])
            labels.append(OBJECT_CLASSES.index(cls))
    rng = np.random.default_rng([seed, slot, 17])
    if row["attributes"].get("recipe") != "black" and rng.random() < EXTRA_PIP:
        box = _extra_pip(rgb, rng, boxes)
        if box is not None:
            boxes.append(box)
            labels.append(OBJECT_CLASSES.index("pip"))
    if row["attributes"].get("recipe") != "black" and rng.random() < P_PEOPLE:
        for pbox, fbox in paste_people(rgb, rng, [list(b) for b in boxes], slot >= HELDOUT_OFFSET):
            boxes += [pbox, fbox]
            labels += [OBJECT_CLASSES.index("person"), OBJECT_CLASSES.index("face")]
    if row["attributes"].get("recipe") != "black":
        for fb in paste_faces(rgb, rng, [list(b) for b in boxes]):
            boxes.append(fb)
            labels.append(OBJECT_CLASSES.index("face"))
    return {"image_bytes": encode_jpeg_bytes(rgb, 90), "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int64), "width": rgb.shape[1], "height": rgb.shape[0]}


def samples(start: int, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Samples of slots ``start .. start + count - 1``."""
    return [make_sample(seed, s) for s in range(start, start + count)]
