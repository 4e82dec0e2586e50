"""livelens's reading past PP-OCR alone (issue 22): each failure kind fails without its fix.

Tight crops (padding before detection), script confusion (the simplified preference), a line
the angle classifier turns over by mistake (both reads compared) and doubled characters (the
CTC decoder). The lines are rendered here; the fonts are the Debian packages setup installs.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from livelens.errors import InvalidArgumentError
from livelens.ocr import PpOcrEngine
from livelens.ocr.decode import LineDecoder, runs, traditional_to_simplified
from livelens.ocr.layout import pad_for_detection, unpad
from livelens.ocr.pipeline import OcrPipeline
from livelens.ocr.types import TextBox
from livelens.ocr.userset import FontFace, cjk_faces, line_accuracy, normalise, user_text_set

CHARS = ["blank", "电", "话", "哈", "決", "决", "赛", "圈", "實", "实", "6", "9", " "]
IX = {c: i for i, c in enumerate(CHARS)}


def ctc(frames: list[dict[str, float]]) -> np.ndarray:
    """A (1, T, C) probability matrix: each frame's given classes, the rest of the mass on blank."""
    out = np.zeros((1, len(frames), len(CHARS)), np.float32)
    for t, probs in enumerate(frames):
        for c, p in probs.items():
            out[0, t, IX[c]] = p
        out[0, t, 0] += 1.0 - out[0, t].sum()
    return out


B = {"blank": 1.0}


def test_decoder_undoubles_a_split_glyph_but_keeps_real_doubles() -> None:
    # 电 lights frames 2 and 4 with one blank frame between (one glyph split in two), then 话 a pitch later.
    split = ctc([B, B, {"电": 0.9}, B, {"电": 0.8}, B, B, B, B, B, {"话": 0.9}, B, B, B, B, B, {"哈": 0.9}, B])
    assert LineDecoder(CHARS, undouble=None, simplify=None)(split)[0][0][0] == "电电话哈"  # greedy CTC doubles it
    assert LineDecoder(CHARS)(split)[0][0][0] == "电话哈"
    # 哈哈: two glyphs a whole pitch apart stay two.
    real = ctc([B, {"哈": 0.9}, B, B, B, B, B, {"哈": 0.9}, B, B, B, B, B, {"话": 0.9}, B])
    assert LineDecoder(CHARS)(real)[0][0][0] == "哈哈话"


def test_decoder_prefers_simplified_only_where_the_recogniser_hesitates() -> None:
    hesitant = ctc([B, {"決": 0.97, "决": 0.02}, B, B, {"赛": 0.95}, B, B, {"圈": 0.95}, B])
    assert LineDecoder(CHARS, simplify=None)(hesitant)[0][0][0] == "決赛圈"
    assert LineDecoder(CHARS)(hesitant)[0][0][0] == "决赛圈"
    # Sure of the traditional form (runner-up far below): kept.
    sure = ctc([B, {"決": 0.995, "决": 0.0005}, B, B, {"赛": 0.95}, B, B, {"圈": 0.95}, B])
    assert LineDecoder(CHARS)(sure)[0][0][0] == "決赛圈"
    # A line whose other characters are surely traditional stays traditional.
    trad_line = ctc([B, {"實": 0.999, "实": 0.0001}, B, B, {"決": 0.97, "决": 0.02}, B])
    assert LineDecoder(CHARS)(trad_line)[0][0][0] == "實決"
    # Runner-up is another character, not the simplified form: no change.
    other = ctc([B, {"決": 0.9, "圈": 0.05, "决": 0.02}, B, B, {"赛": 0.95}, B])
    assert LineDecoder(CHARS)(other)[0][0][0] == "決赛"


def test_ctc_runs_and_table() -> None:
    best = np.array([0, 1, 1, 0, 2, 0, 0, 2])
    assert [(r.cls, r.start, r.end) for r in runs(best, np.ones(8))] == [(1, 1, 2), (2, 4, 4), (2, 7, 7)]
    table = traditional_to_simplified()
    assert table["決"] == "决" and table["電"] == "电" and "决" not in table


