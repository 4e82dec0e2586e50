"""``make run``: an embedded local Ray cluster serving the whole livelens graph on loopback.

Starts a Ray head on 127.0.0.1 (token auth on, small object store), deploys the gateway graph,
prints the URL and a development API key (stored hashed in the key file), and on Ctrl-C or
SIGTERM shuts Serve and Ray down so no Ray process is left behind.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from livelens.store import find_in_stores
from serve_apps.common import REPO, SERVE_MODES, direct_ingress_url

#: Where the capabilities run. On one node a hop between replicas costs more than it gives: in the
#: same benchmark run, /v1/moderate served 0.916× the raw model colocated and 0.752× composed, with
#: 3.3 against 10.2 ms of overhead per request (docs/serving.md).
LAYOUTS: dict[str, dict] = {
    "colocated": {"gateway": {"colocate": ["moderate", "quality"]}},
    "composed": {},
}


CONFIG = REPO / "serve_apps" / "config" / "livelens.yaml"


def _overlay(base: dict, given: dict) -> dict:
    """``given`` laid over ``base`` one level deep per capability (its values win)."""
    merged = {cap: dict(v) if isinstance(v, dict) else v for cap, v in base.items()}
    for cap, val in given.items():
        merged[cap] = {**(merged.get(cap) or {}), **val} if isinstance(val, dict) and merged.get(cap) is not None \
            else val
    return merged


def app_args(opts: argparse.Namespace) -> dict:
    """``AppArgs`` of the shipped config (serve_apps/config/livelens.yaml), the layout, then ``--args`` over both."""
    given: dict = {}
    if opts.args:
        text = Path(opts.args).read_text() if Path(opts.args).is_file() else opts.args
        given = json.loads(text)
    merged = _overlay(_overlay(deploy_config(opts.config)["applications"][0].get("args") or {},
                               LAYOUTS[opts.layout]), given)
    merged.setdefault("gateway", {})["key_file"] = opts.key_file
    return merged


def deploy_config(path: str | Path = CONFIG) -> dict:
    """The Serve config file ``make run`` starts from (one application)."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    apps = doc.get("applications") or []
    if len(apps) != 1:
        raise SystemExit(f"{path}: make run serves one application, the file has {len(apps)}")
    return doc


def serve_schema(opts: argparse.Namespace, args: dict):
    """The validated Serve config ``make run`` applies: the file's application with the merged args.

    Deploying a config (not ``serve.run``) is what lets ``python -m serve_apps.admin`` and
    ``PUT /v1/admin/live`` change live settings later, as ``serve deploy`` of an edited file does.
    """
    from livelens.serving.config import validate_serve_config

    doc = deploy_config(opts.config)
    app = {**doc["applications"][0], "name": "livelens", "route_prefix": "/", "args": args}
    return validate_serve_config({"applications": [app], "proxy_location": doc.get("proxy_location", "EveryNode"),
                                  "http_options": {**(doc.get("http_options") or {}), "host": opts.host,
                                                   "port": opts.port}})


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve_apps", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (loopback by default)")
    p.add_argument("--port", type=int, default=int(os.environ.get("LIVELENS_PORT", 8000)))
    p.add_argument("--num-cpus", type=int, default=4,
                   help="logical CPUs for the local cluster (deployments use fractions of one)")
    p.add_argument("--object-store-mb", type=int, default=512)
    p.add_argument("--key-file", default="runs/api_keys.json")
    p.add_argument("--config", default=str(CONFIG), help="the Serve config file to start from")
    p.add_argument("--args", default=None, help="JSON (or a path to JSON) of serve_apps.gateway.AppArgs; "
                   "its keys win over the config file's and the layout's")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="colocated",
                   help="colocated (default): moderation and quality run inside the gateway replica, OCR "
                        "and streams are deployments of their own; composed: every capability is its own "
                        "deployment behind a handle (what several nodes want); see docs/serving.md")
    p.add_argument("--serve-mode", choices=sorted(SERVE_MODES),
                   default=os.environ.get("LIVELENS_SERVE_MODE", "throughput"),
                   help="Ray Serve runtime flags: 'throughput' (Ray's throughput preset with direct ingress; "
                        "default) or 'default' (stock Serve); see docs/serving.md")
    p.add_argument("--no-build", action="store_true",
                   help="do not build default models when the store is empty (serve what exists)")
    p.add_argument("--rotate-dev-key", action="store_true",
                   help="replace the development key (by default it is kept across restarts)")
    p.add_argument("--exit-after", type=float, default=None, help=argparse.SUPPRESS)  # for smoke checks
    return p.parse_args(argv)


def ensure_default_models(allow_build: bool) -> None:
    """Make sure the safety model exists; build the defaults with the project's own job otherwise."""
    if find_in_stores("safety") is not None:
        return
    if not allow_build:
        print("[livelens] no safety model in the model stores; moderation serves open_nsfw only", flush=True)
        return
    if importlib.util.find_spec("train_jobs.defaults") is None:
        print("[livelens] no safety model and no train_jobs.defaults to build one; moderation serves "
              "open_nsfw only", flush=True)
        return
    # Only the models serving cannot do without: the text-region model takes another ~10 min of
    # text detection to build, and OCR serves without it (/v1/models says so).
    print("[livelens] no default models found: building them with `python -m train_jobs.defaults "
          "--only safety,quality` (≤15 min on 2 cores; progress follows)", flush=True)
    subprocess.run([sys.executable, "-m", "train_jobs.defaults", "--only", "safety,quality"], cwd=REPO, check=False)


