"""CTC decoding of PP-OCR's recogniser output, with two fixes for what greedy decoding gets wrong.

rapidocr decodes greedily: the best class per frame, repeats merged, blanks dropped. Two of
its failure kinds on user crops come from that step, not from the network:

- **Doubled characters** (电电话 for 电话): one wide glyph lights the same class in two runs with
  a blank frame between them, and the blank splits it into two characters. A real double
  (哈哈, 666) puts its second run a whole character pitch later; an artefact puts it within a
  fraction of one. :attr:`LineDecoder.undouble` is that fraction.
- **Script confusion** (決 for 决): the recogniser's dictionary holds both forms and the frames
  of the character give both some mass. When the simplified form is the runner-up on the frames
  of a traditional character and its probability reaches :attr:`LineDecoder.simplify` times the
  traditional one's, the simplified form is read. Traditional text the recogniser is sure of
  stays traditional.

Both settings were chosen on the ``val`` split of :mod:`livelens.ocr.userset` (docs/ocr.md).
The traditional → simplified table is OpenCC's ``TSCharacters`` (Apache-2.0, shipped by the
``opencc-python-reimplemented`` wheel), first choice of each entry.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from livelens.errors import ConfigError

#: Second run of a character closer than this share of the line's character pitch is the same glyph.
UNDOUBLE = 0.5
#: p(simplified) / p(traditional) on a traditional character's frames from which the simplified form is read.
SIMPLIFY = 0.01


@functools.lru_cache(maxsize=2)
def _opencc_characters(name: str) -> dict[str, str]:
    """One of OpenCC's single-character tables, first choice of each entry, identities left out.

    Raises:
        ConfigError: The OpenCC dictionary is missing (``opencc-python-reimplemented`` not installed).
    """
    try:
        import opencc
    except ImportError as exc:
        raise ConfigError("opencc-python-reimplemented is not installed (a livelens dependency)") from exc
    path = Path(opencc.__file__).resolve().parent / "dictionary" / name
    if not path.is_file():
        raise ConfigError(f"OpenCC dictionary missing: {path}")
    table: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and len(parts[0]) == 1:
            first = parts[1].split(" ")[0]
            if len(first) == 1 and first != parts[0]:
                table[parts[0]] = first
    return table


def traditional_to_simplified() -> dict[str, str]:
    """Single-character traditional → simplified map (OpenCC ``TSCharacters``)."""
    return _opencc_characters("TSCharacters.txt")


def simplified_to_traditional() -> dict[str, str]:
    """Single-character simplified → traditional map (OpenCC ``STCharacters``), for rendering traditional test text."""
    return _opencc_characters("STCharacters.txt")


@dataclass
class Run:
    """One decoded character: its class, first and last frame, and the class's probability on its first frame."""

    cls: int
    start: int
    end: int
    conf: float


def runs(best: np.ndarray, prob: np.ndarray, blank: int = 0) -> list[Run]:
    """Greedy CTC runs of one line: consecutive frames of one non-blank class."""
    out: list[Run] = []
    prev = -1
    for t, c in enumerate(best.tolist()):
        if c != prev and c != blank:
            out.append(Run(c, t, t, float(prob[t])))
        elif c == prev and c != blank:
            out[-1].end = t
        prev = c
    return out


class LineDecoder:
    """Greedy CTC decoding (rapidocr's) plus the undoubling and simplified-preference fixes.

    Drop-in for rapidocr's ``CTCLabelDecode`` as the recogniser's ``postprocess_op``.

    Args:
        character: The recogniser's class list, blank first (rapidocr's ``CTCLabelDecode.character``).
        undouble: See :data:`UNDOUBLE`; ``None`` turns the fix off.
        simplify: See :data:`SIMPLIFY`; ``None`` turns the fix off.
    """

    def __init__(self, character: Sequence[str], *, undouble: float | None = UNDOUBLE,
                 simplify: float | None = SIMPLIFY):
        self.character = list(character)
        self.undouble = undouble
        self.simplify = simplify
        index = {c: i for i, c in enumerate(self.character)}
        table = traditional_to_simplified() if simplify is not None else {}
        self._to_simp = {index[t]: index[s] for t, s in table.items() if t in index and s in index}
        # Simplified characters that have a different traditional form: they mark a line as simplified.
        self._simp_only = frozenset(index[s] for s in set(table.values()) if s in index)

    def __call__(self, preds: np.ndarray, return_word_box: bool = False, **kwargs: Any) -> tuple[list, list]:
        best, prob = preds.argmax(axis=2), preds.max(axis=2)
        lines = []
        for b in range(len(preds)):
            rs = runs(best[b], prob[b])
            if self.undouble is not None:
                rs = self._undouble(rs)
            if self._to_simp:
                self._prefer_simplified(rs, preds[b])
            text = "".join(self.character[r.cls] for r in rs)
            lines.append((text, round(float(np.mean([r.conf for r in rs])) if rs else 0.0, 5)))
        # Word boxes are not asked for by livelens; rapidocr's callers get an empty list.
        return lines, []

    def _undouble(self, rs: list[Run]) -> list[Run]:
        if len(rs) < 2:
            return rs
        starts = np.array([r.start for r in rs])
        pitch = float(np.median(np.diff(starts))) if len(rs) >= 3 else float(starts[1] - starts[0])
        keep = [rs[0]]
        for r in rs[1:]:
            last = keep[-1]
            if r.cls == last.cls and (r.start - last.start) < self.undouble * pitch:
                last.end, last.conf = r.end, max(last.conf, r.conf)
                continue
            keep.append(r)
        return keep

    def _prefer_simplified(self, rs: list[Run], probs: np.ndarray) -> None:
        hesitant, trad_votes, simp_votes = [], 0, 0
        for r in rs:
            simp = self._to_simp.get(r.cls)
            if simp is None:
                simp_votes += r.cls in self._simp_only
                continue
            frames = probs[r.start:r.end + 1]
            peak = frames.max(axis=0)
            peak[r.cls] = -1.0
            ratio = float((frames[:, simp] / np.maximum(frames[:, r.cls], 1e-9)).max())
            if int(peak.argmax()) == simp and ratio >= self.simplify:
                hesitant.append((r, simp, float(frames[:, simp].max())))
            else:
                trad_votes += 1  # a traditional character the recogniser is sure of
        # The line's script decides: a sure traditional character outvotes a simplified-only one.
        if hesitant and simp_votes > trad_votes:
            for r, simp, p in hesitant:
                r.cls, r.conf = simp, max(r.conf, p)
