"""Game status (游戏状态识别): typed HUD fields from a stream frame, driven by layout data files.

A layout (``livelens/resources/hud_layouts/<name>.yaml``) lists fields with a region (fractions
of the frame), a type (``int``, ``str``, ``ratio``) and either the label printed next to the
value (``存活``, ``KDA``) or a regex for unlabelled values (``345m``). The reader OCRs the frame
once, keeps the lines whose centre falls in each field's region and parses the value after
the label (or the pattern's group). A new game is a new YAML file, not code.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from livelens.errors import ConfigError
from livelens.ocr.engine import as_rgb
from livelens.ocr.types import OcrEngine, TextLine

LAYOUT_DIR = Path(__file__).resolve().parents[1] / "resources" / "hud_layouts"
FIELD_TYPES = ("int", "str", "ratio")
_RATIO = re.compile(r"\d+(?:\s*(?:/|:|-|vs|VS)\s*\d+)+")


@dataclass(frozen=True)
class HudField:
    """One field of a layout; see the module docstring."""

    name: str
    type: str
    region: tuple[float, float, float, float]
    label: str | None = None
    pattern: str | None = None
    unit: str | None = None
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class HudLayout:
    """A game's HUD template."""

    name: str
    fields: tuple[HudField, ...]
    description: str = ""
    panel: tuple[float, float, float, float] | None = None
    text_height: float = 0.035


