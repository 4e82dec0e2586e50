"""A real head + 2 worker raylets on this machine (cluster.local), and token auth against it.

One cluster serves the whole module (a start costs ~25 s here); drivers run in subprocesses
because this pytest process may already be connected to the suite's own Ray session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster.local import (
    MAX_ROOT_CHARS,
    LocalCluster,
    _cmdline,
    _descendants,
    _is_raylet_of,
    _pid_alive,
    _raylet_pid_env,
    find_cluster_pids,
)
from livelens.errors import ConfigError

PINNED_TASKS = """
import json, ray
ray.init()

@ray.remote(num_cpus=0.1)
def where(tag):
    ctx = ray.get_runtime_context()
    return {"tag": tag, "node_id": ctx.get_node_id(), "pid": __import__("os").getpid()}

refs = [where.options(resources={f"node_{w}": 0.1}).remote(w) for w in ("w0", "w1")]
print("@@" + json.dumps(ray.get(refs, timeout=120)))
"""


def _stray(root: Path) -> list[str]:
    """Lines of `ps` that mention the cluster root (the check a human would do)."""
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True, check=True).stdout
    return [ln for ln in out.splitlines() if str(root) in ln and " Z " not in ln and "ps -eo" not in ln]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.local", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def cluster():
    # A short root of our own: pytest's numbered tmp dirs can push Ray's socket paths past 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="ll-lc-"))
    root = base / "c"
    c = LocalCluster(num_workers=2, cpus_per_worker=2, object_store_mb=200, root=root)
    c.start()
    yield c
    # Every raylet's children (its agents and workers rename themselves `ray::…`, so neither ps
    # nor their environment shows the root any more): none may outlive `down`.
    children = {
        k
        for p in c.pids()
        if _cmdline(p)[:1] and Path(_cmdline(p)[0]).name == "raylet"
        for k in _descendants(p)
    }
    assert children, "no raylet children found: the check below would prove nothing"
    # Stop through the CLI (`make cluster-down` path), then check with ps as a human would.
    down = _cli("--root", str(root), "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not find_cluster_pids(root), "processes left after `down`"
    assert not [k for k in children if _pid_alive(k)], "raylet children left after `down`"
    assert not _stray(root)
    assert not root.exists()
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_nodes_are_distinct_raylets_with_own_resources(cluster):
    nodes = {n["name"]: n for n in cluster.nodes()}
    assert set(nodes) == {"head", "w0", "w1"}
    assert len({n["node_id"] for n in nodes.values()}) == 3
    for w in ("w0", "w1"):
        assert nodes[w]["resources"]["CPU"] == 2
        assert nodes[w]["resources"][f"node_{w}"] == 1
        assert nodes[w]["labels"]["livelens.io/node"] == w
        # Object store capped as asked, not Ray's 30 %-of-RAM default.
        assert nodes[w]["resources"]["object_store_memory"] == 200 * 1024 * 1024
    assert "CPU" not in nodes["head"]["resources"] or nodes["head"]["resources"]["CPU"] == 0
    assert os.stat(cluster.token_path).st_mode & 0o077 == 0, "token file readable by others"


@pytest.mark.slow
def test_pinned_tasks_run_on_different_raylets(cluster):
    proc = cluster.run_driver(PINNED_TASKS, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(ln[2:] for ln in proc.stdout.splitlines() if ln.startswith("@@")))
    by_name = {n["name"]: n["node_id"] for n in cluster.nodes()}
    assert [r["node_id"] for r in result] == [by_name["w0"], by_name["w1"]]


STATE_API_IN_A_TASK = """
import ray
ray.init()

@ray.remote(num_cpus=0.1, resources={"node_w1": 0.1})
def nodes_seen():
    from ray.util.state import list_nodes
    return len(list_nodes())

