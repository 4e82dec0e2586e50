"""Live changes to a running livelens app: model versions, thresholds and batch settings, no restart.

A capability's live config is its deployment's Serve ``user_config`` (``ModerationConfig``,
``OcrConfig``, ``QualityConfig``, ``GatewayConfig``); a colocated capability's lives in the
gateway's. :func:`set_live` reads the app's deployed config from the Serve controller, changes only
those ``user_config`` entries and applies the config again, which is what ``serve deploy`` does
with an edited file: Serve then calls ``reconfigure`` on the running replicas (the code version
is unchanged, so nothing restarts) and requests keep being answered throughout.

    python -m serve_apps.admin show                                  # live configs of the `make run` app
    python -m serve_apps.admin set moderate safety_ref=safety@2      # swap the served safety model
    python -m serve_apps.admin set gateway 'thresholds={"ads_logo": {"threshold": 0.9}}'

The same call answers ``PUT /v1/admin/live/{capability}`` (key scope ``admin``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from pydantic import BaseModel

from livelens.errors import ConfigError, LivelensError, ModelNotFoundError

#: Deployments whose ``user_config`` holds each capability's live config (when it is not colocated).
DEPLOYMENTS = {"moderate": ("Moderation",), "ocr": ("Ocr", "TextRecognizer"), "quality": ("Quality",),
               "persons": ("Persons",), "detect": ("Detection",), "streams": ("Streams",), "gateway": ("Gateway",)}
#: Where a colocated capability's live config sits inside the gateway's.
GATEWAY_KEYS = {"moderate": "moderation", "quality": "quality"}
#: Live config fields naming models that must exist before a change is applied.
MODEL_FIELDS = {"moderate": ("safety_ref",), "ocr": ("regions",), "quality": ("iqa_ref",),
                "persons": ("detector", "attribute_model"), "detect": ("model", "window_check")}
#: Values of those fields that name a built-in model, not a model-store ref.
BUILT_IN = {"persons": ("mtcnn", "haar", "teacher")}


def live_model(cap: str) -> type[BaseModel]:
    """The pydantic model of ``cap``'s live config."""
    from serve_apps.detection import DetectionConfig
    from serve_apps.gateway import GatewayConfig
    from serve_apps.moderation import ModerationConfig
    from serve_apps.ocr import OcrConfig
    from serve_apps.persons import PersonsConfig
    from serve_apps.quality import QualityConfig
    from serve_apps.streams import StreamsConfig

    models = {"moderate": ModerationConfig, "ocr": OcrConfig, "quality": QualityConfig, "persons": PersonsConfig,
              "detect": DetectionConfig, "streams": StreamsConfig, "gateway": GatewayConfig}
    if cap not in models:
        raise ConfigError(f"unknown capability {cap!r}; live configs exist for {sorted(models)}")
    return models[cap]


def _details() -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def _app(details: dict[str, Any], app: str) -> dict[str, Any]:
    apps = details.get("applications") or {}
    if app not in apps:
        raise ConfigError(f"no Serve application {app!r} is running (have: {sorted(apps)})")
    if not apps[app].get("deployed_app_config"):
        raise ConfigError(f"application {app!r} was deployed with serve.run, not from a config; redeploy it "
                          "with `serve deploy` or `python -m serve_apps` to change it live")
    return apps[app]


def current_live(app: str = "livelens") -> dict[str, dict[str, Any]]:
    """Each capability's live config as the running deployments hold it."""
    details = _app(_details(), app)
    deps = details.get("deployments") or {}
    colocate = ((details["deployed_app_config"].get("args") or {}).get("gateway") or {}).get("colocate") or []
    gw = (deps.get("Gateway") or {}).get("deployment_config", {}).get("user_config") or {}
    out: dict[str, dict[str, Any]] = {"gateway": {k: v for k, v in gw.items() if k not in GATEWAY_KEYS.values()}}
    for cap, names in DEPLOYMENTS.items():
        if cap == "gateway":
            continue
        if cap in colocate:
            out[cap] = gw.get(GATEWAY_KEYS[cap]) or {}
        elif names[0] in deps:
            out[cap] = deps[names[0]].get("deployment_config", {}).get("user_config") or {}
    return out


def _check_models(cap: str, live: BaseModel, args: dict[str, Any]) -> None:
    """Refuse a change naming a model no store of the capability's chain has (before anything is applied)."""
    from livelens.store import find_in_stores

    key = {"moderate": "moderation", "detect": "detection"}.get(cap, cap)
    stores = (args.get(key) or {}).get("stores")
    for name in MODEL_FIELDS.get(cap, ()):
        ref = getattr(live, name)
        # A bool (``detect.window_check: true``) names no model: the detector's card does.
        if isinstance(ref, str) and ref and ref not in BUILT_IN.get(cap, ()) and find_in_stores(ref, stores) is None:
            raise ModelNotFoundError(f"{cap}.{name}={ref!r} is in none of the model stores; nothing was changed")


