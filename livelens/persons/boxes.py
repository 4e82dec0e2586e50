"""Box geometry shared by the person cut-outs, the engine and the evaluation.

Boxes are ``[x0, y0, x1, y1]`` in pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Share of a face that a person box must cover to hold it: dlib's and MTCNN's face boxes run a
#: few pixels past the cheeks and chin that a body's mask or box ends at.
HOLD_SHARE = 0.8


def holds(outer: Sequence[float], inner: Sequence[float], share: float = HOLD_SHARE) -> bool:
    """Whether ``outer`` covers at least ``share`` of ``inner``'s area."""
    iw = max(0.0, min(outer[2], inner[2]) - max(outer[0], inner[0]))
    ih = max(0.0, min(outer[3], inner[3]) - max(outer[1], inner[1]))
    return iw * ih >= share * max((inner[2] - inner[0]) * (inner[3] - inner[1]), 1e-9)


def face_holder(face: Sequence[float], people: Sequence[Sequence[float]]) -> int | None:
    """The index of the smallest person box that :func:`holds` ``face``, or None."""
    held = [i for i, p in enumerate(people) if holds(p, face)]
    return min(held, key=lambda i: (people[i][2] - people[i][0]) * (people[i][3] - people[i][1]), default=None)
