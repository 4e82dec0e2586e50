"""Generator of labelled live-stream frames for the content-safety model.

Each frame is a real photo or procedural background with overlays pasted at known
positions: text banners, phone numbers (plain and obfuscated), URLs, WeChat/QQ IDs, real QR
codes, watermarks, logos, picture-in-picture windows, and game HUDs in two layouts; plus
black frames and frozen sequences. Labels are taxonomy names; every overlay's box is the
bounding box of the pixels it changed, and every rendered string is in ``texts``.

Frames are a pure function of ``(seed, slot)``: slot ``i`` always gives the same rows.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from livelens.data import render
from livelens.data.manifest import content_id, split_for_key

AD_LABELS = (
    "ads_qrcode", "ads_phone", "ads_url", "ads_wechat_id", "ads_qq_id", "ads_watermark", "ads_logo",
    "ads_text_banner", "ads_picture_in_picture",
)
#: Overlays that may appear in the deliberately hard "small" subset (1–5% of the frame).
SMALL_OK = ("ads_qrcode", "ads_phone", "ads_url", "ads_wechat_id", "ads_qq_id", "ads_logo", "ads_watermark")
GAME_LABELS = ("game_battle_royale", "game_honor_of_kings")

_BANNER_ZH = ["关注主播", "每晚八点准时开播", "限时优惠", "全场五折", "新人福利", "点击下方链接", "免费领取",
              "礼物抽奖", "粉丝专属福利", "直播间特价", "包邮到家", "欢迎来到直播间", "点赞过万加更", "今日爆款",
              "买一送一", "秒杀开始", "刷礼物上榜", "加入粉丝团"]
_BANNER_EN = ["FOLLOW ME", "BIG SALE 50% OFF", "LIVE NOW", "FREE GIFT", "SUBSCRIBE", "FLASH DEAL", "NEW ARRIVALS",
              "JOIN THE FAN CLUB", "TOP UP NOW"]
_BRANDS = ["星耀", "TOPLIVE", "酷玩", "MEGA", "乐购", "NOVA", "火山", "PIXEL", "极光", "ZEN"]
_WORDS = ["vip", "live", "game", "shop", "best", "happy", "star", "lucky", "king", "fun", "play", "win", "mall"]
_TLDS = ["com", "cn", "net", "top", "vip", "xyz", "cc"]
_ZH_DIGITS = "零一二三四五六七八九"
_ZH_DIGITS_FORMAL = "零壹贰叁肆伍陆柒捌玖"
_WEAPONS = ["M416", "AKM", "SCAR-L", "AWM", "Kar98k", "UMP45", "Vector", "M762", "DP-28", "S12K"]
_HEROES = ["李白", "貂蝉", "亚瑟", "后羿", "鲁班七号", "妲己", "韩信", "孙悟空"]


@dataclass(frozen=True)
class FrameConfig:
    """What the frames generator makes.

    Attributes:
        width: Landscape frame width (portrait frames swap width and height).
        height: Landscape frame height.
        portrait: Share of phone-portrait frames.
        p_negative, p_ads, p_game, p_black, p_frozen: Recipe shares per slot (normalised).
        p_small: Share of ad frames whose overlay is 1–5% of the frame.
        photo_prob: Share of real-photo backgrounds (the rest are procedural scenes).
        decoys: Add benign shapes (no text) so "any overlay" is not a shortcut for "ad".
        flat_background: Use one flat colour background (for box-coverage tests).
        jpeg_quality: Storage quality.
        game_layouts: The HUD layouts game frames draw from. ``game_racing`` is drawn only when
            asked for: the shipped models never saw it, so the labelling loop's end-to-end run
            (``benchmarks/loop_e2e.py``) uses it as the kind the service must learn.
    """

    width: int = 960
    height: int = 540
    portrait: float = 0.25
    p_negative: float = 0.22
    p_ads: float = 0.50
    p_game: float = 0.14
    p_black: float = 0.06
    p_frozen: float = 0.08
    p_small: float = 0.2
    photo_prob: float = 0.6
    decoys: bool = True
    flat_background: bool = False
    jpeg_quality: int = 90
    frozen_length: tuple[int, int] = (3, 5)
    game_layouts: tuple[str, ...] = GAME_LABELS

    def recipe_probs(self) -> dict[str, float]:
        raw = {"negative": self.p_negative, "ads": self.p_ads, "game": self.p_game, "black": self.p_black,
               "frozen": self.p_frozen}
        total = sum(raw.values())
        return {k: v / total for k, v in raw.items()}


@dataclass
class Overlay:
    """An RGBA patch plus what it means: label, rendered strings (with ink boxes) and facts."""

    label: str
    patch: Image.Image
    texts: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)
    facts: dict = field(default_factory=dict)


# ---------------------------------------------------------------- strings
def phone_number(rng: np.random.Generator) -> str:
    """A Chinese mobile number: 1, a carrier digit, nine more digits."""
    return "1" + str(rng.choice(list("35789"))) + "".join(str(d) for d in rng.integers(0, 10, 9))


def obfuscate_phone(number: str, rng: np.random.Generator) -> tuple[str, str]:
    """Show a phone number plainly or obfuscated the ways spammers do; returns (form, shown)."""
    form = str(rng.choice(["plain", "spaced", "dashed", "fullwidth", "zh_mixed", "zh_formal"]))
    if form == "spaced":
        shown = f"{number[:3]} {number[3:7]} {number[7:]}"
    elif form == "dashed":
        shown = f"{number[:3]}-{number[3:7]}-{number[7:]}"
    elif form == "fullwidth":
        shown = "".join(chr(ord(c) + 0xFEE0) for c in number)
    elif form in ("zh_mixed", "zh_formal"):
        table = _ZH_DIGITS if form == "zh_mixed" else _ZH_DIGITS_FORMAL
        swap = rng.random(len(number)) < 0.5
        shown = "".join(table[int(c)] if s else c for c, s in zip(number, swap, strict=True))
    else:
        shown = number
    return form, shown


def url_string(rng: np.random.Generator) -> str:
    word = "".join(rng.choice(_WORDS, size=int(rng.integers(1, 3))))
    num = str(int(rng.integers(1, 999))) if rng.random() < 0.5 else ""
    tld = str(rng.choice(_TLDS))
    if rng.random() < 0.5:
        return f"www.{word}{num}.{tld}"
    path = "".join(rng.choice(list(string.ascii_lowercase + string.digits), size=int(rng.integers(3, 7))))
    return f"http://{word}{num}.{tld}/{path}"


def wechat_id(rng: np.random.Generator) -> str:
    first = str(rng.choice(list(string.ascii_lowercase)))
    rest = rng.choice(list(string.ascii_lowercase + string.digits + "_"), size=int(rng.integers(5, 12)))
    return first + "".join(rest)


def qq_id(rng: np.random.Generator) -> str:
    return str(int(rng.integers(1, 10))) + "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(5, 10))))


def _rgb(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _contrast_fg(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    return (20, 20, 20) if sum(bg) > 380 else (250, 250, 250)


# ---------------------------------------------------------------- overlays
def _pill(text: str, size: int, rng: np.random.Generator, bg: tuple[int, int, int] | None = None) -> Overlay:
    bg = bg or _rgb(rng)
    patch, ink = render.text_patch(text, size, _contrast_fg(bg), bg, pad=0.35, radius=float(rng.uniform(0, 0.5)))
    return Overlay("", patch, [(text, ink)])


def _icon_text(icon: Callable[[ImageDraw.ImageDraw, int, int], None], text: str, size: int,
               bg: tuple[int, int, int]) -> Overlay:
    """Icon on the left, text on the right, on one rounded tag (WeChat / QQ style)."""
    tpatch, ink = render.text_patch(text, size, _contrast_fg(bg), None, pad=0.35)
    h = tpatch.height
    patch = Image.new("RGBA", (h + tpatch.width, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(patch)
    d.rounded_rectangle([0, 0, patch.width - 1, h - 1], radius=h // 3, fill=(*bg, 255))
    icon(d, h, h)
    patch.alpha_composite(tpatch, (h, 0))
    return Overlay("", patch, [(text, (ink[0] + h, ink[1], ink[2] + h, ink[3]))])


def _wechat_icon(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    # Two overlapping speech bubbles, the WeChat shape.
    d.ellipse([w * 0.1, h * 0.18, w * 0.68, h * 0.7], fill=(255, 255, 255))
    d.ellipse([w * 0.38, h * 0.38, w * 0.9, h * 0.84], fill=(230, 255, 230), outline=(7, 193, 96))


def _qq_icon(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    # A penguin: black body, white belly, yellow feet.
    d.ellipse([w * 0.25, h * 0.12, w * 0.75, h * 0.82], fill=(20, 20, 20))
    d.ellipse([w * 0.35, h * 0.38, w * 0.65, h * 0.8], fill=(255, 255, 255))
    d.ellipse([w * 0.25, h * 0.76, w * 0.48, h * 0.9], fill=(255, 200, 0))
    d.ellipse([w * 0.52, h * 0.76, w * 0.75, h * 0.9], fill=(255, 200, 0))


def make_overlay(label: str, rng: np.random.Generator, size: int, frame: tuple[int, int]) -> Overlay:
    """Render one overlay of ``label`` at a nominal font/module ``size`` in px."""
    if label == "ads_phone":
        number = phone_number(rng)
        form, shown = obfuscate_phone(number, rng)
        text = f"{rng.choice(['电话', '手机', 'Tel', '热线', '联系'])}: {shown}"
        ov = _pill(text, size, rng)
        ov.facts = {"kind": "phone", "value": number, "form": form, "shown": shown}
    elif label == "ads_url":
        url = url_string(rng)
        ov = _pill(url, size, rng)
        ov.facts = {"kind": "url", "value": url}
    elif label == "ads_wechat_id":
        wid = wechat_id(rng)
        text = f"{rng.choice(['微信', 'VX', '加微', 'wx', '薇信'])}: {wid}"
        ov = _icon_text(_wechat_icon, text, size, (7, 193, 96) if rng.random() < 0.7 else _rgb(rng))
        ov.facts = {"kind": "wechat_id", "value": wid}
    elif label == "ads_qq_id":
        qid = qq_id(rng)
        text = f"{rng.choice(['QQ', '扣扣', 'Q群', '企鹅'])}: {qid}"
        ov = _icon_text(_qq_icon, text, size, (18, 150, 219) if rng.random() < 0.7 else _rgb(rng))
        ov.facts = {"kind": "qq_id", "value": qid}
    elif label == "ads_qrcode":
        payload = url_string(rng) if rng.random() < 0.6 else f"https://u.wechat.com/{wechat_id(rng)}"
        ov = Overlay("", render.qr_patch(payload, max(2, size // 10)))
        ov.facts = {"kind": "qrcode", "payload": payload}
    elif label == "ads_text_banner":
        text = str(rng.choice(_BANNER_ZH)) + (" " + str(rng.choice(_BANNER_ZH)) if rng.random() < 0.5 else "")
        if rng.random() < 0.3:
            text = str(rng.choice(_BANNER_EN))
        bg = _rgb(rng)
        patch, ink = render.text_patch(text, size, _contrast_fg(bg), bg, pad=0.5, radius=0.0)
        # Stretch the strip so it spans much of the frame, as banner ads do.
        width = max(patch.width, int(frame[0] * rng.uniform(0.5, 0.9)))
        strip = Image.new("RGBA", (min(width, frame[0]), patch.height), (*bg, 255))
        off = (strip.width - patch.width) // 2
        strip.alpha_composite(patch, (max(0, off), 0))
        ov = Overlay("", strip, [(text, (ink[0] + off, ink[1], ink[2] + off, ink[3]))], {"kind": "banner", "value": text})
    elif label == "ads_watermark":
        text = f"@{rng.choice(_BRANDS)}{rng.choice(['直播', 'TV', ''])}{int(rng.integers(100, 99999))}"
        alpha = int(rng.integers(90, 150))
        patch, ink = render.text_patch(text, size, (255, 255, 255, alpha), None, pad=0.2, stroke=1,
                                       stroke_fill=(0, 0, 0, alpha))
        ov = Overlay("", patch, [(text, ink)], {"kind": "watermark", "value": text, "alpha": alpha})
    elif label == "ads_logo":
        brand = str(rng.choice(_BRANDS))
        colour = _rgb(rng, 30, 230)
        tpatch, ink = render.text_patch(brand, size, _contrast_fg(colour), None, pad=0.2)
        s = tpatch.height * 2
        patch = Image.new("RGBA", (s + tpatch.width + 8, s), (0, 0, 0, 0))
        d = ImageDraw.Draw(patch)
        shape = str(rng.choice(["circle", "hexagon", "square", "diamond"]))
        if shape == "circle":
            d.ellipse([0, 0, s - 1, s - 1], fill=(*colour, 255))
        elif shape == "square":
            d.rounded_rectangle([0, 0, s - 1, s - 1], radius=s // 5, fill=(*colour, 255))
        else:
            n = 6 if shape == "hexagon" else 4
            ang = np.linspace(0, 2 * np.pi, n, endpoint=False) + (np.pi / 2 if n == 4 else 0)
            d.polygon([(s / 2 + s / 2 * np.cos(a), s / 2 + s / 2 * np.sin(a)) for a in ang], fill=(*colour, 255))
        d.text((s * 0.3, s * 0.25), brand[0], font=render.font(int(s * 0.5)), fill=(255, 255, 255, 255))
        d.rounded_rectangle([s + 2, s // 4, patch.width - 1, s // 4 + tpatch.height], radius=4, fill=(*colour, 255))
        patch.alpha_composite(tpatch, (s + 4, s // 4))
        ov = Overlay("", patch, [(brand, (ink[0] + s + 4, ink[1] + s // 4, ink[2] + s + 4, ink[3] + s // 4))],
                     {"kind": "logo", "value": brand, "shape": shape})
    elif label == "ads_picture_in_picture":
        w = int(frame[0] * rng.uniform(0.22, 0.35))
        h = int(w * (9 / 16 if rng.random() < 0.6 else 16 / 9))
        h = min(h, int(frame[1] * 0.6))
        _, inner = render.background(w, h, rng, photo_prob=0.7)
        border = max(2, w // 60)
        patch = Image.new("RGBA", (w + 2 * border, h + 2 * border), (*_rgb(rng, 200, 256), 255))
        patch.paste(Image.fromarray(inner), (border, border))
        ov = Overlay("", patch, [], {"kind": "pip"})
    else:
        raise ValueError(f"no overlay renderer for {label!r}")
    ov.label = label
    return ov


def _fit_overlay(label: str, rng: np.random.Generator, area: float, frame: tuple[int, int]) -> Overlay:
    """Render ``label`` so its patch covers about ``area`` px² and fits in the frame."""
    probe = make_overlay(label, np.random.default_rng(rng.integers(2**32)), 40, frame)
    if label in ("ads_picture_in_picture", "ads_text_banner"):
        # These take their size from the frame; only the font of the banner scales.
        size = 40 if label == "ads_picture_in_picture" else int(np.clip(frame[1] * rng.uniform(0.06, 0.1), 14, 200))
    else:
        size = int(np.clip(40 * np.sqrt(area / (probe.patch.width * probe.patch.height)), 10, 400))
    ov = make_overlay(label, rng, size, frame)
    fw, fh = frame
    if ov.patch.width > fw * 0.95 or ov.patch.height > fh * 0.95:
        s = min(fw * 0.95 / ov.patch.width, fh * 0.95 / ov.patch.height)
        ov.patch = ov.patch.resize((max(1, int(ov.patch.width * s)), max(1, int(ov.patch.height * s))), Image.LANCZOS)
        ov.texts = [(t, tuple(v * s for v in box)) for t, box in ov.texts]
    return ov


def _place(ov: Overlay, rng: np.random.Generator, frame: tuple[int, int], taken: list[tuple[int, int, int, int]],
           corner: bool = False) -> tuple[int, int] | None:
    """A position where the patch fits inside the frame without overlapping earlier overlays."""
    fw, fh = frame
    w, h = ov.patch.size
    for _ in range(40):
        if corner:
            x = int(rng.choice([int(fw * 0.02), fw - w - int(fw * 0.02)]))
            y = int(rng.choice([int(fh * 0.02), fh - h - int(fh * 0.02)]))
        else:
            x = int(rng.integers(0, max(1, fw - w + 1)))
            y = int(rng.integers(0, max(1, fh - h + 1)))
        x, y = max(0, min(x, fw - w)), max(0, min(y, fh - h))
        box = (x, y, x + w, y + h)
        if all(box[2] <= t[0] or box[0] >= t[2] or box[3] <= t[1] or box[1] >= t[3] for t in taken):
            return x, y
    return None


def _decoys(img: Image.Image, rng: np.random.Generator, taken: list) -> None:
    """Benign shapes without text (stickers, hearts, balls)."""
    d = ImageDraw.Draw(img, "RGBA")
    fw, fh = img.size
    for _ in range(int(rng.integers(0, 4))):
        r = int(min(fw, fh) * rng.uniform(0.03, 0.09))
        x, y = int(rng.integers(r, fw - r)), int(rng.integers(r, fh - r))
        box = (x - r, y - r, x + r, y + r)
        if any(not (box[2] <= t[0] or box[0] >= t[2] or box[3] <= t[1] or box[1] >= t[3]) for t in taken):
            continue
        colour = (*_rgb(rng), int(rng.integers(150, 256)))
        kind = int(rng.integers(3))
        if kind == 0:
            d.ellipse(box, fill=colour)
        elif kind == 1:
            d.rectangle(box, fill=colour)
        else:
            d.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=colour)


# ---------------------------------------------------------------- game HUDs
def _hud_text(d: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int,
              texts: list, fill=(255, 255, 255)) -> tuple[int, int, int, int]:
    f = render.font(size)
    x0, y0, x1, y1 = d.textbbox(xy, text, font=f, stroke_width=1)
    d.text(xy, text, font=f, fill=fill, stroke_width=1, stroke_fill=(0, 0, 0))
    texts.append((text, (x0, y0, x1, y1)))
    return x0, y0, x1, y1


def draw_hud(img: Image.Image, layout: str, rng: np.random.Generator) -> tuple[dict, list, list]:
    """Draw a game HUD in place.

    Returns:
        (field values, text lines [(text, ink box)], panel boxes) for the frame.
    """
    d = ImageDraw.Draw(img, "RGBA")
    fw, fh = img.size
    s = min(fw, fh)
    fs = max(12, int(s * 0.045))
    texts: list = []
    panels: list = []
    if layout == "game_battle_royale":
        fields = {"alive": int(rng.integers(2, 100)), "kills": int(rng.integers(0, 20)),
                  "weapon": str(rng.choice(_WEAPONS)), "ammo": f"{int(rng.integers(0, 41))}/{int(rng.integers(0, 241))}",
                  "distance": f"{int(rng.integers(10, 900))}m"}
        # Minimap, top right: grid and a player arrow.
        m = int(s * 0.28)
        box = (fw - m - 8, 8, fw - 8, 8 + m)
        d.rectangle(box, fill=(60, 80, 50, 200), outline=(255, 255, 255, 230), width=2)
        for k in range(1, 4):
            d.line([(box[0] + k * m / 4, box[1]), (box[0] + k * m / 4, box[3])], fill=(255, 255, 255, 90))
            d.line([(box[0], box[1] + k * m / 4), (box[2], box[1] + k * m / 4)], fill=(255, 255, 255, 90))
        cx, cy = box[0] + m * rng.uniform(0.2, 0.8), box[1] + m * rng.uniform(0.2, 0.8)
        d.polygon([(cx, cy - 6), (cx + 5, cy + 5), (cx - 5, cy + 5)], fill=(255, 220, 0, 255))
        panels.append(box)
        b1 = _hud_text(d, (box[0], box[3] + 6), f"存活 {fields['alive']}", fs, texts)
        b2 = _hud_text(d, (b1[2] + fs // 2, box[3] + 6), f"击败 {fields['kills']}", fs, texts, fill=(255, 80, 60))
        panels.append((b1[0], b1[1], b2[2], b2[3]))
        # Compass strip, top centre.
        cw = int(fw * 0.4)
        cbox = (fw // 2 - cw // 2, 6, fw // 2 + cw // 2, 6 + fs + 8)
        d.rectangle(cbox, fill=(0, 0, 0, 90))
        heading = int(rng.integers(0, 360)) // 15 * 15
        marks = "  ".join(str((heading + k * 15) % 360) for k in range(-3, 4))
        _hud_text(d, (cbox[0] + 6, cbox[1] + 2), marks, int(fs * 0.8), texts)
        panels.append(cbox)
        # Weapon panel and health bar, bottom centre.
        wtext = f"{fields['weapon']}  {fields['ammo']}"
        wb = _hud_text(d, (fw // 2 - fs * 3, fh - fs * 3.2), wtext, fs, texts)
        hb = (fw // 2 - int(fw * 0.18), fh - fs - 10, fw // 2 + int(fw * 0.18), fh - 10)
        d.rectangle(hb, fill=(0, 0, 0, 140), outline=(255, 255, 255, 200))
        hp = rng.uniform(0.1, 1.0)
        d.rectangle((hb[0] + 2, hb[1] + 2, hb[0] + 2 + int((hb[2] - hb[0] - 4) * hp), hb[3] - 2), fill=(240, 240, 240, 230))
        panels.append((min(wb[0], hb[0]), wb[1], max(wb[2], hb[2]), hb[3]))
        # Distance marker near the centre.
        mb = _hud_text(d, (fw * rng.uniform(0.3, 0.6), fh * rng.uniform(0.35, 0.55)), fields["distance"], int(fs * 0.8),
                       texts, fill=(255, 210, 0))
        panels.append(mb)
    elif layout == "game_racing":
        fields = {"speed": int(rng.integers(40, 330)), "position": int(rng.integers(1, 13)),
                  "lap": int(rng.integers(1, 4)), "time": f"{int(rng.integers(0, 3)):02d}:"
                  f"{int(rng.integers(0, 60)):02d}.{int(rng.integers(0, 1000)):03d}", "gear": int(rng.integers(1, 8))}
        # Speedometer, bottom right: a dial with ticks, a needle, the gear and the speed.
        r = int(s * 0.16)
        cx, cy = fw - r - 12, fh - r - 12
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(15, 15, 20, 190), outline=(230, 230, 230, 255), width=3)
        for t in np.deg2rad(np.linspace(135, 405, 10)):
            d.line([(cx + 0.8 * r * np.cos(t), cy + 0.8 * r * np.sin(t)), (cx + 0.95 * r * np.cos(t),
                    cy + 0.95 * r * np.sin(t))], fill=(230, 230, 230, 255), width=2)
        t = np.deg2rad(135 + 270 * fields["speed"] / 340)
        d.line([(cx, cy), (cx + 0.85 * r * np.cos(t), cy + 0.85 * r * np.sin(t))], fill=(255, 60, 40, 255), width=4)
        _hud_text(d, (cx - fs * 0.3, cy - r * 0.55), str(fields["gear"]), fs, texts, fill=(255, 200, 0))
        _hud_text(d, (cx - fs * 1.6, cy + r * 0.25), f"{fields['speed']} km/h", int(fs * 0.8), texts)
        panels.append((cx - r, cy - r, cx + r + 1, cy + r + 1))
        # Position and lap, top left; lap time, top right.
        pb = _hud_text(d, (12, 8), f"P{fields['position']}/12", int(fs * 1.5), texts, fill=(255, 220, 0))
        lb = _hud_text(d, (12, pb[3] + 4), f"LAP {fields['lap']}/3", fs, texts)
        panels.append((pb[0], pb[1], max(pb[2], lb[2]), lb[3]))
        tb = _hud_text(d, (fw - fs * 6, 8), fields["time"], fs, texts)
        panels.append(tb)
        # Track map, bottom left: a closed loop with the cars on it.
        m = int(s * 0.26)
        box = (10, fh - m - 10, 10 + m, fh - 10)
        d.rounded_rectangle(box, radius=m // 8, fill=(10, 10, 10, 160), outline=(200, 200, 200, 220), width=2)
        ang = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        rad = 0.35 * m * (1 + 0.25 * np.sin(3 * ang + rng.uniform(0, 6)))
        track = [(box[0] + m / 2 + rr * np.cos(a), box[1] + m / 2 + rr * np.sin(a)) for a, rr in zip(ang, rad, strict=True)]
        d.line([*track, track[0]], fill=(240, 240, 240, 255), width=3)
        for i in rng.choice(len(track), size=4, replace=False):
            x, y = track[i]
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(255, 60, 60, 255) if i % 2 else (60, 160, 255, 255))
        panels.append(box)
    else:
        k, dd, a = (int(v) for v in rng.integers(0, 16, 3))
        mins, secs = int(rng.integers(0, 30)), int(rng.integers(0, 60))
        fields = {"kda": f"{k}/{dd}/{a}", "gold": int(rng.integers(300, 20000)), "time": f"{mins:02d}:{secs:02d}",
                  "score": f"{int(rng.integers(0, 40))}-{int(rng.integers(0, 40))}", "hero": str(rng.choice(_HEROES))}
        # Minimap, top left: square with three lanes.
        m = int(s * 0.3)
        box = (8, 8, 8 + m, 8 + m)
        d.rectangle(box, fill=(30, 70, 40, 210), outline=(200, 180, 120, 255), width=3)
        d.line([(box[0], box[3]), (box[2], box[1])], fill=(220, 200, 140, 200), width=3)
        d.line([(box[0] + 4, box[1] + 4), (box[0] + 4, box[3] - 4), (box[2] - 4, box[3] - 4)], fill=(220, 200, 140, 200), width=3)
        d.line([(box[0] + 4, box[1] + 4), (box[2] - 4, box[1] + 4), (box[2] - 4, box[3] - 4)], fill=(220, 200, 140, 200), width=3)
        d.ellipse([box[0] + 4, box[3] - 18, box[0] + 18, box[3] - 4], fill=(60, 140, 255, 255))
        d.ellipse([box[2] - 18, box[1] + 4, box[2] - 4, box[1] + 18], fill=(255, 60, 60, 255))
        panels.append(box)
        # Score, timer, K/D/A and gold: top centre / right.
        tb = _hud_text(d, (fw // 2 - fs * 2, 8), f"{fields['score'].replace('-', ' vs ')}", fs, texts)
        tt = _hud_text(d, (fw // 2 - fs, tb[3] + 4), fields["time"], int(fs * 0.8), texts)
        panels.append((min(tb[0], tt[0]), tb[1], max(tb[2], tt[2]), tt[3]))
        kb = _hud_text(d, (fw - fs * 7, 8), f"KDA {fields['kda']}", fs, texts)
        gb = _hud_text(d, (fw - fs * 7, kb[3] + 4), f"金币 {fields['gold']}", fs, texts, fill=(255, 215, 0))
        panels.append((min(kb[0], gb[0]), kb[1], max(kb[2], gb[2]), gb[3]))
        # Skill buttons bottom right, joystick bottom left.
        r = int(s * 0.07)
        cx, cy = fw - 3 * r, fh - 3 * r
        pts = [(cx, cy, int(r * 1.4))] + [(cx + int(2.6 * r * np.cos(t)), cy + int(2.6 * r * np.sin(t)), r)
                                          for t in np.deg2rad([180, 225, 270])]
        for x, y, rr in pts:
            d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=(40, 60, 120, 200), outline=(220, 220, 255, 255), width=2)
        panels.append((min(x - rr for x, y, rr in pts), min(y - rr for x, y, rr in pts),
                       min(fw - 1, max(x + rr for x, y, rr in pts)), min(fh - 1, max(y + rr for x, y, rr in pts))))
        jr = int(s * 0.13)
        jx, jy = 3 * jr // 2 + 8, fh - 3 * jr // 2 - 8
        d.ellipse([jx - jr, jy - jr, jx + jr, jy + jr], fill=(255, 255, 255, 60), outline=(255, 255, 255, 160), width=2)
        d.ellipse([jx - jr // 3, jy - jr // 3, jx + jr // 3, jy + jr // 3], fill=(255, 255, 255, 150))
        panels.append((jx - jr, jy - jr, jx + jr + 1, jy + jr + 1))
    return fields, texts, panels


# ---------------------------------------------------------------- frames
def _clip_box(box, fw: int, fh: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return (float(max(0, x0)), float(max(0, y0)), float(min(fw, x1)), float(min(fh, y1)))


def _poly(box) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _row(rgb: np.ndarray, labels: list[str], boxes: list[dict], texts: list[dict], attrs: dict, cfg: FrameConfig,
         split_key: str | None = None) -> dict:
    data = render.encode_jpeg_bytes(rgb, cfg.jpeg_quality)
    rid = content_id(data)
    return {
        "id": rid,
        "image_bytes": data,
        "width": rgb.shape[1],
        "height": rgb.shape[0],
        "source": "synthetic:frames",
        "split": split_for_key(split_key or rid),
        "labels": sorted(set(labels)),
        "boxes": boxes,
        "texts": texts,
        "attributes": attrs,
    }


def _compose(rng: np.random.Generator, cfg: FrameConfig, recipe: str, fw: int, fh: int) -> tuple:
    """Render one frame of ``recipe``; returns (rgb, labels, boxes, texts, attributes)."""
    if cfg.flat_background:
        bg_name, bg = "flat", np.full((fh, fw, 3), 128, np.uint8)
    elif recipe == "game":
        bg_name, bg = render.procedural_scene(fw, fh, rng, kind=str(rng.choice(["terrain", "tiles"])))
        if rng.random() < 0.4:
            name, photo = render.background(fw, fh, rng, photo_prob=1.0)
            bg_name, bg = name, (photo.astype(np.float32) * 0.5 + bg * 0.5).astype(np.uint8)
    else:
        bg_name, bg = render.background(fw, fh, rng, cfg.photo_prob)
    img = Image.fromarray(bg).convert("RGBA")
    labels: list[str] = []
    boxes: list[dict] = []
    texts: list[dict] = []
    attrs: dict = {"recipe": recipe, "background": bg_name, "orientation": "portrait" if fh > fw else "landscape"}
    taken: list[tuple[int, int, int, int]] = []

    if recipe == "game":
        layout = cfg.game_layouts[int(rng.integers(len(cfg.game_layouts)))]
        fields, hud_texts, panels = draw_hud(img, layout, rng)
        labels += [layout, "scene_game_screen"]
        attrs["hud"] = {"layout": layout, **fields}
        for p in panels:
            b = _clip_box(p, fw, fh)
            boxes.append({"label": layout, "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3]})
            taken.append(tuple(int(v) for v in b))
        texts += [{"polygon": _poly(_clip_box(b, fw, fh)), "text": t} for t, b in hud_texts]
        ad_labels = [str(rng.choice(AD_LABELS[:5]))] if rng.random() < 0.25 else []
    elif recipe == "ads":
        ad_labels = list(rng.choice(AD_LABELS, size=1 if rng.random() < 0.6 else 2, replace=False))
    else:
        ad_labels = []

    small = recipe == "ads" and rng.random() < cfg.p_small and all(lbl in SMALL_OK for lbl in ad_labels)
    if small:
        attrs["small"] = True
    overlays_meta = []
    for label in ad_labels:
        frac = rng.uniform(0.01, 0.05) if small else rng.uniform(0.05, 0.14)
        ov = _fit_overlay(label, rng, frac * fw * fh, (fw, fh))
        pos = _place(ov, rng, (fw, fh), taken, corner=label == "ads_watermark" and rng.random() < 0.7)
        if pos is None:
            continue
        x, y = pos
        img.alpha_composite(ov.patch, (x, y))
        ax0, ay0, ax1, ay1 = render.alpha_bbox(ov.patch)
        b = _clip_box((x + ax0, y + ay0, x + ax1, y + ay1), fw, fh)
        taken.append((x, y, x + ov.patch.width, y + ov.patch.height))
        labels.append(label)
        boxes.append({"label": label, "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3]})
        for t, tb in ov.texts:
            texts.append({"polygon": _poly(_clip_box((x + tb[0], y + tb[1], x + tb[2], y + tb[3]), fw, fh)), "text": t})
        overlays_meta.append({"label": label, "box": list(b), "area_frac": round((b[2] - b[0]) * (b[3] - b[1]) / (fw * fh), 4),
                              **ov.facts})
    if overlays_meta:
        attrs["overlays"] = overlays_meta
    if cfg.decoys and not cfg.flat_background:
        _decoys(img, rng, taken)
    return np.asarray(img.convert("RGB")), labels, boxes, texts, attrs


def pick_recipe(rng: np.random.Generator, cfg: FrameConfig) -> str:
    probs = cfg.recipe_probs()
    return str(rng.choice(list(probs), p=list(probs.values())))


def generate_slot(seed: int, slot: int, cfg: FrameConfig = FrameConfig()) -> list[dict]:
    """The manifest rows of one slot: one frame, or a frozen sequence of several.

    Args:
        seed: Dataset seed.
        slot: Slot index; ``(seed, slot)`` fully determines the output bytes.
        cfg: What to make.
    """
    rng = np.random.default_rng([seed, slot])
    recipe = pick_recipe(rng, cfg)
    portrait = rng.random() < cfg.portrait
    fw, fh = (cfg.height, cfg.width) if portrait else (cfg.width, cfg.height)
    if recipe == "black":
        level = int(rng.integers(0, 12))
        rgb = np.clip(rng.normal(level, 1.5, (fh, fw, 3)), 0, 255).astype(np.uint8)
        return [_row(rgb, ["quality_black"], [], [], {"recipe": "black", "mean": level,
                                                     "orientation": "portrait" if portrait else "landscape"}, cfg)]
    if recipe == "frozen":
        base_recipe = str(rng.choice(["negative", "ads", "game"]))
        rgb, labels, boxes, texts, attrs = _compose(rng, cfg, base_recipe, fw, fh)
        seq = f"seq-{seed}-{slot}"
        length = int(rng.integers(cfg.frozen_length[0], cfg.frozen_length[1] + 1))
        rows = []
        for i in range(length):
            # Near-identical: tiny sensor noise, as a stalled encoder re-sending one picture.
            noisy = rgb if i == 0 else np.clip(rgb.astype(np.int16) + rng.integers(-2, 3, rgb.shape), 0, 255).astype(np.uint8)
            a = {**attrs, "recipe": "frozen", "base_recipe": base_recipe, "sequence": seq, "index": i, "temporal": True}
            extra = ["quality_frozen"] if i > 0 else []
            # The whole sequence shares one split, or near-duplicates would leak across splits.
            rows.append(_row(noisy, labels + extra, boxes, texts, a, cfg, split_key=seq))
        return rows
    rgb, labels, boxes, texts, attrs = _compose(rng, cfg, recipe, fw, fh)
    return [_row(rgb, labels, boxes, texts, attrs, cfg)]


def generate_frames(start: int, count: int, seed: int = 0, cfg: FrameConfig = FrameConfig()) -> list[dict]:
    """Rows of slots ``start .. start + count - 1`` (a chunk, for one Ray task)."""
    rows: list[dict] = []
    for slot in range(start, start + count):
        rows.extend(generate_slot(seed, slot, cfg))
    return rows


def frames_card(seed: int, slots: int, cfg: FrameConfig) -> dict:
    """The dataset card fields this generator contributes."""
    return {
        "name": "frames",
        "version": 1,
        "generator": "livelens.data.frames.generate_frames",
        "seed": seed,
        "slots": slots,
        "config": json.loads(json.dumps(cfg.__dict__, default=list)),
        "notes": (
            "Synthetic live-stream frames. Storage size is the generator width x height (portrait swaps them). "
            "attributes.small marks overlays at 1-5% of the frame (hard subset). quality_frozen is temporal: "
            "it is set on frames 1.. of a frozen sequence (attributes.sequence, .index) and is not visible "
            "in one frame; train per-frame heads without it. Frozen sequences share one split."
        ),
    }


def demo_manifest(path: str | Path, slots: int = 48, seed: int = 3) -> Path:
    """A tiny frames manifest at ``path`` for the notebooks, written only where none is.

    The data notebook writes it and the training notebook reads it; either may be opened first,
    so both call this. A set this small leaves the val split nearly empty, so every fourth single
    labelled training frame moves to val and training has something to validate on.

    Args:
        path: The manifest directory.
        slots: Generator slots (a frozen sequence takes several rows).
        seed: Generator seed.

    Returns:
        ``path``.
    """
    from livelens.data.manifest import write_manifest

    path = Path(path)
    if (path / "card.json").exists() or any(path.glob("*.parquet")):
        return path
    cfg = FrameConfig()
    rows = generate_frames(0, slots, seed=seed, cfg=cfg)
    labelled = [r for r in rows if r["labels"] and r["split"] == "train" and not r["attributes"].get("sequence")]
    for r in labelled[2::4]:
        r["split"] = "val"
    write_manifest(rows, path, frames_card(seed, slots, cfg), contact_sheet=False)
    return path
