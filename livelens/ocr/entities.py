"""Contact entities in OCR text (ads in live streams): phones, URLs, WeChat and QQ IDs.

Spammers obfuscate: full-width digits, Chinese numerals (幺三八…), spaces and dashes inside
numbers, numbers split over two lines. So the text is normalised first (keeping a map back
to the original characters for the box), digit runs are collapsed across separators, and a
number must fill a *whole* digit run to count: prices, dates, timestamps, order numbers and
ID-card numbers are longer or shorter runs and so never match as phones.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from livelens.ocr.types import Box, Entity, TextLine

# Entity kind → taxonomy label (checked against the taxonomy in the tests).
LABELS = {
    "phone": "ads_phone",
    "landline": "ads_phone",
    "url": "ads_url",
    "wechat_id": "ads_wechat_id",
    "qq_id": "ads_qq_id",
    "qrcode": "ads_qrcode",
}
#: Labels OCR reads directly: where OCR ran on a frame, its reading decides them (the gateway
#: demotes the classifier's unread ones, ``livelens.fusion.overrule_unread``).
AUTHORITATIVE_LABELS = frozenset(LABELS.values())

CN_DIGITS = {
    "零": "0", "〇": "0", "洞": "0", "一": "1", "幺": "1", "壹": "1", "二": "2", "两": "2", "贰": "2",
    "三": "3", "叁": "3", "四": "4", "肆": "4", "五": "5", "伍": "5", "六": "6", "陆": "6", "七": "7",
    "柒": "7", "拐": "7", "八": "8", "捌": "8", "九": "9", "玖": "9", "勾": "9",
}
# Characters spammers (and OCR) put inside numbers; collapsed only *between* digits.
DIGIT_SEPARATORS = set(" \t-_.·•*/|~,、—–―") | {"\u3000"}

_MOBILE = re.compile(r"(?:\+?86|0086)?(1[3-9]\d{9})")
_LANDLINE = re.compile(r"(010|02\d|0[3-9]\d{2})([2-9]\d{6,7})")
_PHONE_CONTEXT = re.compile(r"电话|热线|座机|客服|联系|咨询|热綫|tel|call|phone", re.IGNORECASE)

_TLDS = (
    "com|cn|net|org|top|xyz|cc|vip|info|io|me|tv|club|shop|site|online|live|fun|app|co|biz|"
    "ink|wang|ltd|work|link|pro|win|bet|mobi|asia|hk|tw"
)
_URL = re.compile(
    r"(?<![@\w.-])("
    r"(?:https?://)?(?:www\.)?(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?:" + _TLDS + r")"
    r"(?::\d{2,5})?(?:/[\w\-./?%&=#~+]*)?"
    r")(?![\w-]|\.[a-z0-9])",
    re.IGNORECASE,
)
# Chinese keywords may touch the ID; latin ones need a separator so "wxWidgets" stays a word.
# "加微" ("add Wei") is the streamers' short form (the frame generator writes it too); "加微博"
# (follow on Weibo) is not.
_WECHAT = re.compile(
    r"(?:(?:微信|威信|薇信|徽信|V信|v信|卫星|wei信|加微(?!博))(?:同号|号码|号|id|ID)?[:：\s]*"
    r"|(?<![a-zA-Z])(?:vx|wx|vxin|weixin|wechat)(?:号|id)?[:：\s]+)"
    r"([a-zA-Z][-_a-zA-Z0-9]{5,19}|1[3-9]\d{9})(?![-_a-zA-Z0-9])",
    re.IGNORECASE,
)
_QQ = re.compile(
    r"(?:(?<![a-zA-Z])(?:qq|q号|q群)|扣扣|企鹅|球球)(?:号码|号|群)?[:：\s]*([1-9]\d{4,10})(?!\d)",
    re.IGNORECASE,
)


def _plausible_host(url: str) -> bool:
    """A URL needs a scheme, ``www.`` or a letter before its TLD ("3.5.cc" is a number)."""
    if re.match(r"https?://|www\.", url, re.IGNORECASE):
        return True
    host = url.split("/")[0].split(":")[0]
    return bool(re.search(r"[a-z]", host.rsplit(".", 1)[0], re.IGNORECASE))


@dataclass
class Normalized:
    """Normalised text plus, for every character, the index of the original character."""

    text: str
    origin: list[int]


def normalize(text: str) -> Normalized:
    """Full-width → half-width (NFKC), Chinese numerals → digits, 。 between alnums → '.'."""
    out: list[str] = []
    origin: list[int] = []
    for i, ch in enumerate(text):
        ch = CN_DIGITS.get(ch, ch)
        for c in unicodedata.normalize("NFKC", ch):
            out.append(c)
            origin.append(i)
    s = "".join(out)
    # OCR and spammers write the dots of a domain as 。 or 点.
    s = re.sub(r"(?<=[A-Za-z0-9])[。点](?=[A-Za-z0-9])", ".", s)
    return Normalized(s, origin)


def collapse_digits(norm: Normalized) -> Normalized:
    """Drop separators that sit between two digits (``138 1234-5678`` → ``13812345678``)."""
    s = norm.text
    keep = []
    for i, ch in enumerate(s):
        if ch in DIGIT_SEPARATORS:
            j = i - 1
            while j >= 0 and s[j] in DIGIT_SEPARATORS:
                j -= 1
            k = i + 1
            while k < len(s) and s[k] in DIGIT_SEPARATORS:
                k += 1
            if j >= 0 and k < len(s) and s[j].isdigit() and s[k].isdigit():
                continue
        keep.append(i)
    return Normalized("".join(s[i] for i in keep), [norm.origin[i] for i in keep])


def _sub_box(box: Box, n_chars: int, start: int, end: int) -> Box:
    """The part of a horizontal line box covering characters ``[start, end)`` (by char count)."""
    x0, y0, x1, y1 = box
    if n_chars <= 0:
        return list(box)
    w = (x1 - x0) / n_chars
    return [x0 + w * start, y0, x0 + w * end, y1]


@dataclass
class _Segment:
    """Text with its source lines, for mapping a match back to a box."""

    text: str
    parts: list[tuple[int, int, TextLine]]  # (start, end) in text, line

    def box(self, start: int, end: int) -> Box:
        boxes = []
        for s, e, line in self.parts:
            lo, hi = max(s, start), min(e, end)
            if lo < hi:
                boxes.append(_sub_box(line.box, e - s, lo - s, hi - s))
        xs0, ys0, xs1, ys1 = zip(*boxes, strict=True) if boxes else ([0.0], [0.0], [0.0], [0.0])
        return [min(xs0), min(ys0), max(xs1), max(ys1)]

    def score(self, start: int, end: int) -> float:
        scores = [line.score for s, e, line in self.parts if max(s, start) < min(e, end)]
        return float(min(scores)) if scores else 0.0

    def n_lines(self, start: int, end: int) -> int:
        return sum(1 for s, e, _ in self.parts if max(s, start) < min(e, end))


def _find(seg: _Segment) -> list[tuple[str, str, int, int]]:
    """``(kind, value, start, end)`` matches in a segment; offsets are in ``seg.text``."""
    found: list[tuple[str, str, int, int]] = []
    norm = normalize(seg.text)
    col = collapse_digits(norm)
    claimed: list[tuple[int, int]] = []

    def add(kind: str, value: str, nm: Normalized, a: int, b: int) -> None:
        start, end = nm.origin[a], nm.origin[b - 1] + 1
        found.append((kind, value, start, end))
        claimed.append((start, end))

    def free(nm: Normalized, a: int, b: int) -> bool:
        start, end = nm.origin[a], nm.origin[b - 1] + 1
        return all(end <= s or start >= e for s, e in claimed)

    # Keyworded IDs first: "微信 13812345678" is a WeChat ID, not (only) a phone.
    for m in _WECHAT.finditer(col.text):
        add("wechat_id", m.group(1), col, m.start(1), m.end(1))
        if m.group(1).isdigit():  # "微信同号 138…": the ID is the phone number, report both
            found.append(("phone", m.group(1), *found[-1][2:]))
    for m in _QQ.finditer(col.text):
        if free(col, m.start(1), m.end(1)):
            add("qq_id", m.group(1), col, m.start(1), m.end(1))
    for m in _URL.finditer(norm.text):
        value = m.group(1)
        if free(norm, m.start(1), m.end(1)) and _plausible_host(value):
            add("url", value, norm, m.start(1), m.end(1))
    has_context = bool(_PHONE_CONTEXT.search(norm.text))
    for m in re.finditer(r"\+?\d+", col.text):
        run, a, b = m.group(0), m.start(), m.end()
        if not free(col, a, b):
            continue
        if mm := _MOBILE.fullmatch(run):
            add("phone", mm.group(1), col, a, b)
            continue
        if lm := _LANDLINE.fullmatch(run):
            # A bare 0-led run could be an order number: require the area code to be set off
            # ("0591-8751…", "(010)…") or a phone word nearby.
            raw = seg.text[col.origin[a]:col.origin[b - 1] + 1]
            set_off = bool(re.match(r"\(?0\d{2,3}\)?[\s\-—)）]", normalize(raw).text))
            if set_off or has_context:
                add("landline", f"{lm.group(1)}-{lm.group(2)}", col, a, b)
    return found


def _adjacent(a: TextLine, b: TextLine) -> bool:
    """Whether ``b`` continues ``a``: right next to it on the same row, or the next row down."""
    ha, hb = a.box[3] - a.box[1], b.box[3] - b.box[1]
    h = max(1.0, min(ha, hb))
    v_overlap = min(a.box[3], b.box[3]) - max(a.box[1], b.box[1])
    if v_overlap >= 0.5 * h and 0 <= b.box[0] - a.box[2] <= 2.5 * h:
        return True
    gap = b.box[1] - a.box[3]
    h_overlap = min(a.box[2], b.box[2]) - max(a.box[0], b.box[0])
    return -0.3 * h <= gap <= 0.8 * h and (h_overlap > 0 or abs(b.box[0] - a.box[0]) < 2 * h)


def extract_entities(lines: Sequence[TextLine], *, join_lines: bool = True) -> list[Entity]:
    """Contact entities in OCR lines, each with its box, taxonomy label and score.

    Args:
        lines: OCR output of one image.
        join_lines: Also look at pairs of adjacent lines, for numbers split across lines.

    Returns:
        Entities sorted top-to-bottom; one per (kind, value), keeping the best-scored.
    """
    lines = sorted(lines, key=lambda ln: (ln.box[1], ln.box[0]))
    segs = [_Segment(ln.text, [(0, len(ln.text), ln)]) for ln in lines]
    if join_lines:
        for i, a in enumerate(lines):
            for b in lines[i + 1:]:
                if b is not a and _adjacent(a, b):
                    segs.append(_Segment(a.text + b.text, [(0, len(a.text), a), (len(a.text), len(a.text) + len(b.text), b)]))
    best: dict[tuple[str, str], Entity] = {}
    for seg in segs:
        for kind, value, start, end in _find(seg):
            joined = seg.n_lines(start, end) > 1
            ent = Entity(
                kind="phone" if kind == "landline" else kind,
                value=value,
                box=seg.box(start, end),
                label=LABELS[kind],
                # A match assembled from two lines is a little less certain than one line.
                score=seg.score(start, end) * (0.9 if joined else 1.0),
                source="ocr_joined" if joined else "ocr",
            )
            key = (ent.kind, ent.value)
            if key not in best or ent.score > best[key].score:
                best[key] = ent
    return sorted(best.values(), key=lambda e: (e.box[1], e.box[0]))
