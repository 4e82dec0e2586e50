"""Run a chunked generator as Ray tasks with a progress bar.

Generators have the signature ``fn(start, count, seed, cfg) -> list[row]`` and are pure
functions of their arguments, so the chunking (and the number of workers) never changes
the output: rows are concatenated in slot order.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

Generator = Callable[..., list[dict]]


def _chunks(total: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(chunk, total - s)) for s in range(0, total, chunk)]


def run_generator(
    fn: Generator,
    total: int,
    seed: int,
    *args: Any,
    chunk: int = 50,
    desc: str = "",
    use_ray: bool | None = None,
    num_cpus: float = 1.0,
) -> list[dict]:
    """Generate ``total`` slots in chunks, in parallel on Ray when it is running.

    Args:
        fn: The generator (``fn(start, count, seed, *args)``).
        total: Number of slots.
        seed: Dataset seed.
        *args: Extra arguments for ``fn`` (e.g. its config dataclass).
        chunk: Slots per Ray task; small enough that the progress bar moves.
        desc: Progress-bar label.
        use_ray: Force Ray on/off; default: use it if ``ray.is_initialized()``.
        num_cpus: Ray CPUs per task.

    Returns:
        All rows, in slot order.
    """
    import ray

    chunks = _chunks(total, chunk)
    use_ray = ray.is_initialized() if use_ray is None else use_ray
    disable = os.environ.get("LIVELENS_NO_PROGRESS") == "1"
    results: list[list[dict] | None] = [None] * len(chunks)
    with tqdm(total=total, desc=desc or getattr(fn, "__name__", "generate"), unit="img", disable=disable) as bar:
        if not use_ray:
            for i, (start, count) in enumerate(chunks):
                results[i] = fn(start, count, seed, *args)
                bar.update(count)
        else:
            remote = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
            refs = {remote.remote(start, count, seed, *args): i for i, (start, count) in enumerate(chunks)}
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = refs[ref]
                    results[i] = ray.get(ref)
                    bar.update(chunks[i][1])
    return [row for part in results for row in (part or [])]
