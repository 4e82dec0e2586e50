"""Every training job through ``ray job submit``, for users who don't know Ray's CLI.

    livelens jobs submit safety --wait -- --epochs 3      # train_jobs.safety on the cluster
    livelens jobs status raysubmit_...                     # PENDING / RUNNING / SUCCEEDED / FAILED
    livelens jobs logs raysubmit_... --follow
    livelens jobs list
    livelens jobs stop raysubmit_...

A job runs ``python -m train_jobs.<job>`` on the cluster with the project's runtime env
(:func:`cluster.runtime_env.repo_runtime_env`: the repository as ``working_dir``, without
``datasets/``, ``runs/``, ``.venv`` and other large folders). Ray's job client authenticates with
the cluster token (``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``), as ``ray job submit`` does.

Where things land: the uploaded working dir is a fresh copy, so the job gets the submitter's
model store (``LIVELENS_MODEL_STORE``, an absolute path or a URI) and relative paths among the
job's arguments that exist here are made absolute. On a cluster of several machines, give
shared paths or URIs (``--store s3://…``, ``--storage-path s3://…``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from livelens.errors import ConfigError, InvalidArgumentError, LivelensError
from livelens.registry import Registry

#: The project's jobs by the name users submit them under.
JOBS: Registry[str] = Registry("job")
for _name, _module in (("safety", "train_jobs.safety"), ("sweep", "train_jobs.sweep"), ("ocr", "train_jobs.ocr"),
                       ("quality", "train_jobs.quality"), ("quality-flags", "train_jobs.quality_flags"),
                       ("regions", "train_jobs.regions"), ("defaults", "train_jobs.defaults"),
                       ("active-loop", "train_jobs.active_loop"), ("eval-safety", "train_jobs.eval_safety"),
                       ("eval-dedupe", "train_jobs.eval_dedupe")):
    JOBS.register(_name, _module)

#: Environment variables handed on to the job when the submitter has them set.
PASS_ENV = ("TORCH_HOME", "LIVELENS_MODEL_STORE", "LIVELENS_MODEL_STORES", "LIVELENS_SHARED", "OMP_NUM_THREADS")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


class JobError(LivelensError):
    """A job could not be submitted or followed (refused, unknown id, failed to start)."""

    type = "job_error"
    code = "job_error"


class JobServerUnreachableError(JobError):
    """No job server answered at the address (wrong URL, cluster down, or no dashboard)."""

    code = "unreachable"


def dashboard_address(address: str | None = None) -> str:
    """The job server's URL: ``address``, ``RAY_DASHBOARD_ADDRESS``, an http ``RAY_ADDRESS``, or the local default.

    A given ``address`` without a scheme is taken as ``http://``; a ``RAY_ADDRESS`` without one is
    a GCS address (``host:6379``), which no job server answers on, so it is skipped.
    """
    if address:
        return (address if address.startswith(("http://", "https://")) else f"http://{address}").rstrip("/")
    for candidate in (os.environ.get("RAY_DASHBOARD_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if candidate and candidate.startswith(("http://", "https://")):
            return candidate.rstrip("/")
    return DEFAULT_DASHBOARD


def is_loopback(address: str) -> bool:
    host = urlparse(address).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def absolutise(args: list[str], cwd: Path | None = None) -> list[str]:
    """Job arguments with each relative path that exists under ``cwd`` made absolute.

    The job's working directory is an uploaded copy without ``runs/`` and ``datasets/``, so
    ``--manifest runs/data/frames`` would name nothing there.
    """
    cwd = cwd or Path.cwd()
    out = []
    for arg in args:
        flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        candidate = value if (eq or not flag) else ""
        if candidate and not candidate.startswith(("-", "/")) and "://" not in candidate and (cwd / candidate).exists():
            resolved = str((cwd / candidate).resolve())
            arg = f"{flag}={resolved}" if eq else resolved
        out.append(arg)
    return out


def entrypoint(job: str, args: list[str], python: str = "python") -> str:
    """The shell command the job runs: ``python -m train_jobs.<job> <args>``.

    Raises:
        ConfigError: ``job`` is not one of :data:`JOBS`.
    """
    module = JOBS.get(job)
    return shlex.join([python, "-m", module, *args])


def job_runtime_env(env_vars: dict[str, str] | None = None, store: str | None = None) -> dict[str, Any]:
    """The runtime env of a submitted job: the repository, and the submitter's store and caches."""
    from cluster.runtime_env import repo_runtime_env
    from livelens.store import USER_STORE_ENV, user_store

    env = {k: os.environ[k] for k in PASS_ENV if os.environ.get(k)}
    env[USER_STORE_ENV] = store or os.environ.get(USER_STORE_ENV) or str(Path(user_store()).resolve())
    env.setdefault("TORCH_HOME", str(Path(os.environ.get("TORCH_HOME", ".cache/torch")).resolve()))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(env_vars or {})
    return repo_runtime_env(env_vars=env)


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # Ray raises ConnectionError / RuntimeError with its own text
        raise JobServerUnreachableError(f"cannot reach the Ray job server at {url}: {str(exc)[:300]} (set --address or "
                       "RAY_ADDRESS to the dashboard URL, and RAY_AUTH_TOKEN if the cluster uses token auth)") from None


