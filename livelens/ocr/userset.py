"""Text the way users send it: tight and padded crops of live-stream phrases over real photos.

The OCR evaluation set of ``make eval-ocr``. Each sample is one image with one to three lines of a
Chinese, English or mixed live-stream phrase, drawn in one of the installed CJK fonts (every
face of every Debian CJK font package that ``scripts/setup.sh`` installs), at a random size,
colour and style (plain, outlined, shadowed, on a banner card), over a crop of a real photo, and
cropped either tight round the ink (the failure case of PP-OCR's detector) or with a margin.
Samples are JPEG round-tripped, as uploads are.

Two splits never share a seed or a background photo: ``val`` is the one every reading fix was
chosen on, ``test`` is measured only (:data:`SPLIT_SEEDS`).
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from livelens.errors import ConfigError, InvalidArgumentError

#: Luminance gap between text and its background below which a line counts as illegible (not drawn).
MIN_CONTRAST = 90.0
#: Luminance spread above which a background is too busy for text without an outline.
BUSY_STD = 40.0
#: The seed of each split; ``test`` is never used for choosing anything.
SPLIT_SEEDS = {"val": 22_001, "test": 22_002}

# Live-stream phrases: overlays, banners, stickers, captions and HUD words as streamers write them.
PHRASES_ZH = (
    "关注主播", "点赞加关注", "欢迎来到直播间", "感谢老铁的火箭", "今晚八点开播", "限时秒杀", "全场包邮",
    "新人专享", "福利来了", "下单立减", "直播间专属价", "点击购物车", "主播推荐", "正品保障", "七天无理由退货",
    "谢谢大家", "哈哈哈哈", "加油加油", "冲冲冲", "666", "一起来玩", "王者荣耀", "和平精英", "英雄联盟",
    "决赛圈", "吃鸡啦", "胜利", "失败", "继续挑战", "排位赛", "最强王者", "连胜中", "击杀", "助攻",
    "今日话题", "聊天交友", "唱歌跳舞", "户外直播", "美食分享", "旅行日记", "学习打卡", "早上好", "晚安",
    "生日快乐", "新年快乐", "恭喜发财", "万事如意", "开心每一天", "热门推荐", "实时热度", "在线人数",
    "粉丝团", "守护主播", "送礼物", "抽奖开始", "倒计时", "活动规则", "请勿刷屏", "文明发言", "禁止广告",
    "客服电话", "联系方式", "扫码关注", "长按识别", "官方网站", "会员中心", "充值优惠", "首充双倍",
    "星光闪耀", "音乐现场", "舞蹈教学", "游戏解说", "电竞比赛", "决战到底", "发财", "发货", "电话",
    "关闭", "进入房间", "开始直播", "结束直播", "离开一下", "马上回来", "稍后见", "谢谢关注",
)
PHRASES_EN = (
    "LIVE", "Follow me", "Subscribe", "Thanks for the gift", "Happy Birthday", "GAME OVER", "VICTORY",
    "Good luck", "Welcome", "NEW", "SALE", "FREE SHIPPING", "Top fan", "Level up", "Online", "Hello world",
    "MVP", "Double Kill", "Be right back", "Good night", "Coffee time", "Music", "Dance party", "VIP",
)
MIXED = ("VIP{n}", "第{n}名", "在线{n}人", "¥{n}", "{n}元", "LV{n}", "{n}连胜", "限量{n}件", "第{n}关", "Top{n}",
         "直播{n}天", "ID:{n}", "{n}%", "x{n}")


@dataclass(frozen=True)
class FontFace:
    """One face of an installed font file (``index`` into a .ttc collection)."""

    path: str
    index: int
    name: str

    def at(self, size: int) -> ImageFont.FreeTypeFont:
        return _truetype(self.path, self.index, size)

    def covers(self, text: str) -> bool:
        """Whether the face has a glyph for every non-space character (Droid Sans Fallback has no Latin)."""
        cmap = _cmap(self.path, self.index)
        return all(ord(c) in cmap for c in text if not c.isspace())


@functools.lru_cache(maxsize=256)
def _truetype(path: str, index: int, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, max(6, int(size)), index=index)


@functools.lru_cache(maxsize=64)
def _cmap(path: str, index: int) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    return frozenset(TTFont(path, fontNumber=index, lazy=True).getBestCmap())


# Font files of the Debian CJK packages (fonts-wqy-microhei/-zenhei, -arphic-ukai/-uming, -noto-cjk,
# -droid-fallback, -lxgw-wenkai), with the simplified-Chinese face of each collection.
CJK_FACES = (
    ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", 0),
    ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", 0),
    ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", 2),
    ("/usr/share/fonts/truetype/arphic/ukai.ttc", 0),
    ("/usr/share/fonts/truetype/arphic/uming.ttc", 0),
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 2),
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc", 2),
    ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc", 2),
    ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Bold.ttc", 2),
    ("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf", 0),
    ("/usr/share/fonts/truetype/lxgw-wenkai/LXGWWenKai-Regular.ttf", 0),
    ("/usr/share/fonts/truetype/lxgw-wenkai/LXGWWenKai-Bold.ttf", 0),
    ("/usr/share/fonts/truetype/lxgw-wenkai/LXGWWenKai-Light.ttf", 0),
)


def cjk_faces() -> list[FontFace]:
    """Every installed face of :data:`CJK_FACES`.

    Raises:
        ConfigError: None is installed (``scripts/setup.sh`` installs them).
    """
    out = []
    for path, index in CJK_FACES:
        if Path(path).is_file():
            name = " ".join(_truetype(path, index, 20).getname())
            out.append(FontFace(path, index, name))
    if not out:
        raise ConfigError("no CJK font installed: run scripts/setup.sh (it installs the Debian CJK font packages)")
    return out


@dataclass
class TextSample:
    """One evaluation image and the lines it shows, top to bottom."""

    image: np.ndarray
    lines: list[str]
    attrs: dict[str, object] = field(default_factory=dict)


def phrase(rng: np.random.Generator) -> str:
    """A live-stream phrase: Chinese (60%), English (20%) or a mixed template with a number."""
    r = rng.random()
    if r < 0.6:
        return str(rng.choice(PHRASES_ZH))
    if r < 0.8:
        return str(rng.choice(PHRASES_EN))
    return str(rng.choice(MIXED)).format(n=int(rng.choice([rng.integers(1, 10), rng.integers(10, 1000)])))


def normalise(text: str) -> str:
    """The form lines are compared in: NFKC (full-width ``！`` is ``!``) without whitespace."""
    return "".join(unicodedata.normalize("NFKC", text).split())


def _background_photos(split: str) -> list[np.ndarray]:
    """Real photos without text of their own; ``val`` and ``test`` take alternate ones."""
    from livelens.evaluation import real_photos

    skip = ("icdar", "ocr_demo", "page", "skimage/text")
    photos = [img for name, img in real_photos() if not any(s in name for s in skip)]
    return photos[0::2] if split == "val" else photos[1::2]


def _photo_crop(rng: np.random.Generator, photo: np.ndarray, w: int, h: int) -> np.ndarray:
    ph, pw = photo.shape[:2]
    scale = max(w / pw, h / ph) * rng.uniform(1.0, 2.5)
    if scale > 1.0 or rng.random() < 0.5:
        photo = np.asarray(Image.fromarray(photo).resize((max(w, round(pw * scale)), max(h, round(ph * scale)))))
    ph, pw = photo.shape[:2]
    y, x = int(rng.integers(0, ph - h + 1)), int(rng.integers(0, pw - w + 1))
    return photo[y:y + h, x:x + w].copy()


def render_sample(rng: np.random.Generator, faces: Sequence[FontFace], photos: Sequence[np.ndarray],
                  tight_share: float = 0.5, convert: Callable[[str], str] | None = None) -> TextSample:
    """One user-style text image (see the module doc); ``convert`` rewrites each phrase (e.g. to traditional)."""
    n_lines = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
    texts = [phrase(rng) for _ in range(n_lines)]
    if convert is not None:
        texts = [convert(t) for t in texts]
    usable = [f for f in faces if all(f.covers(t) for t in texts)]
    face = usable[int(rng.integers(len(usable)))]
    size = int(rng.integers(16, 61))
    font = face.at(size)
    style = str(rng.choice(["plain", "plain", "outline", "shadow", "card"]))
    boxes = [font.getbbox(t, stroke_width=max(1, size // 14)) for t in texts]
    gap = round(size * rng.uniform(0.25, 0.6))
    text_w = max(b[2] - b[0] for b in boxes)
    text_h = sum(b[3] - b[1] for b in boxes) + gap * (n_lines - 1)
    tight = bool(rng.random() < tight_share)
    if tight:
        mx, my = (int(rng.integers(0, max(2, size // 10) + 1)) for _ in range(2))
    else:
        mx, my = (round(size * rng.uniform(0.3, 1.5)) for _ in range(2))
    w, h = text_w + 2 * mx, text_h + 2 * my
    bg = _photo_crop(rng, photos[int(rng.integers(len(photos)))], w, h)
    canvas = Image.fromarray(bg).convert("RGBA")
    if style == "card":
        card = tuple(int(v) for v in rng.integers(0, 256, 3))
        overlay = Image.new("RGBA", canvas.size, (*card, int(rng.integers(170, 256))))
        canvas = Image.alpha_composite(canvas, overlay)
    local = np.asarray(canvas.convert("RGB"))[my:h - my or None, mx:w - mx or None].reshape(-1, 3).astype(np.float32)
    lum = float((local @ [0.299, 0.587, 0.114]).mean())
    if style in ("plain", "shadow") and float((local @ [0.299, 0.587, 0.114]).std()) > BUSY_STD:
        # Plain text over a busy photo is illegible to people too; captions there carry an outline.
        style = "outline"
    stroke = max(1, size // 14) if style == "outline" else 0
    if style == "outline":
        fg = tuple(int(v) for v in rng.integers(0, 256, 3))
        edge = (0, 0, 0) if float(np.dot(fg, [0.299, 0.587, 0.114])) > 110 else (255, 255, 255)
    else:
        fg = _legible_colour(rng, lum)
        edge = (0, 0, 0)
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    shadow = Image.new("RGBA", canvas.size, (0, 0, 0, 0)) if style == "shadow" else None
    y = my
    align = str(rng.choice(["left", "center"]))
    for text, (x0, y0, x1, y1) in zip(texts, boxes, strict=True):
        x = mx + (0 if align == "left" else (text_w - (x1 - x0)) // 2)
        pos = (x - x0, y - y0)
        if shadow is not None:
            off = max(1, size // 16)
            ImageDraw.Draw(shadow).text((pos[0] + off, pos[1] + off), text, font=font, fill=(0, 0, 0, 200))
        draw.text(pos, text, font=font, fill=(*fg, 255), stroke_width=stroke, stroke_fill=(*edge, 255))
        y += (y1 - y0) + gap
    if shadow is not None:
        canvas = Image.alpha_composite(canvas, shadow.filter(ImageFilter.GaussianBlur(max(1, size // 20))))
    canvas = Image.alpha_composite(canvas, layer).convert("RGB")
    rgb = _jpeg_roundtrip(np.asarray(canvas), int(rng.integers(70, 96)))
    return TextSample(rgb, texts, {"font": face.name, "size": size, "style": style, "tight": tight,
                                   "lines": n_lines})


def _legible_colour(rng: np.random.Generator, bg_lum: float) -> tuple[int, int, int]:
    """A text colour, often saturated, whose luminance differs from the background's by ≥ :data:`MIN_CONTRAST`."""
    for _ in range(50):
        fg = (rng.permutation([255, int(rng.integers(0, 256)), int(rng.integers(0, 80))]) if rng.random() < 0.4
              else np.full(3, int(rng.integers(0, 256))) + rng.integers(-20, 21, 3))
        fg = np.clip(fg, 0, 255)
        if abs(float(fg @ [0.299, 0.587, 0.114]) - bg_lum) >= MIN_CONTRAST:
            return tuple(int(v) for v in fg)
    return (0, 0, 0) if bg_lum > 128 else (255, 255, 255)


