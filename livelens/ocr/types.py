"""Result types shared by every OCR backend, the post-processing and the HTTP layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

Polygon = list[list[float]]
Box = list[float]


def polygon_to_box(polygon: Polygon | np.ndarray) -> Box:
    """The axis-aligned ``[x0, y0, x1, y1]`` around a polygon."""
    pts = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    return [float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())]


def box_to_polygon(box: Box) -> Polygon:
    """A 4-point clockwise polygon (top-left first) from ``[x0, y0, x1, y1]``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


@dataclass
class TextBox:
    """One detected text region: a 4-point polygon, its axis-aligned box and a detection score."""

    polygon: Polygon
    box: Box
    score: float

    @classmethod
    def from_polygon(cls, polygon: Polygon | np.ndarray, score: float) -> TextBox:
        """Build from any 4-point polygon, rounding nothing away."""
        pts = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        return cls([[float(x), float(y)] for x, y in pts], polygon_to_box(pts), float(score))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class TextLine:
    """One read text line: geometry (as in :class:`TextBox`), the text and the recognition score."""

    polygon: Polygon
    box: Box
    text: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class Entity:
    """A typed finding in the text (or a QR code) with where it is and the taxonomy label it maps to."""

    kind: str
    value: str
    box: Box
    label: str | None
    score: float
    source: str = ""
    fields: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@runtime_checkable
class OcrEngine(Protocol):
    """What Serve deployments and the evaluation call; every method works on batches.

    Detection and recognition are separate so a serving graph can detect on one replica,
    crop, and send all crops of many frames to a batched recogniser.
    """

    name: str

    def detect(self, images: list[Any]) -> list[list[TextBox]]:
        """Text regions per image."""
        ...

    def recognize(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """``(text, score)`` per cropped line image (RGB uint8)."""
        ...

    def read(self, images: list[Any]) -> list[list[TextLine]]:
        """Detect, crop and recognise: text lines per image."""
        ...