def submit(job: str, args: list[str] | None = None, *, address: str | None = None, python: str | None = None,
           store: str | None = None, env_vars: dict[str, str] | None = None, submission_id: str | None = None) -> str:
    """Submit ``train_jobs.<job>`` with ``args`` to the cluster; returns the submission id.

    Args:
        job: A name of :data:`JOBS` (``safety``, ``sweep``, ``ocr`` …).
        args: The job's own flags (``--epochs 3``); existing relative paths are made absolute.
        address: The dashboard URL (default: ``RAY_ADDRESS`` / ``RAY_DASHBOARD_ADDRESS``).
        python: The interpreter on the cluster: default this one on a loopback cluster (same
            machine, same virtualenv), else ``python``.
        store: Where the job publishes its model (default: this machine's user store).
        env_vars: More environment variables for the job.
        submission_id: A chosen id (default: Ray's ``raysubmit_…``).

    Raises:
        ConfigError: Unknown job.
        JobError: The cluster refused or could not be reached.
    """
    url = dashboard_address(address)
    python = python or (sys.executable if is_loopback(url) else "python")
    command = entrypoint(job, absolutise(list(args or [])), python)
    client = _client(url)
    try:
        return client.submit_job(entrypoint=command, runtime_env=job_runtime_env(env_vars, store),
                                 submission_id=submission_id, metadata={"livelens_job": job})
    except Exception as exc:
        raise JobError(f"job submission to {url} failed: {str(exc)[:500]}") from None


def status(submission_id: str, address: str | None = None, client: Any = None) -> dict[str, Any]:
    """The job's status, message, entrypoint and times (``client``: reuse an open job client)."""
    client = client or _client(address)
    try:
        info = client.get_job_info(submission_id)
    except Exception as exc:
        raise JobError(f"no job {submission_id!r}: {str(exc)[:300]}") from None
    return {"submission_id": submission_id, "status": str(getattr(info.status, "value", info.status)),
            "message": info.message, "entrypoint": info.entrypoint, "start_time": info.start_time,
            "end_time": info.end_time, "metadata": info.metadata}


def logs(submission_id: str, address: str | None = None) -> str:
    """The job's log so far."""
    try:
        return _client(address).get_job_logs(submission_id)
    except JobError:
        raise
    except Exception as exc:
        raise JobError(f"no logs for job {submission_id!r}: {str(exc)[:300]}") from None


def follow(submission_id: str, address: str | None = None, out=None) -> str:
    """Print the job's log as it is written until the job ends; returns its final status."""
    out = out or sys.stdout
    client = _client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return wait(submission_id, address, timeout_s=60, client=client)


