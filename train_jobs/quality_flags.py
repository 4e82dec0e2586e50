"""``make train-quality-flags``: fit the learned quality flags on graded distortions of real photos,
evaluate them per seed through the serving code, and register ``quality_flags``.

Example::

    python -m train_jobs.quality_flags --seeds 0 1 2 --ship-seed 0
"""

from __future__ import annotations

import json
import os

from livelens.cli_config import config_from_args, config_parser
from livelens.quality.flag_training import FlagTrainConfig, run


def parse_args(argv: list[str] | None = None) -> FlagTrainConfig:
    """Command-line flags onto :class:`FlagTrainConfig` (one per field, :mod:`livelens.cli_config`)."""
    parser = config_parser(FlagTrainConfig, description=__doc__)
    return config_from_args(FlagTrainConfig(), parser.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    # Ray reads the auth mode when it is imported: set it first (a local cluster uses token auth).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    cfg = parse_args(argv)
    # address="local": always a fresh cluster of our own, never a teammate's running one.
    ray.init(address="local", include_dashboard=False, log_to_driver=False, object_store_memory=1024 * 1024 * 1024)
    try:
        result = run(cfg)
    finally:
        ray.shutdown()
    print(json.dumps({"ref": result.get("ref"), "wall_time_s": result["wall_time_s"],
                      "exact": {k: (v["exact_before"], v["exact_after"]) for k, v in result["seeds"].items()}},
                     indent=2))
    print(f"report: {cfg.out}/report.md")


if __name__ == "__main__":
    main()