def patched_config(details: dict[str, Any], app: str, cap: str, changes: dict[str, Any]) -> tuple[dict, dict]:
    """The app's deployed config with ``cap``'s live config updated by ``changes``, and that live config.

    Raises:
        ConfigError: Unknown capability or app, or a change the live model rejects.
        ModelNotFoundError: A changed model ref is in no store.
    """
    model = live_model(cap)
    info = _app(details, app)
    cfg = json.loads(json.dumps(info["deployed_app_config"]))
    args = cfg.get("args") or {}
    colocated = cap in ((args.get("gateway") or {}).get("colocate") or [])
    deps = info.get("deployments") or {}

    def running(name: str) -> dict[str, Any]:
        return dict((deps.get(name) or {}).get("deployment_config", {}).get("user_config") or {})

    gw_now = running("Gateway")
    base = gw_now.get(GATEWAY_KEYS[cap]) or {} if colocated else (
        {k: v for k, v in gw_now.items() if k not in GATEWAY_KEYS.values()} if cap == "gateway"
        else running(DEPLOYMENTS[cap][0]))
    try:
        live = model.model_validate({**base, **changes})
    except ValueError as exc:
        raise ConfigError(f"{cap} live config: {exc}") from None
    _check_models(cap, live, args)
    targets: dict[str, dict[str, Any]] = {}
    if colocated:
        targets["Gateway"] = {**gw_now, GATEWAY_KEYS[cap]: live.model_dump()}
    elif cap == "gateway":
        targets["Gateway"] = {**gw_now, **live.model_dump(exclude={"moderation", "quality"})}
    else:
        for name in DEPLOYMENTS[cap]:
            if name not in deps:
                raise ConfigError(f"{cap} is not deployed in application {app!r}")
            targets[name] = live.model_dump()
    entries = {d["name"]: d for d in cfg.get("deployments") or []}
    for name, user_config in targets.items():
        entries.setdefault(name, {"name": name})["user_config"] = user_config
    cfg["deployments"] = list(entries.values())
    return cfg, live.model_dump()


def set_live(cap: str, changes: dict[str, Any], app: str = "livelens", wait_s: float = 120.0) -> dict[str, Any]:
    """Change ``cap``'s live config on the running ``app`` and wait until the replicas run it.

    Args:
        cap: A key of :data:`DEPLOYMENTS` (``moderate``, ``ocr``, ``quality``, ``persons``, ``detect``,
            ``streams``) or ``gateway``.
        changes: Fields of the capability's live config to change.
        app: The Serve application.
        wait_s: How long to wait for the application to be ``RUNNING`` again.

    Returns:
        The capability's new live config.

    Raises:
        ConfigError: See :func:`patched_config`; also when the app does not come back in time.
        ModelNotFoundError: A changed model ref is in no store.
    """
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    details = _details()
    cfg, live = patched_config(details, app, cap, changes)
    # Re-apply every application deployed from a config: an applied config replaces them all.
    apps = [cfg if name == app else info["deployed_app_config"]
            for name, info in (details.get("applications") or {}).items() if info.get("deployed_app_config")]
    doc = {"applications": apps}
    for key in ("proxy_location", "http_options"):
        if details.get(key) is not None:
            doc[key] = details[key]
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(doc), _blocking=False)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING" and _applied(app, cap, live):
            return live
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ConfigError(f"{app} did not take the new {cap} config: {status.status} {status.message[:300]}")
        time.sleep(0.5)
    raise ConfigError(f"{app} did not report the new {cap} config within {wait_s:g} s")


def apply_app(app_config: dict[str, Any], wait_s: float = 300.0) -> None:
    """Deploy one application from its config next to the running config-deployed ones (which stay).

    An applied config replaces every application deployed from a config, so the others are
    applied again as they are; applications deployed with ``serve.run`` are not touched.

    Raises:
        ConfigError: The config is invalid, or the application is not ``RUNNING`` within ``wait_s``.
    """
    from ray import serve
    from ray.serve.context import _get_global_client

    from livelens.serving.config import validate_serve_config

    details = _details()
    apps = [info["deployed_app_config"] for name, info in (details.get("applications") or {}).items()
            if info.get("deployed_app_config") and name != app_config["name"]]
    doc = {"applications": [*apps, app_config]}
    for key in ("proxy_location", "http_options"):
        if details.get(key) is not None:
            doc[key] = details[key]
    _get_global_client().deploy_apps(validate_serve_config(doc), _blocking=False)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        status = serve.status().applications.get(app_config["name"])
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ConfigError(f"{app_config['name']}: {status.status} {status.message[:500]}")
        time.sleep(1.0)
    raise ConfigError(f"{app_config['name']} is not running after {wait_s:g} s")


def _applied(app: str, cap: str, live: dict[str, Any]) -> bool:
    now = current_live(app).get(cap) or {}
    return all(now.get(k) == v for k, v in live.items())


def _parse_changes(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; a value is read as JSON when it parses (numbers, booleans, objects), else as text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``python -m serve_apps.admin``)."""
    p = argparse.ArgumentParser(prog="python -m serve_apps.admin", description=__doc__.splitlines()[0])
    p.add_argument("--address", default="auto", help="Ray cluster address (default: the running local one)")
    p.add_argument("--app", default="livelens")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("show", help="print every capability's live config")
    s = sub.add_parser("set", help="change a capability's live config")
    s.add_argument("capability", choices=sorted(DEPLOYMENTS))
    s.add_argument("changes", nargs="+", help="key=value (JSON values: numbers, true/false, objects)")
    a = p.parse_args(argv)
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    ray.init(address=a.address, log_to_driver=False)
    try:
        if a.cmd == "show":
            print(json.dumps(current_live(a.app), indent=2))
        else:
            print(json.dumps(set_live(a.capability, _parse_changes(a.changes), a.app), indent=2))
    except LivelensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