def wait(submission_id: str, address: str | None = None, timeout_s: float = 3600, poll_s: float = 1.0,
         client: Any = None) -> str:
    """Wait until the job ends; returns SUCCEEDED, FAILED or STOPPED.

    Raises:
        JobError: Still running after ``timeout_s``.
    """
    client = client or _client(address)  # one client for every poll (each new one checks the server)
    deadline = time.monotonic() + timeout_s
    while True:
        state = status(submission_id, client=client)["status"]
        if state in TERMINAL:
            return state
        if time.monotonic() > deadline:
            raise JobError(f"job {submission_id} still {state} after {timeout_s:g} s")
        time.sleep(poll_s)


def list_jobs(address: str | None = None) -> list[dict[str, Any]]:
    """Every job the cluster knows, oldest first."""
    client = _client(address)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    # Drivers that attached with ray.init() (a notebook, `make run`) are listed too, without a submission id.
    return [{"submission_id": j.submission_id or f"driver:{j.job_id}", "status": str(getattr(j.status, "value", j.status)),
             "job": (j.metadata or {}).get("livelens_job", ""), "entrypoint": j.entrypoint or ""} for j in jobs]


def stop(submission_id: str, address: str | None = None) -> bool:
    """Ask the cluster to stop the job; True if it was running."""
    return bool(_client(address).stop_job(submission_id))


# ---- the `livelens jobs` command ------------------------------------------------------------


def add_jobs_parser(sub: argparse._SubParsersAction) -> None:
    """``livelens jobs …`` under the main command's subparsers."""
    jobs = sub.add_parser("jobs", help="submit and follow training jobs on a Ray cluster (ray job submit)")
    jsub = jobs.add_subparsers(dest="jobs_cmd", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--address", default=None, help="the cluster's dashboard URL (env RAY_ADDRESS)")
        return p

    s = common(jsub.add_parser("submit", help="submit train_jobs.<job>; its flags go after --",
                               usage="livelens jobs submit JOB [options] [-- JOB FLAGS ...]"))
    s.add_argument("job", choices=sorted(JOBS.names()))
    s.add_argument("--python", default=None, help="the interpreter on the cluster")
    s.add_argument("--store", default=None, help="where the job publishes models (path or URI)")
    s.add_argument("--id", default=None, help="a submission id of your choice")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--wait", action="store_true", help="wait for the job, then print its status")
    mode.add_argument("--follow", action="store_true", help="print its log as it runs, then its status")
    for name, text in (("status", "a job's status"), ("stop", "stop a job")):
        common(jsub.add_parser(name, help=text)).add_argument("submission_id")
    lg = common(jsub.add_parser("logs", help="a job's log"))
    lg.add_argument("submission_id")
    lg.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    common(jsub.add_parser("list", help="every job of the cluster"))


def run_cli(args: argparse.Namespace) -> int:
    """Run a parsed ``livelens jobs`` command; errors print one line (exit 1, or 3 when unreachable)."""
    import json

    try:
        if args.jobs_cmd == "submit":
            sid = submit(args.job, list(getattr(args, "job_args", [])), address=args.address, python=args.python, store=args.store,
                         submission_id=args.id)
            print(sid, flush=True)
            if args.follow or args.wait:
                final = follow(sid, args.address) if args.follow else wait(sid, args.address)
                print(f"job {sid}: {final}", file=sys.stderr)
                return 0 if final == "SUCCEEDED" else 1
            return 0
        if args.jobs_cmd == "status":
            print(json.dumps(status(args.submission_id, args.address), indent=2))
            return 0
        if args.jobs_cmd == "logs":
            if args.follow:
                final = follow(args.submission_id, args.address)
                return 0 if final == "SUCCEEDED" else 1
            sys.stdout.write(logs(args.submission_id, args.address))
            return 0
        if args.jobs_cmd == "list":
            for j in list_jobs(args.address):
                print(f"{j['submission_id']:<32} {j['status']:<10} {j['job'] or j['entrypoint'][:60]}")
            return 0
        if args.jobs_cmd == "stop":
            print("stopped" if stop(args.submission_id, args.address) else "not running")
            return 0
    except (ConfigError, InvalidArgumentError) as exc:
        print(f"livelens jobs: {exc}", file=sys.stderr)
        return 2
    except JobError as exc:
        print(f"livelens jobs: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, JobServerUnreachableError) else 1
    raise AssertionError(args.jobs_cmd)
