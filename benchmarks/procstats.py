"""Memory, file descriptors and threads of each Serve process on this host, by deployment.

Ray names an actor's process after its class (``ray::ServeReplica:<app>:<Deployment>``, with
``.method`` appended while a task runs), so the processes of a local Serve instance can be found
and grouped without the dashboard's state API (which the test sessions leave off).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

_REPLICA = re.compile(r"^ray::ServeReplica:([^:\s]+):([^.\s]+)")


@dataclass
class RoleStats:
    """Totals over the processes of one role (a deployment, the proxy or the controller)."""

    processes: int = 0
    rss_mb: float = 0.0
    uss_mb: float = 0.0
    fds: int = 0
    threads: int = 0
    #: RSS split by kind (``/proc/<pid>/status``): anonymous memory is the process's own heap and
    #: stacks; shared memory is mostly pages of Ray's object store (``/dev/shm``) the process has
    #: read arguments from, which RSS counts but the object store owns and bounds.
    anon_mb: float = 0.0
    shmem_mb: float = 0.0


def role_of(cmdline: str, app: str | None = None) -> str | None:
    """``"<app>:<Deployment>"``, ``"proxy"`` or ``"controller"`` for a Serve process, else None.

    Args:
        cmdline: The process's first argv entry (Ray's process title).
        app: Keep only replicas of this application.
    """
    m = _REPLICA.match(cmdline)
    if m:
        return f"{m.group(1)}:{m.group(2)}" if app is None or m.group(1) == app else None
    if cmdline.startswith("ray::ProxyActor"):
        return "proxy"
    if cmdline.startswith("ray::ServeController"):
        return "controller"
    return None


def rss_kinds(pid: int) -> dict[str, float]:
    """``RssAnon``, ``RssFile`` and ``RssShmem`` of a process in MB (empty where ``/proc`` has none)."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Rss"):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return {}
    return out


def serve_process_stats(app: str | None = None, uss: bool = False) -> dict[str, RoleStats]:
    """Sum RSS (and optionally USS), open fds and threads per Serve role on this host.

    Args:
        app: Keep only this application's replicas (the proxy and controller are always kept).
        uss: Also read USS (memory unique to the process), which is slower: it walks the page maps.

    Returns:
        Role → totals, sorted by role.
    """
    import psutil

    stats: dict[str, RoleStats] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            argv = proc.info["cmdline"] or []
            role = role_of(argv[0] if argv else "", app)
            if role is None:
                continue
            with proc.oneshot():
                s = stats.setdefault(role, RoleStats())
                s.processes += 1
                s.rss_mb += proc.memory_info().rss / 2**20
                kinds = rss_kinds(proc.pid)
                s.anon_mb += kinds.get("RssAnon", 0.0)
                s.shmem_mb += kinds.get("RssShmem", 0.0)
                if uss:
                    s.uss_mb += proc.memory_full_info().uss / 2**20
                s.fds += proc.num_fds()
                s.threads += proc.num_threads()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a replica that stops while being read
    return dict(sorted(stats.items()))


def as_rows(stats: dict[str, RoleStats]) -> list[dict]:
    """Plain dicts (rounded) for JSON and tables."""
    return [{"role": role, **{k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(s).items()}}
            for role, s in stats.items()]


def format_table(stats: dict[str, RoleStats]) -> str:
    """A small text table, one role per line, with a total."""
    lines = [f"{'role':34s} {'procs':>5s} {'RSS MB':>8s} {'anon MB':>8s} {'shm MB':>7s} {'USS MB':>8s} "
             f"{'fds':>5s} {'threads':>7s}"]
    for role, s in stats.items():
        lines.append(f"{role:34s} {s.processes:5d} {s.rss_mb:8.0f} {s.anon_mb:8.0f} {s.shmem_mb:7.0f} {s.uss_mb:8.0f} "
                     f"{s.fds:5d} {s.threads:7d}")
    total = RoleStats(sum(s.processes for s in stats.values()), sum(s.rss_mb for s in stats.values()),
                      sum(s.uss_mb for s in stats.values()), sum(s.fds for s in stats.values()),
                      sum(s.threads for s in stats.values()), sum(s.anon_mb for s in stats.values()),
                      sum(s.shmem_mb for s in stats.values()))
    lines.append(f"{'total':34s} {total.processes:5d} {total.rss_mb:8.0f} {total.anon_mb:8.0f} {total.shmem_mb:7.0f} "
                 f"{total.uss_mb:8.0f} {total.fds:5d} {total.threads:7d}")
    return "\n".join(lines)


#: Shared libraries whose presence in a process's memory map says a heavy stack was imported there.
HEAVY_LIBS = {
    "torch": "libtorch_cpu", "cv2": "cv2/", "onnxruntime": "onnxruntime_pybind11_state",
    "mmcv": "mmcv/_ext", "pyarrow": "libarrow.so", "sklearn": "sklearn/", "scipy": "scipy/",
    "mediapipe": "mediapipe/", "rapidocr": "rapidocr",
}


def loaded_stacks(pid: int) -> list[str]:
    """Which :data:`HEAVY_LIBS` stacks process ``pid`` has mapped (read from ``/proc/<pid>/maps``)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return sorted(name for name, marker in HEAVY_LIBS.items() if marker in maps)


def stacks_by_role(app: str | None = None) -> dict[str, list[str]]:
    """Role → heavy stacks mapped by any of its processes."""
    import psutil

    out: dict[str, set[str]] = {}
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        role = role_of(argv[0] if argv else "", app)
        if role is not None:
            out.setdefault(role, set()).update(loaded_stacks(proc.pid))
    return {role: sorted(v) for role, v in sorted(out.items())}
