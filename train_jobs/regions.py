"""``make train-regions``: train the text-region ads classifier and register ``ads_regions``.

PP-OCR's detector proposes text boxes in the generated frames; a frozen ImageNet mobilenet_v2
and a small head classify each box (with its surroundings) as a watermark, a logo, a banner, a
contact overlay, or nothing. See ``livelens.evidence.regions`` and ``livelens.train.regions``.

Example::

    python -m train_jobs.regions                             # all frames: 16-42 min on 2 cores (text detection), ~2 min when cached
    python -m train_jobs.regions --train-limit 100 --test-limit 0 --no-register
"""

from __future__ import annotations

import json
import sys

from livelens.cli_config import config_from_args, config_parser
from livelens.errors import LivelensError
from livelens.train.regions import RegionTrainConfig, run


def parse_args(argv: list[str] | None = None) -> RegionTrainConfig:
    """Command-line flags onto :class:`RegionTrainConfig` (one per field; limits take a number or ``all``)."""
    parser = config_parser(RegionTrainConfig, description=__doc__)
    return config_from_args(RegionTrainConfig(), parser.parse_args(argv))


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
