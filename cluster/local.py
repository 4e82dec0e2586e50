"""A real multi-node Ray cluster on one machine: one head plus N worker raylets on 127.0.0.1.

Every node is a separate ``ray start`` raylet with its own logical resources, so code that must
spread over nodes (a 2-worker Ray Train job, placement groups, node affinity) can be checked on a
laptop. Worker ``i`` gets ``--node-name w{i}``, the label ``livelens.io/node=w{i}`` and the custom
resources ``{"node_w{i}": 1, "livelens_worker": 1}``; the head gets ``head`` and
``{"node_head": 1}`` and, by default, no CPUs, so work lands on the workers as on a real cluster.

Token auth is always on, with a token private to this cluster (never ``~/.ray/auth_token``,
which other local Ray sessions share). Clients authenticate with the variables from
:meth:`LocalCluster.client_env`.

A process can be connected to only one Ray cluster, and the test suite already holds one, so
drivers run in a subprocess: :meth:`LocalCluster.run_driver`.

CLI (``make cluster-up`` / ``make cluster-down``)::

    python -m cluster.local up --workers 2
    eval "$(python -m cluster.local env)"     # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN
    python -m cluster.local status
    python -m cluster.local down
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livelens.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# The CLI's cluster lives at a fixed place so that `down` and `status` can find it again.
CLI_ROOT = Path(tempfile.gettempdir()) / "livelens-cluster-cli"
STATE_FILE = "cluster.json"
# Every process of one cluster inherits this variable (raylets pass their environment on to
# workers), so `stop` can find exactly this cluster's processes and no one else's.
MARKER_ENV = "LIVELENS_CLUSTER_ROOT"
MB = 1024 * 1024

_NODES_SCRIPT = """
import json, os, sys, time
import ray
want = int(sys.argv[1]); deadline = time.monotonic() + float(sys.argv[2])
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level="ERROR")
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= want or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print("@@NODES@@" + json.dumps([
    {"node_id": n["NodeID"], "name": n.get("NodeName", ""), "address": n["NodeManagerAddress"],
     "is_head": bool(n.get("Resources", {}).get("node_head")), "resources": n["Resources"],
     "labels": n.get("Labels", {})}
    for n in nodes
]))
"""


# Ray binds Unix sockets at <root>/session_<YYYY-mm-dd_HH-MM-SS_ffffff>_<pid>/sockets/dash_<Module>,
# and AF_UNIX paths stop at 107 bytes. The dashboard's module then dies with "Received EOF from
# pipe", which hides the cause; a pytest tmp dir such as /tmp/pytest-of-root/pytest-103/nb0/cluster
# is one byte too long. Budget: a 7-digit pid (Linux's pid_max can be 4194304) and the longest
# dashboard module name Ray has (TaskEventsHead).
_SOCKET_PATH_MAX = 107
_SESSION_TAIL = len("/session_2026-12-06_04-28-02_237335_4194304/sockets/dash_TaskEventsHead")
MAX_ROOT_CHARS = _SOCKET_PATH_MAX - _SESSION_TAIL


def check_root(root: str | Path) -> Path:
    """Return ``root`` as an absolute path, or refuse one too long for Ray's socket paths.

    Args:
        root: A cluster's ``--temp-dir``.

    Returns:
        The absolute path.

    Raises:
        ConfigError: If the path has more than :data:`MAX_ROOT_CHARS` bytes.
    """
    path = Path(root).absolute()
    if len(str(path).encode()) > MAX_ROOT_CHARS:
        raise ConfigError(
            f"cluster root {str(path)!r} has {len(str(path).encode())} bytes; Ray's Unix sockets under it would "
            f"pass the 107-byte AF_UNIX limit, so keep it at {MAX_ROOT_CHARS} or fewer (e.g. tempfile.mkdtemp())"
        )
    return path


# Substrings of `ray start` failures that a fresh attempt (new ports, less load) can cure.
_RETRYABLE_START_ERRORS = ("timed out during startup", "used by other components", "Address already in use")


def _free_port(taken: set[int] | None = None) -> int:
    """Return a port that is free now and not in ``taken`` (which it then joins).

    The OS may hand the same ephemeral port to two successive binds once the first socket is
    closed, and ``ray start`` refuses two components on one port, so a cluster keeps the set of
    ports it has already given out.
    """
    taken = set() if taken is None else taken
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port
    raise ConfigError("no free loopback port found")


def _ray_bin() -> str:
    # The `ray` script next to this interpreter, so the cluster runs the project's pinned Ray.
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


def find_cluster_pids(root: str | Path) -> list[int]:
    """Return the ids of live processes that belong to the cluster rooted at ``root``.

    A process belongs to it when its environment carries ``LIVELENS_CLUSTER_ROOT=root``, its
    command line mentions ``root`` (Ray passes the temp/session dir to GCS and raylets), or it
    is a renamed Ray process (``ray::…``) that holds a file open under ``root`` (a log). The
    last rule is the one that finds a node's agents and workers: they rename themselves
    (``ray::DashboardAgent``) by writing over their command line and environment, so the first
    two can miss them, and a stop that missed them left them running as orphans. It stays
    limited to ``ray::`` processes so that a person's ``tail -f`` of a log is not one.

    Args:
        root: The cluster's ``--temp-dir``.

    Returns:
        Process ids, excluding the calling process.
    """
    root = str(root)
    marker = f"{MARKER_ENV}={root}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if root.encode() in cmdline:
                pids.append(int(entry.name))
                continue
            environ = (entry / "environ").read_bytes()
        except (OSError, PermissionError):
            continue  # gone meanwhile, or another user's process
        renamed = cmdline.startswith(b"ray::")
        if marker in environ.split(b"\0") or (renamed and _holds_file_under(int(entry.name), root)):
            pids.append(int(entry.name))
    return sorted(pids)


def _holds_file_under(pid: int, root: str) -> bool:
    """Whether process ``pid`` has a file open under ``root`` (also one deleted since)."""
    prefix = root.rstrip("/") + "/"
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith(prefix):
                return True
        except OSError:
            continue
    return False


def _raylet_pid_env(pid: int) -> int | None:
    """``RAY_RAYLET_PID`` from a process's environment: the raylet that started it, if readable."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in environ.split(b"\0"):
        if item.startswith(b"RAY_RAYLET_PID="):
            with contextlib.suppress(ValueError):
                return int(item[len(b"RAY_RAYLET_PID=") :])
    return None


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped by its parent


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _node_name_of(pid: int) -> str | None:
    """The ``--node-name``/``--node_name`` a Ray process was started with, if any."""
    for arg in _cmdline(pid):
        for flag in ("--node-name=", "--node_name="):
            if arg.startswith(flag):
                return arg[len(flag) :]
    return None