def test_padding_maps_boxes_back() -> None:
    img = np.full((30, 300, 3), 200, np.uint8)
    padded, (ox, oy) = pad_for_detection(img, max_upscale=3.0)
    assert padded.shape[0] == padded.shape[1] >= 736 / 3 and (ox, oy) == (0, (padded.shape[0] - 30) // 2)
    assert (padded[0, 0] == 200).all()  # the border's own colour, not black
    box = TextBox.from_polygon([[ox + 5, oy - 4], [ox + 290, oy - 4], [ox + 290, oy + 26], [ox + 5, oy + 26]], 0.9)
    (back,) = unpad([box], (ox, oy), img.shape)
    assert back.box == [5.0, 0.0, 290.0, 26.0]
    big = np.zeros((540, 960, 3), np.uint8)
    assert pad_for_detection(big)[1] == (0, 0) and pad_for_detection(big)[0] is big


@pytest.fixture(scope="module")
def engines() -> tuple[PpOcrEngine, PpOcrEngine]:
    return PpOcrEngine(), PpOcrEngine.plain()


def face(name: str) -> FontFace:
    found = [f for f in cjk_faces() if f.name.startswith(name)]
    assert found, f"font {name} missing: scripts/setup.sh installs the Debian CJK font packages"
    return found[0]


def render(text: str, font: FontFace, size: int, margin: int = 2, fg=(20, 20, 20), bg=(245, 245, 245)) -> np.ndarray:
    f = font.at(size)
    x0, y0, x1, y1 = f.getbbox(text)
    im = Image.new("RGB", (x1 - x0 + 2 * margin, y1 - y0 + 2 * margin), bg)
    ImageDraw.Draw(im).text((margin - x0, margin - y0), text, font=f, fill=fg)
    return np.asarray(im)


def served_read(engine: PpOcrEngine, img: np.ndarray) -> list[str]:
    """What the Ocr deployment answers: the serving pipeline around this engine."""
    pipe, det, rec = OcrPipeline.local(engine, decode_qr=False)
    return [ln["text"] for ln in pipe.read_sync(img, det, rec)["lines"]]


def test_tight_crops_are_read_after_padding(engines) -> None:
    ours, plain = engines
    phrases = ("关注主播", "直播间专属价", "欢迎来到直播间", "点赞加关注", "全场包邮", "今晚八点开播", "Follow me", "GAME OVER")
    cases = [(t, render(t, face("WenQuanYi Micro Hei"), size, margin=1)) for t in phrases for size in (28, 36)]
    assert [served_read(ours, c) for _, c in cases] == [[t] for t, _ in cases]
    # PP-OCR alone scales a 30-px-high crop to a 736-px-high input and finds no text in most of them
    # (one size of each phrase: its 736-px passes are most of this test's time).
    alone = cases[::2]
    assert sum(served_read(plain, c) == [t] for t, c in alone) <= len(alone) // 4


def test_script_confusion_is_fixed_and_sure_traditional_kept(engines) -> None:
    ours, plain = engines
    white = {"fg": (0, 0, 0), "bg": (255, 255, 255)}
    for text, font, margin in (("决赛圈", "LXGW WenKai Bold", 3), ("决战到底", "AR PL UKai", 12)):
        img = render(text, face(font), 40, margin=margin, **white)
        assert served_read(plain, img) == [text.replace("决", "決")], font  # PP-OCR alone reads 決
        assert served_read(ours, img) == [text], font
    trad = render("決賽圈", face("Noto Sans CJK SC Regular"), 40, margin=12)
    assert served_read(ours, trad) == ["決賽圈"]


def test_a_line_turned_over_by_mistake_reads_upright(engines) -> None:
    ours, plain = engines
    img = render("666", face("LXGW WenKai Bold"), 40, margin=3, fg=(0, 0, 0), bg=(255, 255, 255))
    assert plain.recognize([img])[0][0] == "999"  # the angle classifier turned it over
    assert ours.recognize([img])[0][0] == "666"
    assert served_read(ours, img) == ["666"]


def test_user_set_is_deterministic_and_splits_share_nothing() -> None:
    a, b = user_text_set(6, "val"), user_text_set(6, "val")
    assert [s.lines for s in a] == [s.lines for s in b] and all((x.image == y.image).all() for x, y in zip(a, b, strict=True))
    t = user_text_set(6, "test")
    assert [s.lines for s in a] != [s.lines for s in t]
    assert {s.attrs["tight"] for s in user_text_set(30, "val")} == {True, False}
    trad = user_text_set(6, "val", traditional=True)
    assert [s.attrs["font"] for s in trad] == [s.attrs["font"] for s in a]
    with pytest.raises(InvalidArgumentError):
        user_text_set(3, "train")


def test_line_accuracy_known_answers() -> None:
    s = user_text_set(2, "val")
    s[0].lines, s[1].lines = ["决赛圈", "Good luck"], ["ＶＩＰ８"]
    s[0].attrs["tight"], s[1].attrs["tight"] = True, False
    res = line_accuracy(s, [["决赛圈", "Goodluck"], ["VIP 9"]])
    assert res["line_acc"] == pytest.approx(2 / 3) and res["tight_acc"] == 1.0 and res["padded_acc"] == 0.0
    assert [m["want"] for m in res["misses"]] == ["ＶＩＰ８"]
    assert normalise(" Ｇood\tluck！") == "Goodluck!"
