"""The canonical Ray ``runtime_env`` for shipping this repository to workers.

A ``working_dir`` upload of the repository root must leave out:

* ``datasets/``: a top-level folder of that name on a worker's ``sys.path`` shadows HuggingFace
  ``datasets`` (which Ray Data, transformers and timm import). It holds no code anyway.
* ``.venv``, ``.cache``, ``.wheelhouse``, ``runs``, ``.git``: large, machine-specific, or both;
  Ray refuses ``working_dir`` packages over 500 MiB, and a virtualenv is useless on another host.

``train_jobs`` and ``serve_apps`` should build their runtime envs with :func:`repo_runtime_env`
rather than spelling the list again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# gitignore-style patterns, as Ray's ``excludes`` takes them. A leading "/" anchors a pattern at
# the working_dir root (a nested ``docs/datasets/`` is still uploaded); no trailing "/", so the
# folder itself matches and is skipped whole rather than uploaded as an empty directory (an
# empty ``datasets/`` would still be importable as a namespace package).
WORKING_DIR_EXCLUDES: tuple[str, ...] = (
    "/datasets",
    "/.venv",
    "/.cache",
    "/.wheelhouse",
    "/runs",
    "/.git",
    "/.pytest_cache",
    "/.ruff_cache",
    "/livelens.egg-info",
    "__pycache__",
    "*.pyc",
)


def repo_runtime_env(
    *,
    working_dir: str | Path | None = None,
    env_vars: dict[str, str] | None = None,
    extra_excludes: list[str] | tuple[str, ...] = (),
    **extra: Any,
) -> dict[str, Any]:
    """Return a ``runtime_env`` dict that uploads the repository safely.

    Args:
        working_dir: The directory to upload; defaults to the repository root.
        env_vars: Environment variables for the workers.
        extra_excludes: More gitignore-style patterns to leave out, on top of
            :data:`WORKING_DIR_EXCLUDES`.
        **extra: Any other ``runtime_env`` fields (``pip``, ``py_modules``...), passed through.

    Returns:
        A plain dict for ``ray.init(runtime_env=...)``, ``.options(runtime_env=...)`` or a job
        submission.
    """
    env: dict[str, Any] = {
        "working_dir": str(working_dir if working_dir is not None else REPO),
        "excludes": [*WORKING_DIR_EXCLUDES, *extra_excludes],
    }
    if env_vars:
        env["env_vars"] = dict(env_vars)
    env.update(extra)
    return env
