"""The Chinese + English character set for text generation and the recognizer dictionary.

The Chinese part is GB2312 level 1: the 3,755 most common simplified characters, ordered
by pinyin, enumerated from the codec itself (rows 0xB0–0xD7, cells 0xA1–0xFE) so no data
file is needed. ASCII letters, digits and punctuation, plus common full-width Chinese
punctuation, complete it. ``livelens/resources/dict_zh_en.txt`` is this list, one
character per line (``python -m livelens.data.charset`` rewrites it).
"""

from __future__ import annotations

import string
import sys
from functools import cache
from importlib import resources
from pathlib import Path

ZH_PUNCT = "，。！？：；、“”‘’（）《》【】—…·￥"
DICT_RESOURCE = "dict_zh_en.txt"


@cache
def gb2312_level1() -> tuple[str, ...]:
    """The 3,755 GB2312 level-1 characters (row 55 stops at cell 0xF9)."""
    chars = []
    for row in range(0xB0, 0xD8):
        last = 0xF9 if row == 0xD7 else 0xFE
        for cell in range(0xA1, last + 1):
            chars.append(bytes([row, cell]).decode("gb2312"))
    return tuple(chars)


@cache
def ascii_chars() -> tuple[str, ...]:
    """Digits, letters and ASCII punctuation (no space: the recognizer treats space separately)."""
    return tuple(string.digits + string.ascii_letters + string.punctuation)


@cache
def charset() -> tuple[str, ...]:
    """The full dictionary: ASCII first, then GB2312 level 1, then Chinese punctuation."""
    out: list[str] = []
    seen: set[str] = set()
    for ch in (*ascii_chars(), *gb2312_level1(), *ZH_PUNCT):
        if ch not in seen:
            seen.add(ch)
            out.append(ch)
    return tuple(out)


def dict_path() -> Path:
    """Path of the packaged dictionary file."""
    return Path(str(resources.files("livelens") / "resources" / DICT_RESOURCE))


def write_dict(path: str | Path | None = None) -> Path:
    """Write the dictionary, one character per line."""
    path = Path(path) if path else dict_path()
    path.write_text("\n".join(charset()) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_dict(sys.argv[1] if len(sys.argv) > 1 else None))
