"""OCR: one engine interface over PP-OCR (default) and mmocr, plus text post-processing.

Heavy backends (onnxruntime, torch, mmocr) are imported only when an engine is built.
"""

from livelens.ocr.engine import PpOcrEngine, create_engine, crop_line, crop_lines
from livelens.ocr.types import Entity, OcrEngine, TextBox, TextLine

__all__ = [
    "Entity",
    "OcrEngine",
    "PpOcrEngine",
    "TextBox",
    "TextLine",
    "create_engine",
    "crop_line",
    "crop_lines",
]
