"""Scene validators: bank cards (Luhn), resident IDs (GB 11643), licence plates (format)."""

from __future__ import annotations

import datetime as dt

import pytest

from livelens.ocr.types import TextLine
from livelens.ocr.validators import (
    id_check_char,
    luhn_ok,
    parse_bank_card,
    parse_plate,
    parse_resident_id,
    validate_lines,
)


def line(text: str, y0: float = 0) -> TextLine:
    return TextLine([[0, y0], [300, y0], [300, y0 + 20], [0, y0 + 20]], [0, y0, 300, y0 + 20], text, 0.9)


@pytest.mark.parametrize(("number", "ok"), [
    ("4111111111111111", True), ("4111111111111112", False),
    ("6222600260001072444", True), ("6222600260001072445", False),
    ("79927398713", True), ("79927398710", False),
])
def test_luhn(number: str, ok: bool) -> None:
    assert luhn_ok(number) is ok


def test_bank_card_from_spaced_fullwidth_ocr_text() -> None:
    got = parse_bank_card("卡号：６２２２ ６００２ ６０００ １０７２ ４４４")
    assert got == {"number": "6222600260001072444", "masked": "622260*********2444", "network": "unionpay", "length": 19}
    # One misread digit breaks the checksum: rejected, not reported.
    assert parse_bank_card("卡号 6222 6002 6000 1072 445") is None
    assert parse_bank_card("订单 20231001123456") is None  # 14 digits


def test_resident_id_check_digit_and_birth_date() -> None:
    assert id_check_char("11010519491231002") == "X"
    got = parse_resident_id("身份证号 11010519491231002x")
    assert got == {"number": "11010519491231002X", "region": "110105", "birth_date": "1949-12-31", "sex": "female"}
    assert parse_resident_id("11010519491231002 1") is None  # wrong check digit
    body = "11010520991301001"  # month 13: impossible date even with a correct check digit
    assert parse_resident_id(body + id_check_char(body)) is None
    future = "110105" + "20400101" + "001"
    assert parse_resident_id(future + id_check_char(future), today=dt.date(2026, 1, 1)) is None


@pytest.mark.parametrize(("text", "plate", "nev"), [
    ("京A12345", "京A12345", False),
    ("车牌 粤B·D12345 违停", "粤BD12345", True),
    ("沪AF1234D", "沪AF1234D", True),
    ("川ａ８８８８８", "川A88888", False),
])
def test_plates(text: str, plate: str, nev: bool) -> None:
    got = parse_plate(text)
    assert got is not None and got["plate"] == plate and got["new_energy"] is nev


@pytest.mark.parametrize("text", ["京I12345", "京A1234", "京A123456", "美A12345", "AB12345"])
def test_plate_lookalikes(text: str) -> None:
    assert parse_plate(text) is None


def test_validate_lines_types_fields_with_boxes() -> None:
    lines = [line("持卡人 张三"), line("6222 6002 6000 1072 444", 30), line("身份证 11010519491231002X", 60),
             line("车牌号 浙A·12345", 90)]
    fields = validate_lines(lines)
    assert [(f.kind, f.value, f.box[1]) for f in fields] == [
        ("bank_card", "6222600260001072444", 30), ("resident_id", "11010519491231002X", 60),
        ("licence_plate", "浙A12345", 90)]
