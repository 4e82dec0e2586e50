"""Entity extraction on a table of real-looking spam strings and lookalikes that must not match."""

from __future__ import annotations

import pytest

from livelens.ocr.entities import LABELS, extract_entities, normalize
from livelens.ocr.types import TextLine
from livelens.taxonomy import load_taxonomy


def line(text: str, x0: float = 10, y0: float = 10, h: float = 30, score: float = 0.95) -> TextLine:
    x1 = x0 + h * max(1, len(text))
    return TextLine([[x0, y0], [x1, y0], [x1, y0 + h], [x0, y0 + h]], [x0, y0, x1, y0 + h], text, score)


# (text, expected (kind, value) pairs) — the phrases follow real stream-overlay spam.
POSITIVES = [
    ("联系电话13764527008", {("phone", "13764527008")}),
    ("话: 13764527008 长按识别进入公众号", {("phone", "13764527008")}),
    ("加我 138 1234 5678 送福利", {("phone", "13812345678")}),
    ("手机：138-1234-5678", {("phone", "13812345678")}),
    ("电话１３８１２３４５６７８", {("phone", "13812345678")}),
    ("幺三八 一二三四 五六七八 找我", {("phone", "13812345678")}),
    ("壹叁玖捌柒陆伍肆叁贰壹", {("phone", "13987654321")}),
    ("+86 159 0000 1111", {("phone", "15900001111")}),
    ("全国客服热线: 0591-87519992", {("phone", "0591-87519992")}),
    ("座机 010 62345678", {("phone", "010-62345678")}),
    ("官网 www.huanle-pay.com 注册送", {("url", "www.huanle-pay.com")}),
    ("点击 https://t.cn/A6xYz9 领取", {("url", "https://t.cn/A6xYz9")}),
    ("看片去 abc123.xyz", {("url", "abc123.xyz")}),
    ("网址 live88。top", {("url", "live88.top")}),
    ("加微信 meinv_2023 私聊", {("wechat_id", "meinv_2023")}),
    ("VX: abc12345", {("wechat_id", "abc12345")}),
    ("加微: jdfhi0vh1i", {("wechat_id", "jdfhi0vh1i")}),
    ("加微 ocph1xo9m 领福利", {("wechat_id", "ocph1xo9m")}),
    ("v信ZhangSan88", {("wechat_id", "ZhangSan88")}),
    ("薇信号：happy-girl9", {("wechat_id", "happy-girl9")}),
    ("微信同号 13912345678", {("wechat_id", "13912345678"), ("phone", "13912345678")}),
    ("QQ:123456789 进群", {("qq_id", "123456789")}),
    ("扣扣 87654321", {("qq_id", "87654321")}),
    ("Q群 ９８７６５４３２１", {("qq_id", "987654321")}),
]

# Strings that look numeric or URL-ish but hold no contact.
LOOKALIKES = [
    "原价¥1399.00 现价899元",
    "2023-10-01 12:30:45",
    "直播时间 2024.05.20 20:00",
    "订单号 202310011234567890",
    "订单号 0123456789",
    "时间戳 1697012345678",
    "比分 13:12 第3局",
    "身份证 110101199003074514",
    "银行卡 6222 0210 0112 3456 789",
    "版本 v1.2.3 发布",
    "文件 photo.jpg 已保存",
    "评分 9.5 分",
    "人气 13.8万",
    "wxWidgets 教程",
    "加微博 starlive2024 看回放",
    "QQ音乐 2023 年度榜单",
    "邮箱 someone@example.invalid",
    "第12345678901期",
    "距离 1382 米 剩余 12345 人",
]


@pytest.mark.parametrize(("text", "expected"), POSITIVES)
def test_true_positives(text: str, expected: set[tuple[str, str]]) -> None:
    got = {(e.kind, e.value) for e in extract_entities([line(text)])}
    assert got == expected


@pytest.mark.parametrize("text", LOOKALIKES)
def test_lookalikes_do_not_match(text: str) -> None:
    assert extract_entities([line(text)]) == []


def test_phone_split_across_two_lines_is_joined_with_union_box() -> None:
    top, bottom = line("客服电话 138 1234", y0=100), line("5678 欢迎来电", y0=134)
    ents = extract_entities([bottom, top])
    assert [(e.kind, e.value, e.source) for e in ents] == [("phone", "13812345678", "ocr_joined")]
    assert ents[0].box[1] == pytest.approx(100) and ents[0].box[3] == pytest.approx(164)
    # Far-apart lines are not joined.
    assert extract_entities([top, line("5678 欢迎来电", y0=400)]) == []


def test_entity_box_covers_the_matched_characters_only() -> None:
    ln = line("联系电话13764527008", x0=0, h=10)  # 15 chars, 10 px each
    (ent,) = extract_entities([ln])
    assert ent.box == pytest.approx([40, 10, 150, 20])
    assert ent.score == pytest.approx(0.95)


def test_labels_exist_in_taxonomy() -> None:
    tax = load_taxonomy()
    assert set(LABELS.values()) <= set(tax.labels)
    assert {e.label for e in extract_entities([line("VX: abc12345 电话13812345678")])} == {"ads_wechat_id", "ads_phone"}


def test_normalize_keeps_origin_map() -> None:
    n = normalize("电话：１３８")
    assert n.text == "电话:138" and n.origin == [0, 1, 2, 3, 4, 5]
