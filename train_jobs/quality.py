"""``make train-quality``: train the NR-IQA model with Ray Train and register ``quality_iqa``.

Example::

    python -m train_jobs.quality --epochs 15 --num-workers 1
"""

from __future__ import annotations

import argparse
import json
import os

from livelens.quality.training import QualityTrainConfig, run
from livelens.train.loop import LoopConfig


def parse_args(argv: list[str] | None = None) -> QualityTrainConfig:
    """Command-line flags onto :class:`QualityTrainConfig`."""
    base = QualityTrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default=base.manifest)
    p.add_argument("--shared", default=base.shared)
    p.add_argument("--num-workers", type=int, default=base.num_workers)
    p.add_argument("--cpus-per-worker", type=float, default=base.cpus_per_worker)
    p.add_argument("--epochs", type=int, default=base.loop.epochs)
    p.add_argument("--passes-per-epoch", type=int, default=base.passes_per_epoch)
    p.add_argument("--lr", type=float, default=base.loop.lr)
    p.add_argument("--batch-size", type=int, default=base.loop.batch_size)
    p.add_argument("--storage-path", default=base.storage_path)
    p.add_argument("--run-name", default="", help="reuse one to resume")
    p.add_argument("--model-store", default=base.model_store)
    p.add_argument("--no-register", action="store_true")
    a = p.parse_args(argv)
    return QualityTrainConfig(
        manifest=a.manifest, shared=a.shared, num_workers=a.num_workers, cpus_per_worker=a.cpus_per_worker,
        passes_per_epoch=a.passes_per_epoch, storage_path=a.storage_path, run_name=a.run_name,
        model_store=a.model_store, register=not a.no_register,
        loop=LoopConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size),
    )


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