def dev_key(key_file: str, rotate: bool = False) -> tuple[str, bool]:
    """The development key: the one from the last start while it is still in the key file, else a new one.

    Only its hash goes into the key file; the plain key is kept beside it (``dev_key``, mode 0600)
    so that a restart does not invalidate what the console, notebooks and scripts hold. A key
    revoked from the key file, or ``rotate``, gives a new one.

    Returns:
        The key, and whether it is new.
    """
    from livelens.serving.auth import KeyStore, add_key_to_file, generate_key, hash_key, write_private

    kept = Path(key_file).with_name("dev_key")
    if not rotate and kept.is_file():
        key = kept.read_text(encoding="utf-8").strip()
        store = KeyStore.load(key_file, env={})
        if key and store.find(hash_key(key)) is not None:
            return key, False
    key = generate_key()
    add_key_to_file(key_file, key, key_id="dev", scopes=["*"], rate_per_s=50, burst=100)
    write_private(kept, key + "\n")
    return key, True


def _init_ray(ray, opts: argparse.Namespace, attempts: int = 3) -> None:
    """Start the local head; retried, because on an oversubscribed host the GCS can miss its deadline."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                address="local",
                num_cpus=opts.num_cpus,
                object_store_memory=opts.object_store_mb * 1024 * 1024,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TORCH_HOME": os.environ.get(
                    "TORCH_HOME", str(REPO / ".cache" / "torch"))}},
            )
            return
        except Exception as exc:
            ray.shutdown()
            if attempt == attempts:
                raise
            print(f"[livelens] Ray start attempt {attempt} failed ({str(exc)[:120]}); retrying", flush=True)
            time.sleep(5)


def _wait_healthz(url: str, stop: threading.Event, timeout_s: float = 900) -> dict | None:
    """Poll /healthz until the gateway answers (None when interrupted or timed out)."""
    deadline = time.time() + timeout_s
    while not stop.is_set() and time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return json.loads(r.read())
        except (OSError, ValueError):
            pass
        stop.wait(1.0)
    return None


def _report_ready(serve, stop: threading.Event, t_start: float) -> None:
    """Say when every deployment is running (models loaded), or which one failed."""
    while not stop.wait(1.0):
        app = serve.status().applications.get("livelens")
        if app is None:
            continue
        if app.status == "RUNNING":
            print(f"[livelens] all deployments running {time.time() - t_start:.1f} s after start", flush=True)
            return
        if app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            print(f"[livelens] deployment problem: {app.status} {app.message[:500]}", flush=True)
            return


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()
    opts = _parse(argv)
    os.chdir(REPO)
    os.environ["RAY_AUTH_MODE"] = "token"
    # Serve reads these when each of its processes imports it; the raylet passes them on.
    os.environ.update(SERVE_MODES[opts.serve_mode])
    args = app_args(opts)
    schema = serve_schema(opts, args)
    # Ray reads its auth and Serve flags when first imported, so the app's models load after them.
    from serve_apps.gateway import AppArgs

    AppArgs.model_validate(args)  # typos fail here, with pydantic's message, before Ray starts
    ensure_default_models(not opts.no_build)
    key, new_key = dev_key(opts.key_file, rotate=opts.rotate_dev_key)

    import ray
    from ray import serve


    stop = threading.Event()

    def _on_signal(signum, _frame):
        print(f"\n[livelens] {signal.Signals(signum).name}: shutting down…", flush=True)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    _init_ray(ray, opts)
    try:
        serve.start(http_options={"host": opts.host, "port": opts.port})
        url = f"http://{opts.host}:{opts.port}"
        # Deploy without waiting for every replica: the gateway answers /healthz as soon as it is up
        # (with the capabilities it colocates loaded), while the other model replicas (OCR, and in
        # the composed layout moderation) finish loading behind it.
        from ray.serve.context import _get_global_client

        _get_global_client().deploy_apps(schema, _blocking=False)
        health = _wait_healthz(url, stop)
        if health is None:
            return 1
        print(f"\n[livelens] serving {url}  (console: {url}/ , API docs: {url}/docs)", flush=True)
        try:
            direct = direct_ingress_url("livelens", opts.host)  # None unless the mode has direct ingress
        except Exception as exc:  # only informational: the proxy URL above serves regardless
            direct = None
            print(f"[livelens] could not look up the direct ingress port: {str(exc)[:200]}", flush=True)
        if direct:
            # The gateway replica's own port skips the proxy hop (about 10 ms per request on 2 cores).
            print(f"[livelens] direct to the gateway replica (no proxy hop): {direct}", flush=True)
        colocated = ", ".join((args.get("gateway") or {}).get("colocate") or []) or "none"
        print(f"[livelens] layout {opts.layout} (in the gateway replica: {colocated})", flush=True)
        print(f"[livelens] capabilities: {', '.join(health['capabilities'])}; /healthz answered "
              f"{time.time() - t_start:.1f} s after start", flush=True)
        kept = Path(opts.key_file).with_name("dev_key")
        print(f"[livelens] development API key ({'new' if new_key else 'kept from the last start'}; hashed in "
              f"{opts.key_file}, plain in {kept}; --rotate-dev-key replaces it):\n    {key}", flush=True)
        print(f"[livelens] export LIVELENS_URL={url} LIVELENS_API_KEY={key}   # for the livelens CLI and client",
              flush=True)
        print(f"[livelens] try: curl -H 'Authorization: Bearer {key}' -F file=@frame.jpg {url}/v1/analyze",
              flush=True)
        print("[livelens] Ctrl-C to stop", flush=True)
        _report_ready(serve, stop, t_start)
        deadline = None if opts.exit_after is None else time.time() + opts.exit_after
        while not stop.wait(0.5):
            if deadline is not None and time.time() > deadline:
                break
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        print("[livelens] stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
