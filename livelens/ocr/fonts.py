"""A CJK-capable font for drawing (visualisations, generated HUD frames); never downloaded."""

from __future__ import annotations

import functools
from pathlib import Path

from PIL import ImageFont

# Debian's fonts-wqy-microhei, then other common system CJK fonts.
CJK_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
)


def cjk_font_path() -> Path | None:
    """The first installed CJK font, or ``None``."""
    for p in CJK_FONT_CANDIDATES:
        if Path(p).is_file():
            return Path(p)
    return None


@functools.lru_cache(maxsize=32)
def cjk_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A CJK font at ``size`` pixels (Pillow's default bitmap font when none is installed)."""
    path = cjk_font_path()
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(path), size=size)
