"""Generators: determinism, boxes that cover the overlay pixels, decodable QR codes, legible text,
graded quality distortions, and parallel generation on Ray giving the same rows as serial."""

from __future__ import annotations

import unicodedata

import cv2
import numpy as np
import pytest

from livelens.data import frames as fr
from livelens.data import quality as qu
from livelens.data import text as tx
from livelens.data.charset import charset, dict_path, gb2312_level1
from livelens.data.manifest import attributes, decode_row_image, read_manifest, write_manifest
from livelens.data.parallel import run_generator
from livelens.taxonomy import load_taxonomy


def _recipe_seeds(cfg: fr.FrameConfig, recipe: str, n: int, seed: int = 5) -> list[int]:
    """Slots whose recipe is ``recipe`` (recipes are drawn first from the slot's generator)."""
    out = []
    slot = 0
    while len(out) < n:
        if fr.pick_recipe(np.random.default_rng([seed, slot]), cfg) == recipe:
            out.append(slot)
        slot += 1
    return out


def test_frames_same_seed_same_bytes_and_labels_are_taxonomy_names():
    cfg = fr.FrameConfig(width=320, height=180)
    a = fr.generate_frames(0, 8, seed=3, cfg=cfg)
    b = fr.generate_frames(0, 8, seed=3, cfg=cfg)
    assert [r["image_bytes"] for r in a] == [r["image_bytes"] for r in b]
    c = fr.generate_frames(0, 8, seed=4, cfg=cfg)
    assert [r["id"] for r in a] != [r["id"] for r in c]
    # Chunking does not change a slot's output: slot 5 alone equals slot 5 of the run above.
    assert fr.generate_frames(5, 1, seed=3, cfg=cfg)[0]["id"] in {r["id"] for r in a}
    tax = load_taxonomy()
    for r in a + c:
        assert all(lbl in tax.labels for lbl in r["labels"])


