"""Contact sheets: a grid of thumbnails with boxes, polygons and labels, to look at a set."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from livelens.errors import LivelensError

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def _colour(name: str) -> tuple[int, int, int]:
    return _PALETTE[sum(name.encode()) % len(_PALETTE)]


def _caption(row: dict) -> str:
    parts = list(row.get("labels") or [])
    q = row.get("quality")
    if q:
        parts.append(f"{q['distortion']}{q['level']} {q['score']:.0f}")
    texts = row.get("texts") or []
    if texts and not parts:
        parts.append(texts[0]["text"][:18])
    try:
        attrs = json.loads(row.get("attributes") or "{}")
    except json.JSONDecodeError:
        attrs = {}
    if attrs.get("small"):
        parts.append("small")
    return ", ".join(parts) or "(negative)"


def contact_sheet_png(table: pa.Table, *, title: str = "", n: int = 48, thumb: int = 200, cols: int = 8) -> bytes:
    """Render the first ``n`` rows of a manifest table as a PNG grid.

    Rows are picked spread across the table (not just the head) so every generator branch
    shows up; images that fail to decode get a grey tile rather than failing the write.
    """
    from livelens.data.manifest import decode_row_image

    total = table.num_rows
    idx = np.unique(np.linspace(0, max(total - 1, 0), num=min(n, total)).astype(int)) if total else []
    rows = table.take(pa.array(idx, pa.int64())).to_pylist() if total else []
    ncols = max(1, min(cols, len(rows)))
    nrows = max(1, -(-len(rows) // ncols))
    cap_h, head_h = 14, 18
    sheet = Image.new("RGB", (ncols * thumb, head_h + nrows * (thumb + cap_h)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    try:
        from livelens.data.render import font

        cap_font = font(11)
    except LivelensError:
        cap_font = None  # no CJK font: captions fall back to Pillow's bitmap font
    draw.text((4, 3), f"{title}  ({total} images, showing {len(rows)})", fill=(255, 255, 255), font=cap_font)
    for k, row in enumerate(rows):
        x, y = (k % ncols) * thumb, head_h + (k // ncols) * (thumb + cap_h)
        try:
            img = Image.fromarray(decode_row_image(row.get("image_bytes"), row.get("image_uri")))
        except LivelensError:
            img = Image.new("RGB", (row["width"] or 1, row["height"] or 1), (90, 90, 90))
        scale = thumb / max(img.size)
        tw, th = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        tile = img.resize((tw, th), Image.BILINEAR)
        td = ImageDraw.Draw(tile)
        for b in row.get("boxes") or []:
            box = [b["x0"] * scale, b["y0"] * scale, b["x1"] * scale, b["y1"] * scale]
            td.rectangle(box, outline=_colour(b["label"]), width=2)
        for t in row.get("texts") or []:
            pts = [(p * scale) for p in t["polygon"]]
            if len(pts) >= 6:
                td.polygon(list(zip(pts[0::2], pts[1::2], strict=True)), outline=(0, 255, 0))
        sheet.paste(tile, (x + (thumb - tw) // 2, y + (thumb - th) // 2))
        draw.text((x + 2, y + thumb), _caption(row)[:34], fill=(220, 220, 220), font=cap_font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
