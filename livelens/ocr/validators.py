"""Specific-scene validators: OCR lines → typed fields for bank cards, ID numbers and licence plates.

Each validator checks the number's own redundancy (Luhn, GB 11643 check digit, plate
format), so an OCR misread or a random digit string is rejected rather than reported.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from livelens.ocr.entities import collapse_digits, normalize
from livelens.ocr.types import Box, TextLine

PROVINCES = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼"
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
# Plates: province + issuing-office letter + 5 alphanumerics (no I/O), or 6 for new-energy plates.
_PLATE = re.compile(rf"([{PROVINCES}])([A-HJ-NP-Z])[·.\s-]?([A-HJ-NP-Z0-9]{{5,6}})(?![A-Z0-9])")


@dataclass
class Field:
    """A validated value read from OCR lines."""

    kind: str
    value: str
    box: Box
    score: float
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def luhn_ok(number: str) -> bool:
    """The Luhn (mod 10) check used by bank cards."""
    if not number.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def id_check_char(first17: str) -> str:
    """GB 11643-1999 check character for the first 17 digits."""
    return _ID_CHECK[sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS, strict=True)) % 11]


def parse_bank_card(text: str) -> dict[str, Any] | None:
    """A 16–19 digit Luhn-valid card number in ``text`` (spaces/dashes allowed), or ``None``."""
    col = collapse_digits(normalize(text)).text
    for m in re.finditer(r"(?<!\d)\d{16,19}(?!\d)", col):
        num = m.group(0)
        if luhn_ok(num):
            # UnionPay cards start with 62; other IINs still validate but are labelled as such.
            return {"number": num, "masked": num[:6] + "*" * (len(num) - 10) + num[-4:],
                    "network": "unionpay" if num.startswith("62") else "other", "length": len(num)}
    return None


def parse_resident_id(text: str, today: dt.date | None = None) -> dict[str, Any] | None:
    """An 18-character resident ID number with a valid check digit and birth date, or ``None``."""
    col = collapse_digits(normalize(text)).text.upper()
    for m in re.finditer(r"(?<![0-9])(\d{17})([0-9X])(?![0-9X])", col):
        body, check = m.group(1), m.group(2)
        if id_check_char(body) != check:
            continue
        try:
            birth = dt.date(int(body[6:10]), int(body[10:12]), int(body[12:14]))
        except ValueError:
            continue
        today = today or dt.date.today()
        if not (dt.date(1900, 1, 1) <= birth <= today):
            continue
        return {"number": body + check, "region": body[:6], "birth_date": birth.isoformat(),
                "sex": "male" if int(body[16]) % 2 else "female"}
    return None


def parse_plate(text: str) -> dict[str, Any] | None:
    """A Chinese licence plate (incl. 8-character new-energy plates), or ``None``."""
    norm = normalize(text).text.upper()
    m = _PLATE.search(norm)
    if not m:
        return None
    serial = m.group(3)
    plate = m.group(1) + m.group(2) + serial
    # New-energy plates carry D (electric) or F (hybrid) first or last in a 6-char serial.
    nev = len(serial) == 6 and (serial[0] in "DF" or serial[-1] in "DF")
    if len(serial) == 6 and not nev:
        return None
    return {"plate": plate, "province": m.group(1), "office": m.group(2), "new_energy": nev}


_PARSERS = {"bank_card": parse_bank_card, "resident_id": parse_resident_id, "licence_plate": parse_plate}


def validate_lines(lines: Sequence[TextLine], kinds: Iterable[str] = tuple(_PARSERS)) -> list[Field]:
    """Typed fields found in OCR lines, each with its line's box and score.

    Args:
        lines: OCR output of one image.
        kinds: Which validators to run (``bank_card``, ``resident_id``, ``licence_plate``).
    """
    out: list[Field] = []
    for kind in kinds:
        parse = _PARSERS[kind]
        for line in lines:
            details = parse(line.text)
            if details:
                value = details.get("number") or details.get("plate")
                out.append(Field(kind, str(value), list(line.box), float(line.score), details))
    return out
