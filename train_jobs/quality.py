"""``make train-quality``: train the NR-IQA model with Ray Train and register ``quality_iqa``.

Example::

    python -m train_jobs.quality --epochs 15 --num-workers 1
"""

from __future__ import annotations

import json
import os

from livelens.cli_config import config_from_args, config_parser
from livelens.quality.training import QualityTrainConfig, run


def parse_args(argv: list[str] | None = None) -> QualityTrainConfig:
    """Command-line flags onto :class:`QualityTrainConfig` (one per field, :mod:`livelens.cli_config`)."""
    parser = config_parser(QualityTrainConfig, description=__doc__)
    return config_from_args(QualityTrainConfig(), parser.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    # Ray reads the auth mode when it is imported: set it first (a local cluster uses token auth).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    cfg = parse_args(argv)
    cfg.validate()
    # address="local": always a fresh cluster of our own, never a teammate's running one.
    ray.init(address="local", num_cpus=max(2, cfg.num_workers * 2), include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024)
    try:
        summary = run(cfg)
    finally:
        ray.shutdown()
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2, default=str))


if __name__ == "__main__":
    main()