def _is_raylet_of(pid: int, name: str) -> bool:
    args = _cmdline(pid)
    return bool(args) and Path(args[0]).name == "raylet" and _node_name_of(pid) == name


def _descendants(pid: int) -> set[int]:
    """Every live process whose parent chain reaches ``pid``."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier} - out
        out |= frontier
    return out


def kill_cluster(root: str | Path, grace_s: float = 5.0) -> list[int]:
    """Stop every process of the cluster at ``root``: SIGTERM, then SIGKILL after ``grace_s``.

    This deliberately does not use ``ray stop``, which kills every Ray process of the user on
    the machine, including other engineers' clusters and the test suite's session.

    Args:
        root: The cluster's ``--temp-dir``.
        grace_s: Seconds to wait for a clean exit before SIGKILL.

    Returns:
        The process ids that were signalled.
    """
    pids = find_cluster_pids(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.2)
    # Processes may spawn new ones (workers) while shutting down, and SIGKILL is not instant
    # (CI once saw a process still listed right after it), so sweep until none is left alive.
    killed = set(pids)
    deadline = time.monotonic() + max(grace_s, 5.0)
    while True:
        alive = [p for p in sorted(killed | set(find_cluster_pids(root))) if _pid_alive(p)]
        if not alive or time.monotonic() > deadline:
            break
        for pid in alive:
            killed.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return sorted(killed)


def live_cluster_pids(root: str | Path) -> list[int]:
    """Like :func:`find_cluster_pids`, without zombies (dead, only not yet reaped)."""
    return [p for p in find_cluster_pids(root) if _pid_alive(p)]


class LocalCluster:
    """One head and ``num_workers`` worker raylets on 127.0.0.1, started with ``ray start``.

    Use as a context manager::

        with LocalCluster(num_workers=2) as c:
            proc = c.run_driver("import ray; ray.init(); print(ray.cluster_resources())")

    Attributes:
        root: The cluster's ``--temp-dir`` (logs, sockets, the token file, ``cluster.json``).
        address: GCS address ``127.0.0.1:PORT`` (for ``RAY_ADDRESS`` / ``ray.init(address=...)``).
        dashboard_url: ``http://127.0.0.1:PORT`` when the dashboard is on (for ``ray job submit``
            and ``serve deploy``), else ``None``.
        token: The cluster's auth token.
    """

    def __init__(
        self,
        num_workers: int = 2,
        cpus_per_worker: int = 2,
        *,
        head_cpus: int = 0,
        object_store_mb: int = 200,
        include_dashboard: bool = True,
        root: str | Path | None = None,
        token: str | None = None,
        start_timeout_s: float = 120.0,
        stop_at_exit: bool = True,
        start_attempts: int = 2,
    ) -> None:
        """Describe the cluster; nothing starts until :meth:`start`.

        Args:
            num_workers: Worker raylets besides the head (0 or more).
            cpus_per_worker: Logical CPUs per worker raylet.
            head_cpus: Logical CPUs on the head; 0 keeps tasks and Train workers off it.
            object_store_mb: Object store size per node, in MiB (Ray's minimum is ~75).
            include_dashboard: Start the dashboard (needed by ``ray job submit``, ``serve deploy``).
            root: The ``--temp-dir``; default a fresh ``/tmp/livelens-cluster-*`` removed on stop.
            token: Auth token; default a fresh random one.
            start_timeout_s: How long to wait for all nodes to register.
            stop_at_exit: Stop the cluster when this Python process exits, so a crashed test
                leaves no raylets behind (the CLI turns it off: its cluster outlives `up`).
            start_attempts: Tries when a `ray start` fails in a way a retry can cure (a node
                "timed out during startup" under load, or a port taken meanwhile).

        Raises:
            ConfigError: On an impossible configuration.
        """
        if num_workers < 0 or cpus_per_worker < 0 or head_cpus < 0:
            raise ConfigError("num_workers, cpus_per_worker and head_cpus must be >= 0")
        if object_store_mb < 80:
            raise ConfigError(f"object_store_mb={object_store_mb} is below Ray's minimum (~75 MiB)")
        self.num_workers = num_workers
        self.cpus_per_worker = cpus_per_worker
        self.head_cpus = head_cpus
        self.object_store_mb = object_store_mb
        self.include_dashboard = include_dashboard
        self.start_timeout_s = start_timeout_s
        self.stop_at_exit = stop_at_exit
        self.start_attempts = max(1, start_attempts)
        self._own_root = root is None
        self.root = check_root(root) if root is not None else None
        self.token = token or secrets.token_hex(32)
        self.address: str | None = None
        self.dashboard_url: str | None = None
        self._started = False
        self._ports: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> LocalCluster:
        """Start the head and the workers and wait until all of them have registered.

        Returns:
            ``self``.

        Raises:
            ConfigError: If a ``ray start`` fails or the nodes do not come up in time (the
                partial cluster is stopped first).
        """
        if self._started:
            return self
        if self.root is None:
            # Short prefix: Ray's Unix socket paths under the session dir must stay < 108 chars.
            self.root = check_root(tempfile.mkdtemp(prefix="livelens-cluster-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.token_path.write_text(self.token)
        self.token_path.chmod(0o600)
        self._started = True
        if self.stop_at_exit:
            atexit.register(self.stop)
        for attempt in range(1, self.start_attempts + 1):
            try:
                self._start_nodes()
                return self
            except ConfigError as e:
                # Ray gives a raylet a fixed 30 s to register; on an overloaded machine that can
                # pass. A port picked free can also be taken by another process before `ray
                # start` binds it. Either way, clean up and try again with fresh ports.
                kill_cluster(self.root)
                self._ports.clear()
                retryable = any(m in str(e) for m in _RETRYABLE_START_ERRORS)
                if attempt == self.start_attempts or not retryable:
                    self._fail_start()
                    raise
            except BaseException:
                self._fail_start()
                raise
        return self  # not reached: the last attempt returns or raises

    def _fail_start(self) -> None:
        self._started = True  # so stop() really signals whatever is left
        self.stop(keep_logs=True)

    def _start_nodes(self) -> None:
        gcs_port = _free_port(self._ports)
        self.address = f"127.0.0.1:{gcs_port}"
        head = ["--head", f"--port={gcs_port}", f"--ray-client-server-port={_free_port(self._ports)}"]
        if self.include_dashboard:
            dash_port = _free_port(self._ports)
            head += [
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash_port}",
            ]
            self.dashboard_url = f"http://127.0.0.1:{dash_port}"
        else:
            head += ["--include-dashboard=false"]
        self._ray_start(head + self._node_args("head", self.head_cpus, {"node_head": 1}))
        for i in range(self.num_workers):
            name = f"w{i}"
            resources = {f"node_{name}": 1, "livelens_worker": 1}
            self._ray_start(
                [f"--address={self.address}", *self._node_args(name, self.cpus_per_worker, resources)]
            )
        self._write_state()
        nodes = self.nodes(wait_for=self.num_workers + 1)
        if len(nodes) < self.num_workers + 1:
            raise ConfigError(
                f"only {len(nodes)} of {self.num_workers + 1} nodes registered within "
                f"{self.start_timeout_s:.0f} s; logs in {self.root}/session_latest/logs"
            )

    def stop(self, keep_logs: bool = False) -> list[int]:
        """Stop every process of this cluster and, if it made its own root, remove it.

        Args:
            keep_logs: Keep the root directory (logs) even if this object created it.

        Returns:
            The process ids that were signalled.
        """
        if self.root is None:
            return []
        if not self._started and not find_cluster_pids(self.root):
            return []  # already stopped (e.g. the atexit hook after an explicit stop)
        pids = kill_cluster(self.root)
        self._started = False
        if self._own_root and not keep_logs:
            shutil.rmtree(self.root, ignore_errors=True)
        return pids

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------------
    @property
    def token_path(self) -> Path:
        """The file holding this cluster's token (mode 600)."""
        if self.root is None:
            raise ConfigError("the cluster has no root directory yet; call start() first")
        return self.root / "auth_token"

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a client process (driver, ``ray job submit``, ``serve deploy``).

        Args:
            base: The environment to extend; default ``os.environ``.

        Returns:
            ``base`` plus ``RAY_ADDRESS``, ``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN`` and the
            repository on ``PYTHONPATH``; a ``RAY_AUTH_TOKEN_PATH`` from ``base`` is dropped so
            the token cannot come from somewhere else.
        """
        if self.address is None:
            raise ConfigError("the cluster is not started")
        env = dict(os.environ if base is None else base)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        env.update(RAY_ADDRESS=self.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return env

    def run_driver(
        self,
        script: str | Path,
        timeout: float = 300.0,
        *,
        args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Ray driver in a subprocess connected to this cluster.

        Args:
            script: A :class:`~pathlib.Path` to a script file, or a ``str`` of Python code
                (run with ``python -c``). Inside, ``ray.init()`` connects via ``RAY_ADDRESS``.
            timeout: Seconds before the driver is killed (``subprocess.TimeoutExpired``).
            args: Command-line arguments for the script.
            env: Extra environment variables.
            cwd: Working directory; default the repository root.

        Returns:
            The completed process, with text ``stdout``/``stderr``; not checked, so the caller
            can assert on failures too.
        """
        full_env = self.client_env()
        full_env.update(env or {})
        cmd = [sys.executable, str(script)] if isinstance(script, Path) else [sys.executable, "-c", script]
        return subprocess.run(
            [*cmd, *args],
            env=full_env,
            cwd=str(cwd or REPO),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def nodes(self, wait_for: int = 0) -> list[dict[str, Any]]:
        """List the alive nodes (asks the cluster through a short driver subprocess).

        Args:
            wait_for: Poll until at least this many nodes are alive or ``start_timeout_s`` passes.

        Returns:
            One dict per node: ``node_id``, ``name`` (``head``, ``w0``...), ``address``,
            ``is_head``, ``resources``, ``labels``.

        Raises:
            ConfigError: If the driver cannot reach the cluster.
        """
        proc = self.run_driver(
            _NODES_SCRIPT, timeout=self.start_timeout_s + 60, args=[str(wait_for), str(self.start_timeout_s)]
        )
        for line in proc.stdout.splitlines():
            if line.startswith("@@NODES@@"):
                return json.loads(line[len("@@NODES@@") :])
        raise ConfigError(f"could not list the nodes of {self.address}: {proc.stderr[-2000:]}")

    def pids(self) -> list[int]:
        """Process ids of this cluster's live processes (GCS, raylets, agents, workers)."""
        return [] if self.root is None else [p for p in find_cluster_pids(self.root) if _pid_alive(p)]

    # -- faults ------------------------------------------------------------------------------
    def kill_node(self, name: str) -> list[int]:
        """SIGKILL worker node ``name``'s raylet and every process under it, as a lost machine.

        Args:
            name: A worker node name (``w0``, ``w1``…).

        Returns:
            The process ids killed.

        Raises:
            ConfigError: No live raylet of that name.
        """
        raylets = [p for p in self.pids() if _is_raylet_of(p, name)]
        if not raylets:
            raise ConfigError(f"no live raylet named {name!r} in this cluster")
        victims = set(raylets)
        for pid in raylets:
            victims |= _descendants(pid)
        # Also whatever names the raylet in its environment but is no longer under it (reparented
        # to 1): left alive, it would run on as an orphan, which a lost machine's processes do not.
        victims |= {p for p in self.pids() if _node_name_of(p) == name or _raylet_pid_env(p) in raylets}
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return sorted(victims)

    def start_node(self, name: str) -> None:
        """Start worker node ``name`` again (after :meth:`kill_node`), with its usual resources."""
        self._ray_start(
            [
                f"--address={self.address}",
                *self._node_args(name, self.cpus_per_worker, {f"node_{name}": 1, "livelens_worker": 1}),
            ]
        )

    # -- internals ---------------------------------------------------------------------------
    def _node_args(self, name: str, cpus: int, resources: dict[str, float]) -> list[str]:
        return [
            "--node-ip-address=127.0.0.1",
            f"--node-name={name}",
            f"--labels=livelens.io/node={name}",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
            f"--object-store-memory={self.object_store_mb * MB}",
            f"--temp-dir={self.root}",
            # Fixed default ports would collide between raylets on one host (and with other
            # people's clusters); pick free ones, or let the OS choose (0).
            f"--dashboard-agent-listen-port={_free_port(self._ports)}",
            f"--metrics-export-port={_free_port(self._ports)}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
        ]

    def _ray_start(self, args: list[str]) -> None:
        env = dict(os.environ)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        # Every process of the cluster (workers and actors included) inherits this environment.
        # RAY_ADDRESS names this cluster: without it, Ray's state API inside a task or actor looks
        # for "the" local cluster and, with another Ray instance on the machine (the test suite's,
        # a notebook's), raises "Found multiple active Ray instances"; Train V2's placement-group
        # cleaner did so in the elastic test, run inside the suite.
        env.update(
            RAY_ADDRESS=str(self.address),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            **{MARKER_ENV: str(self.root)},
        )
        proc = subprocess.run(
            [_ray_bin(), "start", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=self.start_timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise ConfigError(
                f"`ray start {' '.join(args)}` failed ({proc.returncode}); logs in {self.root}:\n"
                f"{proc.stderr[-3000:]}"
            )

    def _write_state(self) -> None:
        state = {
            "address": self.address,
            "dashboard_url": self.dashboard_url,
            "token_path": str(self.token_path),
            "root": str(self.root),
            "num_workers": self.num_workers,
            "cpus_per_worker": self.cpus_per_worker,
            "head_cpus": self.head_cpus,
        }
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def attach(cls, root: str | Path) -> LocalCluster:
        """Rebuild a handle on a running cluster from its ``cluster.json`` (used by the CLI).

        Args:
            root: The cluster's root directory.

        Raises:
            ConfigError: If no cluster state is found there.
        """
        state_path = Path(root) / STATE_FILE
        if not state_path.is_file():
            raise ConfigError(f"no local cluster at {root} (missing {STATE_FILE})")
        state = json.loads(state_path.read_text())
        c = cls(
            state["num_workers"],
            state["cpus_per_worker"],
            head_cpus=state["head_cpus"],
            root=root,
            token=Path(state["token_path"]).read_text().strip(),
        )
        c.address, c.dashboard_url, c._started = state["address"], state["dashboard_url"], True
        return c


def _cmd_up(ns: argparse.Namespace) -> int:
    root = Path(ns.root)
    if (root / STATE_FILE).is_file() and find_cluster_pids(root):
        print(f"a local cluster is already running at {root}; `python -m cluster.local down` first")
        return 1
    kill_cluster(root, grace_s=2)  # leftovers of a crashed cluster
    shutil.rmtree(root, ignore_errors=True)
    c = LocalCluster(
        ns.workers,
        ns.cpus_per_worker,
        head_cpus=ns.head_cpus,
        object_store_mb=ns.object_store_mb,
        root=root,
        stop_at_exit=False,
    )
    t0 = time.monotonic()
    c.start()
    print(f"local Ray cluster up in {time.monotonic() - t0:.1f} s: head + {ns.workers} workers")
    _print_status(c)
    print(f'\nconnect clients with:\n  eval "$({Path(sys.executable).name} -m cluster.local env)"')
    return 0


def _print_status(c: LocalCluster) -> None:
    print(f"address        {c.address}")
    print(f"dashboard      {c.dashboard_url}")
    print(f"token file     {c.token_path}")
    for n in c.nodes():
        res = {k: v for k, v in n["resources"].items() if not k.startswith("node:")}
        print(f"node {n['name']:<6} {n['node_id'][:12]}  {json.dumps(res, sort_keys=True)}")


def main(argv: list[str] | None = None) -> int:
    """CLI: ``up`` / ``down`` / ``status`` / ``env`` for the machine's one CLI-managed cluster."""
    p = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(CLI_ROOT), help="cluster directory (default %(default)s)")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start head + workers")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--cpus-per-worker", type=int, default=2)
    up.add_argument("--head-cpus", type=int, default=0)
    up.add_argument("--object-store-mb", type=int, default=200)
    sub.add_parser("down", help="stop every process of the cluster and remove its directory")
    sub.add_parser("status", help="address, dashboard, nodes")
    sub.add_parser("env", help="print `export` lines for clients (use with eval)")
    ns = p.parse_args(argv)
    root = Path(ns.root)
    try:
        if ns.cmd == "up":
            return _cmd_up(ns)
        if ns.cmd == "down":
            pids = kill_cluster(root)
            shutil.rmtree(root, ignore_errors=True)
            left = live_cluster_pids(root)
            print(f"stopped {len(pids)} processes" + (f"; still alive: {left}" if left else ""))
            return 1 if left else 0
        c = LocalCluster.attach(root)
        if ns.cmd == "status":
            _print_status(c)
        else:
            print(f"export RAY_ADDRESS={c.address}")
            print("export RAY_AUTH_MODE=token")
            print(f'export RAY_AUTH_TOKEN="$(cat {c.token_path})"')
            if c.dashboard_url:
                print(f"export RAY_DASHBOARD_ADDRESS={c.dashboard_url}")
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
