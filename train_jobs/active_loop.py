"""``make active-loop``: active learning against random selection on a simulated labelling loop.

Example::

    python -m train_jobs.active_loop --seeds 0 1 2 --loop.rounds 20
"""

from __future__ import annotations

import json
import os

from livelens.cli_config import config_from_args, config_parser
from livelens.loop.simulate import SimulationJob, run_simulation


def parse_args(argv: list[str] | None = None) -> SimulationJob:
    """Command-line flags onto :class:`SimulationJob` (one per field, :mod:`livelens.cli_config`)."""
    parser = config_parser(SimulationJob, description=__doc__)
    return config_from_args(SimulationJob(), parser.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    job = parse_args(argv)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, object_store_memory=1024 ** 3)
    try:
        report = run_simulation(job)
    finally:
        ray.shutdown()
    print(json.dumps(report["mean"], indent=1))
    print(f"report: {job.out}/report.md")


if __name__ == "__main__":
    main()
