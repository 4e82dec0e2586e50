"""Release checks of a learned quality-flag model, on photos its card says it never saw.

The same checks gate ``make default-models`` (a fit that fails one is not published, and the
shipped model stays) and are asserted on the shipped model by ``tests/test_quality_flags.py``, so
the build cannot ship a model the tests would refuse. Every check answers through
:meth:`livelens.quality.engine.QualityEngine.assess`, the code of ``/v1/quality``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from livelens.quality import realset as R

#: Share of clean and hard-negative windows a shipped model may flag (the goal is none).
MAX_HARD_NEGATIVE_SHARE = 0.15
#: Share of level-1 frames (the mild end a viewer still notices) each distortion must raise.
MIN_MILD_RECALL = 0.7
#: Mean probability of level 1 over the clean frame, and the largest fall from one level to the next.
MIN_STEP_FROM_CLEAN, MAX_FALL = 0.3, 0.05


@dataclass(frozen=True)
class Check:
    """One release check: its name, whether it held, and the figures it was decided on."""

    name: str
    ok: bool
    detail: dict[str, Any]


def raised(answer: dict[str, Any]) -> set[str]:
    """The dark, bright, blur and occlusion flags one ``assess`` answer raises."""
    b = answer["brightness"]
    return {f for f, on in (("dark", b["dark"]), ("bright", b["bright"]), ("blur", answer["blur"]["flag"]),
                            ("occlusion", answer["occlusion"]["flag"])) if on}


def _answer(engine: Any, item: R.Item, rgb: np.ndarray) -> dict[str, Any]:
    return engine.assess(R.render(item, rgb))


def hard_negatives(engine: Any, classical: Any, photos: dict[str, np.ndarray]) -> Check:
    """Clean centre frames and the darkest and flattest windows (jackets, sky, walls) of each photo:
    flagged on at most :data:`MAX_HARD_NEGATIVE_SHARE` of them, and on no more than the classical
    thresholds flag."""
    items = [(R.Item(n, base, "none", 0), rgb) for n, rgb in sorted(photos.items())
             for base in ("centre", "dark_50", "flat_50")]
    flagged, before = [], 0
    for it, rgb in items:
        frame = R.render(it, rgb)  # once for both engines
        if raised(engine.assess(frame)):
            flagged.append(it.key)
        before += bool(raised(classical.assess(frame)))
    ok = len(flagged) <= MAX_HARD_NEGATIVE_SHARE * len(items) and len(flagged) <= before
    return Check("hard_negatives", ok, {"flagged": len(flagged), "classical": before, "n": len(items),
                                        "frames": flagged})


def mild_levels(engine: Any, photos: dict[str, np.ndarray]) -> Check:
    """Level 1 of each distortion on each photo's centre window (where the distortion applies,
    :func:`livelens.quality.realset.distortable`): raised on at least :data:`MIN_MILD_RECALL`."""
    recall, ok = {}, True
    for dist in R.LEVELS:
        flag = R.FLAG_OF[dist]
        hits = [flag in raised(_answer(engine, R.Item(n, "centre", dist, 1, "block"), rgb))
                for n, rgb in sorted(photos.items()) if R.distortable(dist, R.base_frame(rgb, n, "centre"))]
        recall[dist] = {"n": len(hits), "recall": round(float(np.mean(hits)), 3) if hits else None}
        ok &= len(hits) >= 5 and float(np.mean(hits)) >= MIN_MILD_RECALL
    return Check("mild_levels", ok, recall)


def monotonic(engine: Any, photos: dict[str, np.ndarray], n_photos: int = 4) -> Check:
    """Mean flag probability over the first ``n_photos`` photos at levels 0 (clean) to 5: level 1
    at least :data:`MIN_STEP_FROM_CLEAN` above clean, and no level more than :data:`MAX_FALL`
    below the one before it."""
    names = sorted(photos)[:n_photos]
    means, ok = {}, True
    for dist in ("dark", "bright", "gaussian_blur", "motion_blur"):
        flag = R.FLAG_OF[dist]
        ps = [float(np.mean([_answer(engine, R.Item(n, "centre", dist if lv else "none", lv), photos[n])
                             ["flags_model"]["p"][flag] for n in names])) for lv in range(6)]
        means[dist] = [round(p, 3) for p in ps]
        ok &= ps[1] > ps[0] + MIN_STEP_FROM_CLEAN and all(b >= a - MAX_FALL for a, b in itertools.pairwise(ps))
    return Check("monotonic", ok, means)


def release_checks(engine: Any, classical: Any, photos: dict[str, np.ndarray]) -> list[Check]:
    """Every check of a model served by ``engine`` on its held-out ``photos``.

    Args:
        engine: A :class:`~livelens.quality.engine.QualityEngine` serving the model.
        classical: The same engine without a flag model (the classical thresholds).
        photos: The photos the model's card says it never saw.
    """
    return [hard_negatives(engine, classical, photos), mild_levels(engine, photos), monotonic(engine, photos)]


def require_passing(checks: list[Check], ref: str) -> None:
    """Raise unless every check held.

    Raises:
        ConfigError: Which checks failed, with their figures; the caller publishes nothing.
    """
    from livelens.errors import ConfigError

    failed = [c for c in checks if not c.ok]
    if failed:
        raise ConfigError(f"{ref} fails its release checks on its held-out photos, so it is not published: "
                          + "; ".join(f"{c.name} {c.detail}" for c in failed))
