"""Driver-side helpers: run config with storage on a path or URI, live progress, result loading."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ray.train import CheckpointConfig, FailureConfig, RunConfig, UserCallback

from livelens.errors import ConfigError
from livelens.train.loop import METRICS_FILE, load_checkpoint_state

PROGRESS_KEYS = ("train_loss", "val_loss", "val_macro_f1", "val_min_recall", "val_min_precision", "images_per_s")


class ProgressCallback(UserCallback):
    """Prints one progress line per reported epoch (runs in the Train controller, logs reach the driver)."""

    def __init__(self, label: str = "train", stream: TextIO | None = None):
        self.label = label
        self.stream = stream
        self.t0 = time.time()

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        """Format rank 0's metrics."""
        m = metrics[0] if metrics else {}
        parts = [f"[{self.label}] epoch {m.get('epoch', '?')}"]
        for k in PROGRESS_KEYS:
            v = m.get(k)
            if isinstance(v, int | float) and math.isfinite(v):
                parts.append(f"{k}={v:.4g}")
        parts.append(f"elapsed={time.time() - self.t0:.0f}s")
        if checkpoint is not None:
            parts.append(f"ckpt={checkpoint.path}")
        print("  ".join(parts), file=self.stream or sys.stdout, flush=True)


def storage_path(path_or_uri: str) -> str:
    """A storage path Ray accepts: URIs (``s3://``, ``gs://``, ``file://``…) as is, local paths absolute."""
    if "://" in path_or_uri:
        import pyarrow.fs as pafs

        try:
            pafs.FileSystem.from_uri(path_or_uri)
        except Exception as e:  # pyarrow raises several types for unknown schemes / bad URIs
            raise ConfigError(f"storage_path {path_or_uri!r} is not a usable pyarrow filesystem URI: {e}") from e
        return path_or_uri
    return str(Path(path_or_uri).expanduser().resolve())


def make_run_config(name: str, storage: str, *, max_failures: int = 1, keep: int = 2,
                    callbacks: Sequence[UserCallback] = (), progress: bool = True) -> RunConfig:
    """A Train V2 RunConfig: checkpoints every epoch under ``storage/name``, retries on worker death.

    Rerunning with the same ``name`` and ``storage`` resumes from the latest checkpoint there.
    """
    cbs = list(callbacks) + ([ProgressCallback(name)] if progress else [])
    return RunConfig(name=name, storage_path=storage_path(storage),
                     failure_config=FailureConfig(max_failures=max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=keep), callbacks=cbs)


def read_checkpoint(checkpoint: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, bytes]]:
    """The (state, metrics, artifact files) of a reported checkpoint, from local or remote storage."""
    with checkpoint.as_directory() as d:
        state = load_checkpoint_state(d)
        metrics = json.loads((Path(d) / METRICS_FILE).read_text())
        files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.suffix in {".png", ".md", ".csv"}}
    return state, metrics, files


def init_ray(num_cpus: int | None = None, attempts: int = 3) -> None:
    """Connect to Ray for a job: the cluster in ``RAY_ADDRESS`` (``ray job submit``), else our own.

    A local cluster gets more *logical* CPUs than cores: with the default (one per core),
    two Train workers of one CPU each leave Ray Data no CPU to read and decode the manifest,
    and the job stalls at 0 rows. Start-up is retried because a raylet on a loaded host can
    miss Ray's fixed registration window.

    The dashboard is on because Train V2's ``PlacementGroupCleaner`` asks the State API (served by
    the dashboard) whether a run's controller is gone. Without it, the worker placement groups of
    finished or ASHA-stopped sweep trials were never released (5 of 6 CPUs stayed reserved), and
    the next trials timed out waiting for workers.
    """
    import os

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    for attempt in range(attempts):
        try:
            ray.init(address="local", num_cpus=num_cpus or max(6, 3 * (os.cpu_count() or 2)),
                     object_store_memory=1024 * 1024 * 1024, include_dashboard=True)
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise
            time.sleep(5)