print("@@", ray.get(nodes_seen.remote(), timeout=120))
"""


@pytest.mark.slow
def test_state_api_inside_the_cluster_with_another_ray_on_the_machine(cluster, ray_session):
    # The suite's own Ray session is a second instance on this machine. Ray's state API (which
    # Train V2's placement-group cleaner calls from an actor) must still find this cluster.
    assert ray_session.is_initialized()
    proc = cluster.run_driver(STATE_API_IN_A_TASK, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "@@ 3" in proc.stdout.splitlines(), proc.stdout[-2000:]


def _job_submit(cluster, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # The CLI shell-quotes each entrypoint word; the job shell has no venv on PATH, so name the interpreter.
    entry = [sys.executable, "-c", "import ray; ray.init(); print('RES', ray.cluster_resources())"]
    return subprocess.run(
        [ray_cli, "job", "submit", "--address", cluster.dashboard_url, "--", *entry],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.mark.slow
def test_job_submit_needs_the_token(cluster, tmp_path):
    ok = _job_submit(cluster, cluster.client_env())
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "RES" in ok.stdout and "node_w1" in ok.stdout
    assert "succeeded" in ok.stdout

    # No token at all (empty HOME so ~/.ray/auth_token is not found either): the dashboard refuses.
    bare = {k: v for k, v in cluster.client_env().items() if not k.startswith("RAY_AUTH")}
    bare.update(HOME=str(tmp_path), RAY_AUTH_MODE="disabled")
    refused = _job_submit(cluster, bare)
    assert refused.returncode != 0
    assert "RES" not in refused.stdout
    assert "401" in refused.stdout + refused.stderr or "auth" in (refused.stdout + refused.stderr).lower()

    wrong = cluster.client_env()
    wrong["RAY_AUTH_TOKEN"] = "0" * 64
    refused = _job_submit(cluster, wrong)
    assert refused.returncode != 0 and "RES" not in refused.stdout


@pytest.mark.slow
def test_cli_status_and_env(cluster):
    status = _cli("--root", str(cluster.root), "status")
    assert status.returncode == 0, status.stderr
    assert cluster.address in status.stdout and cluster.dashboard_url in status.stdout
    assert sum(line.startswith("node ") for line in status.stdout.splitlines()) == 3
    env = _cli("--root", str(cluster.root), "env")
    assert f"export RAY_ADDRESS={cluster.address}" in env.stdout
    # `eval "$(python -m cluster.local env)"` then lets a shell driver in with the token.
    shell = f'eval "$({sys.executable} -m cluster.local --root {cluster.root} env)"; '
    shell += f'{sys.executable} -c \'import ray; ray.init(); print("CPUS", ray.cluster_resources()["CPU"])\''
    bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run(
        ["bash", "-c", shell], env=bare, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CPUS 4.0" in proc.stdout


@pytest.mark.slow
def test_a_killed_node_leaves_nothing_running_and_comes_back(cluster):
    # Runs after the tests above, which left w1 with a worker besides its agents.
    raylet = next(p for p in cluster.pids() if _is_raylet_of(p, "w1"))
    children = _descendants(raylet)
    assert len(children) >= 2, "w1's raylet has no agents: the checks below would prove nothing"
    killed = set(cluster.kill_node("w1"))
    assert {raylet, *children} <= killed
    time.sleep(0.5)
    assert not [p for p in {raylet, *children} if _pid_alive(p)]
    assert not [p for p in cluster.pids() if _raylet_pid_env(p) == raylet]
    # The cluster notices the loss (the GCS health-checks raylets), and w0 is untouched.
    deadline = time.monotonic() + 120
    while (names := {n["name"] for n in cluster.nodes()}) != {"head", "w0"} and time.monotonic() < deadline:
        time.sleep(2)
    assert names == {"head", "w0"}
    with pytest.raises(ConfigError, match="no live raylet"):
        cluster.kill_node("w1")
    cluster.start_node("w1")
    assert {n["name"] for n in cluster.nodes(wait_for=3)} == {"head", "w0", "w1"}


def test_bad_configuration_is_a_config_error():
    with pytest.raises(ConfigError):
        LocalCluster(num_workers=-1)
    with pytest.raises(ConfigError, match="minimum"):
        LocalCluster(object_store_mb=10)
    with pytest.raises(ConfigError, match="no local cluster"):
        LocalCluster.attach("/nonexistent/livelens-cluster")


def test_a_root_too_long_for_rays_sockets_is_refused_before_anything_starts():
    # The CI failure this guards: /tmp/pytest-of-root/pytest-103/nb0/cluster (42 bytes) put the
    # dashboard's socket at 108 bytes, and Ray only said "MetricsHead failed to start".
    long_root = "/tmp/pytest-of-root/pytest-103/nb0/cluster"
    with pytest.raises(ConfigError, match="107-byte"):
        LocalCluster(root=long_root)
    ok = "/tmp/" + "x" * (MAX_ROOT_CHARS - len("/tmp/"))
    assert str(LocalCluster(root=ok).root) == ok
    with pytest.raises(ConfigError, match=f"keep it at {MAX_ROOT_CHARS}"):
        LocalCluster(root=ok + "y")
    # The default root (a fresh mkdtemp) fits with room to spare.
    assert len(tempfile.gettempdir()) + len("/livelens-cluster-abcdefgh") <= MAX_ROOT_CHARS


def test_ports_given_out_are_never_repeated(monkeypatch):
    # The OS may hand the same ephemeral port to two successive binds; `ray start` then refuses
    # the head (one CI run failed so). Force a repeat and check the picker skips it.
    import socket

    from cluster import local

    answers = iter([40001, 40001, 40002])

    class _Sock:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, addr):
            pass

        def getsockname(self):
            return ("127.0.0.1", next(answers))

    monkeypatch.setattr(socket, "socket", lambda *a, **k: _Sock())
    taken: set[int] = set()
    assert [local._free_port(taken), local._free_port(taken)] == [40001, 40002]
    assert taken == {40001, 40002}
