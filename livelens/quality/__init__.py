"""Picture quality: classical per-frame measures, frozen-stream detection and a learned NR-IQA score.

``assess`` and ``FrozenDetector`` import only NumPy/OpenCV; ``IqaModel`` (torch) is imported
lazily so a serving replica that only needs the classical measures starts fast.
"""

from __future__ import annotations

from typing import Any

from livelens.quality.assess import LABELS, assess
from livelens.quality.frozen import FrozenDetector
from livelens.quality.measures import DEFAULT_THRESHOLDS, Thresholds

__all__ = ["DEFAULT_THRESHOLDS", "LABELS", "FrozenDetector", "IqaModel", "Thresholds", "assess"]


def __getattr__(name: str) -> Any:
    if name == "IqaModel":
        from livelens.quality.iqa import IqaModel

        return IqaModel
    raise AttributeError(f"module 'livelens.quality' has no attribute {name!r}")
