"""``make train-regions``: train the text-region ads classifier and register ``ads_regions``.

PP-OCR's detector proposes text boxes in the generated frames; a frozen ImageNet mobilenet_v2
and a small head classify each box (with its surroundings) as a watermark, a logo, a banner, a
contact overlay, or nothing. See ``livelens.evidence.regions`` and ``livelens.train.regions``.

Example::

    python -m train_jobs.regions                             # all frames: 16-42 min on 2 cores (text detection), ~2 min when cached
    python -m train_jobs.regions --train-limit 100 --test-limit 0 --no-register
"""

from __future__ import annotations

import argparse
import json
import sys

from livelens.errors import LivelensError
from livelens.train.regions import RegionTrainConfig, run


def _limit(v: str) -> int | None:
    return None if v in ("all", "") else int(v)


def parse_args(argv: list[str] | None = None) -> RegionTrainConfig:
    """Command-line flags onto :class:`RegionTrainConfig`."""
    base = RegionTrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default=base.manifest)
    p.add_argument("--train-limit", type=_limit, default=base.train_limit, help="frames, or 'all'")
    p.add_argument("--val-limit", type=_limit, default=base.val_limit)
    p.add_argument("--test-limit", type=_limit, default=base.test_limit, help="0 skips the held-out report")
    p.add_argument("--epochs", type=int, default=base.epochs)
    p.add_argument("--lr", type=float, default=base.lr)
    p.add_argument("--model-store", default=base.model_store)
    p.add_argument("--model-name", default=base.model_name)
    p.add_argument("--no-register", action="store_true")
    a = p.parse_args(argv)
    return RegionTrainConfig(manifest=a.manifest, train_limit=a.train_limit, val_limit=a.val_limit,
                             test_limit=a.test_limit, epochs=a.epochs, lr=a.lr, model_store=a.model_store,
                             model_name=a.model_name, register=not a.no_register)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        summary = run(cfg, progress=lambda s, d, n: print(f"[regions] {s} {d}/{n}", file=sys.stderr, flush=True))
    except LivelensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