def _box(value: Any, where: str) -> tuple[float, float, float, float]:
    if not (isinstance(value, list | tuple) and len(value) == 4 and all(isinstance(v, int | float) for v in value)):
        raise ConfigError(f"{where}: expected [x0, y0, x1, y1] fractions, got {value!r}")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ConfigError(f"{where}: region {value!r} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return x0, y0, x1, y1


def parse_layout(data: Mapping[str, Any], source: str = "<memory>") -> HudLayout:
    """Validate a layout mapping (as loaded from YAML); :class:`ConfigError` names the problem."""
    if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
        raise ConfigError(f"{source}: a layout needs a 'name' string")
    raw_fields = data.get("fields")
    if not isinstance(raw_fields, list) or not raw_fields:
        raise ConfigError(f"{source}: a layout needs a non-empty 'fields' list")
    fields = []
    for i, f in enumerate(raw_fields):
        where = f"{source}: fields[{i}]"
        if not isinstance(f, Mapping) or not isinstance(f.get("name"), str):
            raise ConfigError(f"{where}: each field needs a 'name'")
        if f.get("type") not in FIELD_TYPES:
            raise ConfigError(f"{where} ({f['name']}): type must be one of {FIELD_TYPES}, got {f.get('type')!r}")
        if not f.get("label") and not f.get("pattern"):
            raise ConfigError(f"{where} ({f['name']}): give a 'label' or a 'pattern'")
        if f.get("pattern"):
            try:
                if re.compile(f["pattern"]).groups < 1:
                    raise ConfigError(f"{where} ({f['name']}): the pattern needs one capture group")
            except re.error as exc:
                raise ConfigError(f"{where} ({f['name']}): bad pattern: {exc}") from exc
        rng = f.get("range")
        fields.append(HudField(
            name=f["name"], type=f["type"], region=_box(f.get("region"), where), label=f.get("label"),
            pattern=f.get("pattern"), unit=f.get("unit"), range=tuple(rng) if rng else None,
            choices=tuple(str(c) for c in f["choices"]) if f.get("choices") else None,
        ))
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: duplicate field names in {names}")
    panel = _box(data["panel"], f"{source}: panel") if data.get("panel") else None
    return HudLayout(data["name"], tuple(fields), str(data.get("description", "")), panel,
                     float(data.get("text_height", 0.035)))


def load_layout(path: str | Path) -> HudLayout:
    """Load one layout file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read HUD layout {path}: {exc}") from exc
    return parse_layout(data, str(path))


@functools.lru_cache(maxsize=4)
def _load_dir(directory: str) -> dict[str, HudLayout]:
    layouts = [load_layout(p) for p in sorted(Path(directory).glob("*.yaml"))]
    return {lay.name: lay for lay in layouts}


def load_layouts(directory: str | Path | None = None) -> dict[str, HudLayout]:
    """All layouts in a directory (default: the packaged ``hud_layouts``), by name."""
    return dict(_load_dir(str(directory or LAYOUT_DIR)))


# -- parsing ---------------------------------------------------------------------------
def parse_typed(text: str, kind: str) -> Any:
    """The first value of ``kind`` in ``text`` (int, str token, or ratio as a list of ints), or None."""
    if kind == "int":
        m = re.search(r"\d+", text)
        return int(m.group(0)) if m else None
    if kind == "ratio":
        m = _RATIO.search(text)
        return [int(v) for v in re.findall(r"\d+", m.group(0))] if m else None
    m = re.search(r"[A-Za-z0-9\u4e00-\u9fff][A-Za-z0-9\u4e00-\u9fff\-.]*", text)
    return m.group(0) if m else None


def _in_region(line: TextLine, region: tuple[float, float, float, float], w: int, h: int) -> bool:
    cx, cy = (line.box[0] + line.box[2]) / 2 / w, (line.box[1] + line.box[3]) / 2 / h
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def _read_field(f: HudField, lines: Sequence[TextLine], w: int, h: int) -> dict[str, Any] | None:
    for line in lines:
        if not _in_region(line, f.region, w, h):
            continue
        text = unicodedata.normalize("NFKC", line.text)
        if f.label:
            pos = text.find(unicodedata.normalize("NFKC", f.label))
            if pos < 0:
                continue
            value = parse_typed(text[pos + len(f.label):], f.type)
        else:
            m = re.search(f.pattern, text)
            # A pattern's group is the whole value for str fields ("17:10" keeps its colon).
            value = (m.group(1).strip() or None if f.type == "str" else parse_typed(m.group(1), f.type)) if m else None
        if value is None:
            continue
        conf = float(line.score)
        if f.range and f.type == "int" and not (f.range[0] <= value <= f.range[1]):
            conf *= 0.5  # readable but implausible for this game: flag rather than drop
        if f.choices and f.type == "str" and value not in f.choices:
            conf *= 0.7
        return {"value": value, "confidence": round(conf, 4), "text": line.text, "box": list(line.box)}
    return None


def read_fields(lines: Sequence[TextLine], layout: HudLayout, size: tuple[int, int]) -> dict[str, Any]:
    """Typed fields of ``layout`` from OCR lines of a frame of ``size`` = (width, height).

    Returns:
        ``{"layout", "score", "fields": {name: {"value", "confidence", "text", "box"}}}``;
        a field not found has value ``None`` and confidence 0. ``score`` is the share of
        fields found, labelled ones counting double (labels are the strong evidence).
    """
    w, h = size
    fields: dict[str, Any] = {}
    got = total = 0.0
    for f in layout.fields:
        weight = 2.0 if f.label else 1.0
        total += weight
        res = _read_field(f, lines, w, h)
        if res is None:
            fields[f.name] = {"value": None, "confidence": 0.0, "text": None, "box": None}
        else:
            fields[f.name] = res
            got += weight
    return {"layout": layout.name, "score": round(got / total, 4), "fields": fields}


@functools.lru_cache(maxsize=1)
def _default_engine() -> OcrEngine:
    from livelens.ocr.engine import PpOcrEngine

    return PpOcrEngine()


def read_hud(image: Any, layout: str | HudLayout | None = None, *, engine: OcrEngine | None = None,
             lines: Sequence[TextLine] | None = None, layouts: Mapping[str, HudLayout] | None = None) -> dict[str, Any]:
    """Read a game HUD.

    Args:
        image: The frame (anything :func:`livelens.imageio.load_image` takes).
        layout: A layout name or object; ``None`` picks the best-matching packaged layout.
        engine: OCR engine (default: a shared :class:`PpOcrEngine`).
        lines: Already-read OCR lines of this frame (skips OCR; e.g. from a serving graph).
        layouts: Candidate layouts (default: all packaged ones).

    Returns:
        As :func:`read_fields`; with ``layout`` ``None`` and no fields when nothing matched.
    """
    layouts = dict(layouts) if layouts is not None else load_layouts()
    if isinstance(layout, str):
        if layout not in layouts:
            raise ConfigError(f"unknown HUD layout {layout!r}; known: {sorted(layouts)}")
        layout = layouts[layout]
    rgb = as_rgb(image)
    if rgb is None:
        return {"layout": layout.name if layout else None, "score": 0.0, "fields": {}}
    if lines is None:
        lines = (engine or _default_engine()).read([rgb])[0]
    size = (rgb.shape[1], rgb.shape[0])
    if layout is not None:
        return read_fields(lines, layout, size)
    results = [read_fields(lines, lay, size) for lay in layouts.values()]
    best = max(results, key=lambda r: r["score"], default=None)
    if best is None or best["score"] == 0:
        return {"layout": None, "score": 0.0, "fields": {}}
    return best


# -- rendering (tests, data generation) ------------------------------------------------
def random_values(layout: HudLayout, rng: np.random.Generator) -> dict[str, Any]:
    """Plausible values for every field (from its range/choices) for rendering."""
    out: dict[str, Any] = {}
    for f in layout.fields:
        lo, hi = f.range or (0, 99)
        if f.type == "int":
            out[f.name] = int(rng.integers(int(lo), int(hi) + 1))
        elif f.type == "ratio":
            out[f.name] = [int(v) for v in rng.integers(int(lo), int(hi) + 1, 2)]
        else:
            out[f.name] = str(rng.choice(list(f.choices or ("A1",))))
    return out


def render_hud(layout: HudLayout, values: Mapping[str, Any], background: np.ndarray | None = None,
               size: tuple[int, int] = (1280, 720)) -> np.ndarray:
    """Draw a layout's fields ("label value" at the left of each region) onto a frame.

    Args:
        layout: The layout.
        values: Field values (ratios as lists).
        background: RGB frame to draw on (copied); default a dark gradient of ``size``.
        size: (width, height) when no background is given.
    """
    from PIL import Image, ImageDraw

    from livelens.ocr.fonts import cjk_font

    if background is None:
        w, h = size
        grad = np.linspace(30, 90, w, dtype=np.float32)[None, :, None]
        background = np.broadcast_to(grad, (h, w, 3)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(background)).convert("RGBA")
    w, h = img.size
    draw = ImageDraw.Draw(img, "RGBA")
    if layout.panel:
        x0, y0, x1, y1 = layout.panel
        draw.rectangle((x0 * w, y0 * h, x1 * w, y1 * h), fill=(0, 0, 0, 150))
    font = cjk_font(max(10, int(layout.text_height * h)))
    for f in layout.fields:
        if f.name not in values:
            continue
        v = values[f.name]
        text = "/".join(str(x) for x in v) if isinstance(v, list | tuple) else str(v)
        text = f"{f.label} {text}" if f.label else text + (f.unit or "")
        x0, y0, x1, y1 = f.region
        draw.text((x0 * w + 4, (y0 + y1) / 2 * h), text, font=font, fill=(255, 255, 255, 255), anchor="lm",
                  stroke_width=1, stroke_fill=(0, 0, 0, 255))
    return np.asarray(img.convert("RGB"))
