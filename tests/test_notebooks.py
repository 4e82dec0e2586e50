"""The other two ways in, against a real multi-node cluster: `ray job submit` and notebooks.

One local cluster (head + 2 worker raylets, token auth, dashboard on for the job server) serves the
module, with the livelens app deployed on it as a user's cluster would run it. The notebooks in
notebooks/ are executed top to bottom with nbclient in a kernel attached to that cluster; a job is
submitted through `livelens jobs`, followed, and its model found in the store.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_jobs import make_frames_manifest

from cluster.local import LocalCluster
from livelens.serving.auth import add_key_to_file, generate_key
from livelens.store import ModelStore

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
APP = "livelens_nb"

DEPLOY = """
import json, sys, time
import ray
from ray import serve
from ray.serve.context import _get_global_client
from livelens.serving.config import validate_serve_config

port, spec = int(sys.argv[1]), json.loads(sys.argv[2])
ray.init(log_to_driver=False)
# One proxy, on the head: several raylets on one machine cannot all bind the same HTTP port.
serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
_get_global_client().deploy_apps(validate_serve_config({"applications": [spec]}))
deadline = time.time() + 600
while True:
    status = serve.status().applications.get(spec["name"])
    if status is not None and status.status == "RUNNING":
        print("@@RUNNING"); break
    if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY") or time.time() > deadline:
        print("@@FAILED", status); sys.exit(1)
    time.sleep(2)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    import yaml

    tmp = tmp_path_factory.mktemp("nb")
    store = tmp / "store"
    key = generate_key()
    add_key_to_file(tmp / "keys.json", key, "notebooks", rate_per_s=1000, burst=1000)
    spec = yaml.safe_load((REPO / "serve_apps" / "config" / "livelens.yaml").read_text())["applications"][0]
    args = spec["args"]
    args["gateway"].update(key_file=str(tmp / "keys.json"), colocate=["moderate", "quality"])
    # The store the notebooks and jobs publish to comes first, then the shipped defaults.
    args["moderation"]["stores"] = [str(store), str(REPO / "livelens" / "resources" / "default_models")]
    args["streams"] = {"db_path": str(tmp / "streams.sqlite")}
    spec.update(name=APP, route_prefix="/")
    port = _free_port()
    # Not under tmp: pytest's numbered dirs can make Ray's socket paths too long (LocalCluster
    # refuses such a root). The cluster makes, and on stop removes, a short one of its own.
    with LocalCluster(num_workers=2, cpus_per_worker=4, object_store_mb=300) as cluster:
        proc = cluster.run_driver(DEPLOY, timeout=900, args=[str(port), json.dumps(spec)])
        assert proc.returncode == 0 and "@@RUNNING" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
        yield {"cluster": cluster, "url": f"http://127.0.0.1:{port}", "key": key, "store": store, "tmp": tmp}


def _livelens(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livelens.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=str(REPO))


def test_a_training_job_submitted_with_livelens_jobs_lands_in_the_store(deployed):
    cluster, tmp = deployed["cluster"], deployed["tmp"]
    manifest = make_frames_manifest(tmp / "job_frames")
    env = cluster.client_env()
    job_args = ["--manifest", str(manifest), "--no-pretrained", "--no-freeze-backbone", "--no-evidence-crop",
                "--image-size", "64", "--num-workers", "2", "--cpus-per-worker", "0.5",
                "--storage-path", str(tmp / "job_train"), "--run-name", "job", "--model-name", "job_safety",
                "--epochs", "1", "--batch-size", "8", "--precision", "fp32"]
    sub = _livelens("jobs", "submit", "safety", "--address", cluster.dashboard_url, "--store",
                    str(deployed["store"]), "--wait", "--", *job_args, env=env)
    sid = sub.stdout.strip().splitlines()[0] if sub.stdout.strip() else ""
    logs = _livelens("jobs", "logs", sid, "--address", cluster.dashboard_url, env=env, timeout=120)
    assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-2000:] + logs.stdout[-4000:]
    status = _livelens("jobs", "status", sid, "--address", cluster.dashboard_url, env=env, timeout=120)
    info = json.loads(status.stdout)
    assert info["status"] == "SUCCEEDED" and "train_jobs.safety" in info["entrypoint"]
    assert info["metadata"]["livelens_job"] == "safety"
    # The job's own summary line, from its log, names the model it published.
    line = next((ln[ln.index("{"):] for ln in logs.stdout.splitlines() if '{"ref"' in ln), None)
    assert line is not None, logs.stdout[-4000:] + logs.stderr[-2000:]
    ref = json.loads(line)["ref"]
    assert ref == "job_safety@1" and ModelStore(str(deployed["store"])).versions("job_safety") == ["1"]
    listed = _livelens("jobs", "list", "--address", cluster.dashboard_url, env=env, timeout=120)
    assert sid in listed.stdout and "SUCCEEDED" in listed.stdout
    # Without the cluster token the job server refuses: the job CLI says so in one line.
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    bare.update(HOME=str(tmp), RAY_AUTH_MODE="disabled")
    refused = _livelens("jobs", "status", sid, "--address", cluster.dashboard_url, env=bare, timeout=120)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr


@pytest.mark.parametrize("name", ["01_quickstart", "02_data", "03_train_and_sweep", "04_data_loop"])
def test_notebook_runs_top_to_bottom_against_the_cluster(deployed, name, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    env = deployed["cluster"].client_env()
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        monkeypatch.setenv(var, env[var])
    workdir = deployed["tmp"] / "workdir"
    monkeypatch.setenv("LIVELENS_WORKDIR", str(workdir))
    monkeypatch.setenv("LIVELENS_APP", APP)
    monkeypatch.setenv("LIVELENS_URL", deployed["url"])
    monkeypatch.setenv("LIVELENS_API_KEY", deployed["key"])
    monkeypatch.setenv("LIVELENS_MODEL_STORE", str(deployed["store"]))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend puts figures in the outputs
    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    t0 = time.time()
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    images = [o for o in outputs if any(k.startswith("image/") for k in o.get("data", {}))]
    if name == "01_quickstart":
        assert "same labels as HTTP: True" in text and "attached to" in text
        assert len(images) >= 2  # the frame, and the boxes + Grad-CAM figure
    elif name == "02_data":
        assert len(images) >= 2  # label counts per split, the contact sheet
    elif name == "03_train_and_sweep":
        assert "registered nb_safety@" in text and "now serving ['nb_safety@" in text
        assert "restored safety" in text  # the notebook leaves the service as it found it
        assert ModelStore(str(deployed["store"])).versions("nb_safety")
    else:
        assert "queue manifest:" in text and (workdir / "queue").is_dir()
    print(f"{name}: {time.time() - t0:.0f} s; per code cell: {_cell_seconds(nb)}")


def _cell_seconds(nb) -> list[float]:
    """Seconds each code cell ran (nbclient records the kernel's timestamps in the metadata)."""
    from datetime import datetime

    out = []
    for c in nb.cells:
        ex = c.get("metadata", {}).get("execution", {})
        if c.cell_type == "code" and "iopub.execute_input" in ex and "shell.execute_reply" in ex:
            t = [datetime.fromisoformat(ex[k].replace("Z", "+00:00")) for k in ("iopub.execute_input",
                                                                                 "shell.execute_reply")]
            out.append(round((t[1] - t[0]).total_seconds(), 1))
    return out
