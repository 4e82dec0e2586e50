"""`make bench`: run every benchmark (or the ones named) one after another.

Each benchmark prints its figures as ratios against a baseline measured in the same run.
Usage: ``python -m benchmarks [generators|quality|ocr|persons|train|comm|serve|memory|overload|loop ...]``.
"""

from __future__ import annotations

import importlib
import sys
import time

BENCHES = ("generators", "quality", "ocr", "persons", "train", "comm", "serve", "memory", "overload", "loop")


def main(argv: list[str] | None = None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n=== bench_{name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(f"benchmarks.bench_{name}").main([])
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            failed.append(name)
            print(f"bench_{name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"=== bench_{name}: {time.perf_counter() - t0:.1f} s ===", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