def test_boxes_inside_frame_and_cover_every_changed_pixel():
    cfg = fr.FrameConfig(width=480, height=270, flat_background=True, decoys=False, jpeg_quality=100)
    slots = _recipe_seeds(cfg, "ads", 10) + _recipe_seeds(cfg, "game", 4)
    checked = 0
    for slot in slots:
        (row,) = fr.generate_frames(slot, 1, seed=5, cfg=cfg)
        img = decode_row_image(row["image_bytes"], None).astype(int)
        w, h = row["width"], row["height"]
        covered = np.zeros((h, w), bool)
        for b in row["boxes"]:
            assert 0 <= b["x0"] < b["x1"] <= w and 0 <= b["y0"] < b["y1"] <= h
            covered[int(b["y0"]) : int(np.ceil(b["y1"])), int(b["x0"]) : int(np.ceil(b["x1"]))] = True
            # The box is tight: the overlay changed pixels inside it.
            inside = np.abs(img[int(b["y0"]) : int(b["y1"]), int(b["x0"]) : int(b["x1"])] - 128).max()
            assert inside > 40, b
        changed = np.abs(img - 128).max(axis=2) > 12  # JPEG ringing stays under this
        # Allow a 2 px JPEG halo around boxes; nothing else in the frame may differ from the flat background.
        halo = cv2.dilate(covered.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert not (changed & ~halo).any(), (slot, row["labels"])
        assert set(row["labels"]) >= {b["label"] for b in row["boxes"]}
        checked += 1
    assert checked == len(slots)


def test_qr_codes_decode_to_their_payloads_with_opencv():
    cfg = fr.FrameConfig(width=640, height=360, decoys=False)
    detector = cv2.QRCodeDetector()
    decoded = total = 0
    for slot in _recipe_seeds(cfg, "ads", 80):
        (row,) = fr.generate_frames(slot, 1, seed=5, cfg=cfg)
        overlays = attributes(row).get("overlays", [])
        for ov in overlays:
            if ov["label"] != "ads_qrcode":
                continue
            total += 1
            img = decode_row_image(row["image_bytes"], None)
            x0, y0, x1, y1 = (int(v) for v in ov["box"])
            crop = cv2.cvtColor(img[y0:y1, x0:x1], cv2.COLOR_RGB2BGR)
            text, _, _ = detector.detectAndDecode(crop)
            decoded += text == ov["payload"]
        if total >= 6:
            break
    assert total >= 6
    assert decoded == total


def test_phone_obfuscation_forms_keep_the_number():
    rng = np.random.default_rng(0)
    zh = {c: str(i) for i, c in enumerate("零一二三四五六七八九")} | {c: str(i) for i, c in enumerate("零壹贰叁肆伍陆柒捌玖")}
    forms = set()
    for _ in range(60):
        number = fr.phone_number(rng)
        assert len(number) == 11 and number[0] == "1"
        form, shown = fr.obfuscate_phone(number, rng)
        forms.add(form)
        digits = "".join(zh.get(c, c) for c in unicodedata.normalize("NFKC", shown) if not c.isspace() and c != "-")
        assert digits == number, (form, shown)
    assert forms == {"plain", "spaced", "dashed", "fullwidth", "zh_mixed", "zh_formal"}


def test_small_overlays_are_one_to_five_percent_of_the_frame():
    cfg = fr.FrameConfig(width=480, height=270, p_small=1.0)
    fracs = []
    for slot in _recipe_seeds(cfg, "ads", 12):
        (row,) = fr.generate_frames(slot, 1, seed=5, cfg=cfg)
        attrs = attributes(row)
        if attrs.get("small"):
            fracs += [o["area_frac"] for o in attrs["overlays"]]
    assert len(fracs) >= 5
    assert all(0.005 <= f <= 0.06 for f in fracs), fracs


def test_black_and_frozen_frames():
    cfg = fr.FrameConfig(width=320, height=180)
    (black,) = fr.generate_frames(_recipe_seeds(cfg, "black", 1)[0], 1, seed=5, cfg=cfg)
    assert black["labels"] == ["quality_black"]
    assert decode_row_image(black["image_bytes"], None).mean() < 15
    seq = fr.generate_frames(_recipe_seeds(cfg, "frozen", 1)[0], 1, seed=5, cfg=cfg)
    assert 3 <= len(seq) <= 5
    attrs = [attributes(r) for r in seq]
    assert [a["index"] for a in attrs] == list(range(len(seq))) and len({a["sequence"] for a in attrs}) == 1
    assert len({r["split"] for r in seq}) == 1
    assert "quality_frozen" not in seq[0]["labels"] and all("quality_frozen" in r["labels"] for r in seq[1:])
    imgs = [decode_row_image(r["image_bytes"], None).astype(float) for r in seq]
    assert all(np.abs(i - imgs[0]).mean() < 3 for i in imgs[1:])


def test_charset_is_gb2312_level1_plus_ascii_and_matches_dictionary_file():
    zh = gb2312_level1()
    assert len(zh) == 3755 and zh[0] == "啊" and zh[-1] == "座"
    chars = charset()
    assert len(chars) >= 3755 + 62 and len(set(chars)) == len(chars)
    assert dict_path().read_text(encoding="utf-8").split("\n")[:-1] == list(chars)


def test_text_det_polygons_lie_inside_images():
    rows = tx.generate_text_det(0, 4, seed=2, width=320, height=240)
    assert sum(len(r["texts"]) for r in rows) >= 8
    for r in rows:
        for t in r["texts"]:
            xs, ys = t["polygon"][0::2], t["polygon"][1::2]
            assert len(xs) >= 4 and min(xs) >= 0 and max(xs) <= r["width"] and min(ys) >= 0 and max(ys) <= r["height"]
            assert t["text"]


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@pytest.mark.slow
def test_generated_lines_are_legible_to_pp_ocr():
    """An OCR no one here trained (PP-OCR ONNX via rapidocr) reads ≥90% of the characters."""
    from rapidocr import RapidOCR

    engine = RapidOCR()
    rows = tx.generate_text_lines(0, 20, seed=11, cfg=tx.TextConfig(p_hard=0.0))
    errors = total = 0
    for r in rows:
        img = decode_row_image(r["image_bytes"], None)
        out = engine(cv2.cvtColor(img, cv2.COLOR_RGB2BGR), use_det=False, use_cls=False, use_rec=True)
        pred = out.txts[0] if out.txts else ""
        # NFKC: reading full-width digits as ASCII ones is a correct read.
        gt = unicodedata.normalize("NFKC", r["texts"][0]["text"]).replace(" ", "")
        pred = unicodedata.normalize("NFKC", pred).replace(" ", "")
        errors += _edit_distance(gt, pred)
        total += len(gt)
    accuracy = 1 - errors / total
    print(f"PP-OCR character accuracy on 20 generated lines: {accuracy:.3f}")
    assert accuracy >= 0.90


def test_quality_levels_are_graded_and_split_by_photo():
    cfg = qu.QualityConfig(size=128, include_shared=False)
    rows = qu.generate_quality(0, 40, seed=1, cfg=cfg)
    assert rows == qu.generate_quality(0, 40, seed=1, cfg=cfg)
    photo_split: dict[str, str] = {}
    for r in rows:
        photo = r["attributes"]["photo"]
        assert photo_split.setdefault(photo, r["split"]) == r["split"]
        q = r["quality"]
        assert q["score"] == qu.reference_score(q["distortion"], q["level"])
    assert {"train", "test"} <= set(photo_split.values())
    # Scores fall monotonically with level, and the distortion really grows with level.
    for name in qu.DISTORTIONS:
        scores = [qu.reference_score(name, lv) for lv in (0, *qu.LEVELS)]
        assert scores == sorted(scores, reverse=True) and scores[-1] < 60
    photo = fr.render.real_photos(include_shared=False)[0].rgb[:128, :128]
    for name in ("gaussian_blur", "noise", "brightness_down", "jpeg"):
        diffs = [np.abs(qu.distort(photo, name, lv, np.random.default_rng(1))[0].astype(float) - photo).mean()
                 for lv in qu.LEVELS]
        assert diffs == sorted(diffs) and diffs[0] < diffs[-1], (name, diffs)
    out, boxes = qu.distort(photo, "occlusion_hand", 3, np.random.default_rng(2))
    x0, y0, x1, y1 = boxes[0]
    assert (np.abs(out.astype(int) - photo)[y0:y1, x0:x1].sum() > 0) and (out.astype(int) - photo)[:y0].sum() == 0


@pytest.mark.ray
def test_parallel_on_ray_matches_serial_and_writes_a_manifest(tmp_path, ray_session):
    cfg = fr.FrameConfig(width=256, height=144)
    serial = run_generator(fr.generate_frames, 6, 9, cfg, chunk=2, use_ray=False)
    parallel = run_generator(fr.generate_frames, 6, 9, cfg, chunk=2, use_ray=True, num_cpus=0.5)
    assert [r["id"] for r in parallel] == [r["id"] for r in serial]
    out = write_manifest(parallel, tmp_path / "frames", fr.frames_card(9, 6, cfg))
    assert read_manifest(out).num_rows == len(serial)
    assert (out / "contact_sheet.png").stat().st_size > 1000


def test_the_racing_hud_is_drawn_only_when_asked_and_its_panels_are_boxed():
    """game_racing is the loop's never-seen kind (benchmarks/loop_e2e.py): off by default."""
    default = [r for s in range(200) for r in fr.generate_slot(0, s)]
    assert not any("game_racing" in r["labels"] for r in default)
    cfg = fr.FrameConfig(p_negative=0, p_ads=0, p_game=1, p_black=0, p_frozen=0, game_layouts=("game_racing",))
    rows = [fr.generate_slot(4, s, cfg)[0] for s in range(6)]
    for r in rows:
        assert set(r["labels"]) >= {"game_racing", "scene_game_screen"}
        hud = [b for b in r["boxes"] if b["label"] == "game_racing"]
        assert len(hud) == 4  # speedometer, position and lap, lap time, track map
        texts = " ".join(t["text"] for t in r["texts"])
        assert "km/h" in texts and "LAP" in texts
        rgb = decode_row_image(r["image_bytes"], None)
        b = hud[0]  # the speedometer: a dark dial on whatever background
        dial = rgb[int(b["y0"]):int(b["y1"]), int(b["x0"]):int(b["x1"])]
        assert dial.mean() < rgb.mean() + 40
    assert "game_racing" in load_taxonomy().leaves
