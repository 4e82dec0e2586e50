"""`import datasets` must never load code from this repository.

HuggingFace `datasets` is imported by Ray Data (`from_huggingface`), transformers and timm. A
repo-root `datasets/` that is a regular package (an `__init__.py`) or a `datasets.py` module wins
that import wherever the repo root is on `sys.path`: `python -c` from the root, pytest, `serve run`,
and Ray workers whose `working_dir` is the repo.

Python also makes *any* directory on `sys.path` a namespace-package portion. That portion can never
beat an installed regular package (the path scan returns the first regular package it finds, and
only falls back to namespace portions when there is none), so it is harmless when HuggingFace
`datasets` is installed; when it is not, `import datasets` yields an empty module instead of
ImportError. So the checks are: no regular package or module from the repo, any namespace portion in
the repo holds no Python, and uploads via `cluster.runtime_env` leave `datasets/` out entirely.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.runtime_env import WORKING_DIR_EXCLUDES, repo_runtime_env

# Ray reads RAY_AUTH_MODE once, when `ray` is first imported; conftest's ray_session sets it only
# after its own `import ray`, which leaves the driver in "disabled" mode against a token-mode GCS.
# Setting it at collection time (before anything imports ray) keeps the session fixture working.
os.environ.setdefault("RAY_AUTH_MODE", "token")

REPO = Path(__file__).resolve().parents[1]

# Runs identically on the driver, in pytest and on a Ray worker; stdlib only.
PROBE = """
import importlib.util, json, os, sys
spec = importlib.util.find_spec("datasets")
info = None if spec is None else {
    "origin": spec.origin if spec.has_location else None,
    "locations": list(spec.submodule_search_locations or []),
}
print("@@" + json.dumps({"spec": info, "cwd": os.getcwd(), "path0": sys.path[0]}))
"""


def _probe_here() -> dict:
    spec = importlib.util.find_spec("datasets")
    info = (
        None
        if spec is None
        else {
            "origin": spec.origin if spec.has_location else None,
            "locations": list(spec.submodule_search_locations or []),
        }
    )
    return {"spec": info, "cwd": os.getcwd(), "path0": sys.path[0]}


def _inside(path: str | None, roots: list[Path]) -> bool:
    if not path:
        return False
    p = Path(path).resolve()
    return any(p == r or r in p.parents for r in roots)


def shadow_problem(result: dict, roots: list[Path]) -> str | None:
    """Why `import datasets` would load something from ``roots``, or None if it cannot."""
    spec = result["spec"]
    if spec is None:
        return None
    if _inside(spec["origin"], roots):
        return f"`import datasets` loads {spec['origin']} from the repository"
    for loc in spec["locations"]:
        if not _inside(loc, roots):
            continue
        if spec["origin"] is None:  # namespace portion: only harmless while it holds no Python
            code = sorted(
                str(p.relative_to(loc)) for p in Path(loc).rglob("*") if p.suffix in {".py", ".so", ".pyc"}
            )
            if code:
                return f"{loc} is importable as `datasets` and holds Python: {code[:5]}"
    return None


def test_datasets_folder_is_not_a_package():
    assert (REPO / "datasets").is_dir()
    assert not (REPO / "datasets" / "__init__.py").exists(), (
        "datasets/__init__.py shadows HuggingFace datasets"
    )
    assert not (REPO / "datasets.py").exists()
    assert (REPO / "datasets" / "README.md").is_file(), (
        "datasets/README.md explains why there is no __init__.py"
    )


def test_shadow_check_catches_a_regular_package(tmp_path):
    # The check itself must fail on the real hazard: a `datasets/__init__.py` on sys.path[0].
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "__init__.py").write_text("")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    result = json.loads(proc.stdout.split("@@", 1)[1])
    assert shadow_problem(result, [tmp_path]) is not None
    (tmp_path / "datasets" / "__init__.py").unlink()
    (tmp_path / "datasets" / "loader.py").write_text("")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert "holds Python" in shadow_problem(json.loads(proc.stdout.split("@@", 1)[1]), [tmp_path])


def test_driver_from_repo_root():
    # Like `python -c ...` typed at the repo root: sys.path[0] is the root.
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.split("@@", 1)[1])
    assert Path(result["cwd"]).resolve() == REPO
    assert shadow_problem(result, [REPO]) is None, result


def test_under_pytest():
    assert shadow_problem(_probe_here(), [REPO]) is None


# Ray accepts a local working_dir only at the job level (ray.init), not per task, so a second
# driver joins the suite's cluster as its own job with the repo as working_dir.
WORKER_DRIVER = """
import json, sys, ray
from cluster.runtime_env import repo_runtime_env
ray.init(address=sys.argv[1], runtime_env=repo_runtime_env(), log_to_driver=False, logging_level="ERROR")
PROBE = sys.argv[2]

@ray.remote(num_cpus=0.1)
def probe():
    import contextlib, io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(PROBE, {})
    return buf.getvalue()

print(ray.get(probe.remote(), timeout=180), end="")
"""


@pytest.mark.ray
@pytest.mark.slow
def test_ray_worker_with_repo_working_dir(ray_session, tmp_path):
    env = repo_runtime_env()
    assert env["working_dir"] == str(REPO) and "/datasets" in env["excludes"]
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, "-c", WORKER_DRIVER, address, PROBE],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("@@", 1)[1])
    workdir = Path(result["cwd"])
    assert workdir != REPO and (workdir / "cluster" / "runtime_env.py").is_file(), "not the uploaded copy"
    assert not (workdir / "datasets").exists(), "datasets/ was uploaded despite the excludes"
    assert not (workdir / ".venv").exists() and not (workdir / ".git").exists()
    assert shadow_problem(result, [REPO, workdir]) is None, result


def test_excludes_cover_the_heavy_folders():
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray's packaging uses

    spec = PathSpec.from_lines("gitwildmatch", WORKING_DIR_EXCLUDES)
    for path in [
        "datasets",
        "datasets/README.md",
        ".venv",
        ".venv/bin/python",
        "runs",
        ".cache",
        ".wheelhouse",
        ".git",
    ]:
        assert spec.match_file(path), path
    for path in [
        "livelens/data/build.py",
        "cluster/local.py",
        "livelens/datasets_util.py",
        "docs/datasets/x.md",
    ]:
        assert not spec.match_file(path), path


def _ray_package_names(excludes: list[str], tmp_path: Path) -> list[str]:
    """The file names in the zip Ray would upload for working_dir=REPO (Ray's own packager)."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    out = tmp_path / f"pkg{len(excludes)}.zip"
    create_package(str(REPO), out, include_gitignore=True, excludes=excludes)
    with zipfile.ZipFile(out) as zf:
        return zf.namelist()


def test_repo_upload_leaves_out_datasets_and_heavy_folders(tmp_path):
    names = _ray_package_names(list(repo_runtime_env()["excludes"]), tmp_path)
    tops = {n.split("/", 1)[0] for n in names}
    assert "cluster" in tops and "livelens" in tops
    assert not tops & {"datasets", ".venv", ".git", ".cache", ".wheelhouse", "runs"}, sorted(tops)
    # Without the excludes the same packager does ship datasets/ (and .git): the excludes matter.
    bare = {n.split("/", 1)[0] for n in _ray_package_names([], tmp_path)}
    assert "datasets" in bare and ".git" in bare