def _jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    import io

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def user_text_set(n: int, split: str = "test", tight_share: float = 0.5,
                  traditional: bool = False) -> list[TextSample]:
    """``n`` samples of one split (deterministic per split).

    With ``traditional``, the same samples with their Chinese in traditional characters (OpenCC's
    table): the check that the decoder's simplified preference leaves traditional text alone.

    Raises:
        InvalidArgumentError: Unknown split or ``n`` < 1.
    """
    if split not in SPLIT_SEEDS:
        raise InvalidArgumentError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    if n < 1:
        raise InvalidArgumentError(f"n must be >= 1, got {n}")
    faces, photos = cjk_faces(), _background_photos(split)
    convert = None
    if traditional:
        from livelens.ocr.decode import simplified_to_traditional

        table = simplified_to_traditional()
        convert = lambda text: "".join(table.get(c, c) for c in text)  # noqa: E731
    return [render_sample(np.random.default_rng([SPLIT_SEEDS[split], i]), faces, photos, tight_share, convert)
            for i in range(n)]


def line_accuracy(samples: Sequence[TextSample], reads: Sequence[Sequence[str]]) -> dict[str, object]:
    """Exact-line accuracy: the share of ground-truth lines found, as read, among an image's lines.

    Lines are compared after :func:`normalise`. Also split by crop (tight, padded) and by the
    number of lines, with the misses listed for the report.
    """
    hits: dict[str, list[bool]] = {"all": [], "tight": [], "padded": [], "single": [], "multi": []}
    misses = []
    for s, read in zip(samples, reads, strict=True):
        got = [normalise(t) for t in read]
        for want in s.lines:
            ok = normalise(want) in got
            for key in ("all", "tight" if s.attrs.get("tight") else "padded",
                        "single" if len(s.lines) == 1 else "multi"):
                hits[key].append(ok)
            if not ok:
                misses.append({"want": want, "read": list(read), **s.attrs})
    out: dict[str, object] = {f"{k}_acc" if k != "all" else "line_acc": (float(np.mean(v)) if v else None)
                              for k, v in hits.items()}
    out["n_lines"] = len(hits["all"])
    out["misses"] = misses
    return out
