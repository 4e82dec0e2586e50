"""Offline validation of the deployment files: launcher YAML, KubeRay manifests, Serve configs,
Grafana dashboards.

* A Ray cluster-launcher YAML goes through Ray's own ``prepare_config`` + ``validate_config``
  (its JSON schema rejects typos such as ``min_worker``).
* A KubeRay manifest (RayCluster, RayJob, RayService) is checked against the CRD's
  ``openAPIV3Schema`` for its ``apiVersion``, made strict: CRD schemas allow unknown fields,
  which the API server then silently *prunes*, so a typo'd field just vanishes. As KubeRay's
  ``openapi2jsonschema.py`` does, every object schema with ``properties`` and no
  ``additionalProperties``/``x-kubernetes-preserve-unknown-fields`` gets
  ``additionalProperties: false``.
* Every KubeRay resource must turn Ray's token auth on (``authOptions.mode: token``), and no
  Kubernetes Service it makes may publish the GCS (6379), dashboard (8265) or Ray client (10001)
  port outside the cluster: a head or serve service of type ``NodePort`` or ``LoadBalancer`` may
  carry the Serve HTTP port only (:func:`validate_exposure`). Inside the cluster they stay on a
  ``ClusterIP`` service, which RayJob submission and the in-cluster clients use.
* A RayService's ``serveConfigV2`` (a YAML string) goes through
  ``ServeDeploySchema.model_validate``, plus a check that every application and deployment key
  is a field of Serve's schema (Serve accepts unknown deployment keys without a word).

CLI: ``python -m cluster.validate cluster/launcher.yaml cluster/kuberay/*.yaml`` (exit 1 on errors).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from livelens.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = Path(os.environ.get("LIVELENS_SHARED", REPO.parent / "shared")) / "kuberay-crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}


@dataclass(frozen=True)
class Problem:
    """One validation error.

    Attributes:
        file: The file it was found in.
        path: JSON path inside the document, e.g. ``$.spec.workerGroupSpecs[0].minReplica``.
        message: What is wrong.
    """

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}"


class ValidationFailed(ConfigError):
    """A deployment file is invalid; ``problems`` lists every error found."""

    code = "invalid_manifest"

    def __init__(self, problems: list[Problem]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def _json_path(parts: Iterable[Any]) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


# -- launcher ---------------------------------------------------------------------------------
def validate_launcher(config: dict[str, Any], file: str = "<launcher>") -> list[Problem]:
    """Validate a cluster-launcher config with Ray's own schema.

    Args:
        config: The parsed YAML.
        file: Name used in messages.

    Returns:
        The problems found (empty when valid).
    """
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    if not isinstance(config, dict):
        return [Problem(file, "$", "a launcher config must be a mapping")]
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as e:
        first = e.message.splitlines()[0]
        return [Problem(file, _json_path(e.absolute_path), first)]
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        # Ray's cross-field checks (head_node_type, max_workers...) raise plain errors.
        return [Problem(file, "$", f"{type(e).__name__}: {e}")]
    return validate_network_launcher(config, file)


# -- KubeRay ----------------------------------------------------------------------------------
def _strict(schema: Any) -> Any:
    """Copy of an OpenAPI schema where objects with listed properties reject unknown keys."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str, version: str, crd_dir: str = str(CRD_DIR)) -> dict[str, Any]:
    """The strict JSON schema of ``kind`` at ``version`` from the KubeRay CRD files.

    Args:
        kind: ``RayCluster``, ``RayJob`` or ``RayService``.
        version: The API version name, e.g. ``v1``.
        crd_dir: Folder of the CRD YAMLs (default ``../shared/kuberay-crds``).

    Raises:
        ConfigError: If the CRD file is missing or does not serve that version.
    """
    if kind not in CRD_FILES:
        raise ConfigError(f"unknown KubeRay kind {kind!r}; expected one of {sorted(CRD_FILES)}")
    path = Path(crd_dir) / CRD_FILES[kind]
    if not path.is_file():
        raise ConfigError(
            f"KubeRay CRD {path} not found: clone the project next to shared/ or set LIVELENS_SHARED"
        )
    # The CRDs are ~1 MB each: the C loader parses them in a fraction of the pure-Python time.
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            if not v.get("served", False):
                raise ConfigError(f"{kind} {version} is not served by this CRD")
            schema = _strict(v["schema"]["openAPIV3Schema"])
            # ObjectMeta is a bare `type: object` in CRDs (the API server validates it itself);
            # keep it open rather than inventing its schema here.
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            return schema
    served = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
    raise ConfigError(f"{kind} has no version {version!r}; served: {served}")


def validate_kuberay(
    doc: dict[str, Any], file: str = "<manifest>", crd_dir: Path | None = None
) -> list[Problem]:
    """Validate one KubeRay resource against its CRD (strict), and its ``serveConfigV2``.

    Args:
        doc: The parsed manifest.
        file: Name used in messages.
        crd_dir: Folder of the CRD YAMLs (default ``../shared/kuberay-crds``).

    Returns:
        The problems found (empty when valid).

    Raises:
        ConfigError: If the CRDs are not available.
    """
    import jsonschema

    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    group, _, version = str(api).partition("/")
    if group != "ray.io" or kind not in CRD_FILES:
        return [Problem(file, "$", f"not a KubeRay resource (apiVersion={api!r}, kind={kind!r})")]
    schema = crd_schema(kind, version, str(crd_dir or CRD_DIR))
    validator = jsonschema.Draft7Validator(schema)
    problems = [
        Problem(file, _json_path(e.absolute_path), e.message)
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    problems += validate_exposure(doc, file)
    problems += validate_network_kuberay(doc, file)
    if kind == "RayService" and isinstance(doc.get("spec"), dict) and "serveConfigV2" in doc["spec"]:
        problems += validate_serve_config(
            doc["spec"]["serveConfigV2"], file=file, base_path="$.spec.serveConfigV2"
        )
    return problems


#: Ports of Ray's control plane, never to be published outside the Kubernetes cluster.
PRIVATE_PORTS = {6379: "GCS", 8265: "dashboard (job submission)", 10001: "Ray client"}
#: Service types that publish their ports outside the cluster.
PUBLIC_SERVICE_TYPES = ("NodePort", "LoadBalancer")


def _cluster_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The RayCluster spec(s) inside a KubeRay resource, with their JSON paths."""
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    kind = doc.get("kind")
    if kind == "RayCluster":
        return [("$.spec", spec)]
    key = {"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}.get(str(kind))
    inner = spec.get(key) if key else None
    return [(f"$.spec.{key}", inner)] if isinstance(inner, dict) else []


def validate_exposure(doc: dict[str, Any], file: str = "<manifest>") -> list[Problem]:
    """Token auth on, and Ray's control-plane ports kept off every Service published outside the cluster.

    Returns:
        The problems found (empty when the resource is safe to apply).
    """
    problems: list[Problem] = []
    for path, spec in _cluster_specs(doc):
        if (spec.get("authOptions") or {}).get("mode") != "token":
            problems.append(Problem(file, f"{path}.authOptions.mode",
                                    "Ray token auth must be on (authOptions: {mode: token})"))
        head = spec.get("headGroupSpec") or {}
        service = (head.get("headService") or {}).get("spec") or {}
        kind = service.get("type") or head.get("serviceType") or "ClusterIP"
        if kind in PUBLIC_SERVICE_TYPES:
            if service.get("ports"):
                ports = [p.get("port") or p.get("targetPort") for p in service["ports"]]
            else:  # KubeRay publishes the head container's ports
                containers = ((head.get("template") or {}).get("spec") or {}).get("containers") or [{}]
                ports = [p.get("containerPort") for p in containers[0].get("ports") or []] or list(PRIVATE_PORTS)
            for port in ports:
                if port in PRIVATE_PORTS:
                    problems.append(Problem(file, f"{path}.headGroupSpec", f"the head service is a {kind}: it "
                                            f"would publish the {PRIVATE_PORTS[port]} port {port} outside the cluster"))
    serve_svc = ((doc.get("spec") or {}).get("serveService") or {}).get("spec") or {}
    if doc.get("kind") == "RayService" and serve_svc.get("type") in PUBLIC_SERVICE_TYPES:
        for port in (p.get("port") for p in serve_svc.get("ports") or []):
            if port in PRIVATE_PORTS:
                problems.append(Problem(file, "$.spec.serveService", f"the serve service publishes the "
                                        f"{PRIVATE_PORTS[port]} port {port}"))
    return problems


# -- NCCL / RDMA network settings ---------------------------------------------------------------
#: NCCL_NET_GDR_LEVEL's documented values: how far apart a NIC and a GPU may be for GPUDirect RDMA.
GDR_LEVELS = ("LOC", "PIX", "PXB", "PHB", "SYS", "0", "1", "2", "3", "4", "5")
#: Resource names of RDMA device plugins: Mellanox's shared-device and SR-IOV plugins, AWS EFA.
RDMA_RESOURCE_PREFIXES = ("rdma/", "nvidia.com/hostdev", "vpc.amazonaws.com/efa")
#: Below this /dev/shm, NCCL's intra-node shared-memory transport and DataLoader workers fail.
MIN_SHM_BYTES = 1 << 30


def _bytes(size: str | int | None) -> int:
    """``16g`` (docker), ``8Gi`` or ``8G`` (Kubernetes), ``1073741824`` → bytes (0 when unset or unreadable).

    Docker's lower-case units and Kubernetes' ``Ki``/``Mi``/``Gi`` are binary; Kubernetes'
    ``K``/``M``/``G`` are decimal.
    """
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(size or ""))
    if not m:
        return 0
    unit, binary = m.group(2), bool(m.group(3)) or m.group(2).islower()
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.lower()]
    return int(float(m.group(1)) * (1024 if binary else 1000) ** power)


def check_nccl(env: dict[str, str], *, gpus: int, rdma: bool, ipc_lock: bool, shm_bytes: int, file: str,
               path: str) -> list[Problem]:
    """The NCCL and RDMA settings of one node type or pod template.

    Rules (docs/cluster.md, "Network settings for multi-node GPU training", says why):

    - ``NCCL_NET_GDR_LEVEL`` is one of :data:`GDR_LEVELS`.
    - ``NCCL_SOCKET_IFNAME`` (NCCL's bootstrap and socket-transport interface) must not be
      ``lo``, which would keep every rank on its own host; it is required wherever RDMA is.
    - RDMA (a device-plugin resource, or ``/dev/infiniband`` passed in) needs ``IPC_LOCK``
      (verbs pin memory), and ``NCCL_IB_DISABLE=1`` would waste it. InfiniBand/RoCE (not EFA,
      which NCCL reaches through the aws-ofi-nccl plugin) needs ``NCCL_IB_HCA``.
    - ``NCCL_IB_HCA`` without any RDMA device names HCAs the container cannot see.
    - A node with several GPUs or RDMA needs ``/dev/shm`` of at least 1 GiB: Docker's 64 MB
      default breaks NCCL's shared-memory transport between the GPUs of one node.

    Returns:
        The problems found.
    """
    problems: list[Problem] = []
    gdr = env.get("NCCL_NET_GDR_LEVEL")
    if gdr is not None and str(gdr).upper() not in GDR_LEVELS:
        problems.append(Problem(file, path, f"NCCL_NET_GDR_LEVEL={gdr!r} is not one of {GDR_LEVELS}"))
    ifname = env.get("NCCL_SOCKET_IFNAME")
    if ifname is not None and ifname.strip().lstrip("=^") in ("", "lo"):
        problems.append(Problem(file, path, f"NCCL_SOCKET_IFNAME={ifname!r}: loopback cannot reach other nodes"))
    efa = env.get("FI_PROVIDER", "").lower() == "efa"
    if rdma:
        if ifname is None:
            problems.append(Problem(file, path, "RDMA is requested but NCCL_SOCKET_IFNAME is not set: NCCL may "
                                    "bootstrap over a docker or CNI bridge"))
        if not ipc_lock:
            problems.append(Problem(file, path, "RDMA needs the IPC_LOCK capability (verbs pin memory)"))
        if env.get("NCCL_IB_DISABLE") == "1":
            problems.append(Problem(file, path, "NCCL_IB_DISABLE=1 turns off the RDMA devices this node requests"))
        if not efa and not env.get("NCCL_IB_HCA"):
            problems.append(Problem(file, path, "InfiniBand/RoCE without NCCL_IB_HCA: NCCL may pick a port that "
                                    "is down or on another fabric"))
    elif env.get("NCCL_IB_HCA"):
        problems.append(Problem(file, path, "NCCL_IB_HCA is set but no RDMA device is requested or passed in"))
    if (gpus > 1 or rdma) and shm_bytes < MIN_SHM_BYTES:
        problems.append(Problem(file, path, f"/dev/shm is {shm_bytes >> 20} MiB on a node with {gpus} GPUs"
                                f"{' and RDMA' if rdma else ''}: give it at least 1 GiB"))
    return problems


def validate_network_launcher(config: dict[str, Any], file: str = "<launcher>") -> list[Problem]:
    """:func:`check_nccl` for each node type of a launcher config, from its docker run options."""
    import shlex

    problems: list[Problem] = []
    docker = config.get("docker") or {}
    for name, nt in (config.get("available_node_types") or {}).items():
        opts = [*docker.get("run_options", []), *((nt.get("docker") or {}).get("worker_run_options") or [])]
        words = [w for o in opts for w in shlex.split(str(o))]
        env: dict[str, str] = {}
        caps, shm, rdma = set(), 0, False
        for i, w in enumerate(words):
            nxt = words[i + 1] if i + 1 < len(words) else ""
            key, _, val = w.partition("=")
            if w in ("-e", "--env") and "=" in nxt:
                k, _, v = nxt.partition("=")
                env[k] = v
            elif key == "--shm-size":
                shm = _bytes(val or nxt)
            elif key == "--cap-add":
                caps.add((val or nxt).upper())
            elif key == "--device" and "/dev/infiniband" in (val or nxt):
                rdma = True
        gpus = sum(int(v) for k, v in (nt.get("resources") or {}).items()
                   if k == "GPU" or k.startswith("accelerator_"))
        problems += check_nccl(env, gpus=gpus, rdma=rdma, ipc_lock="IPC_LOCK" in caps, shm_bytes=shm, file=file,
                               path=f"$.available_node_types.{name}")
    return problems


def validate_network_kuberay(doc: dict[str, Any], file: str = "<manifest>") -> list[Problem]:
    """:func:`check_nccl` for every container of every group of a KubeRay resource."""
    problems: list[Problem] = []
    for path, spec in _cluster_specs(doc):
        groups = [("headGroupSpec", spec.get("headGroupSpec") or {})]
        groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
        for where, group in groups:
            pod = (group.get("template") or {}).get("spec") or {}
            shm_volumes = {v.get("name"): _bytes((v.get("emptyDir") or {}).get("sizeLimit")) or MIN_SHM_BYTES
                           for v in pod.get("volumes") or []
                           if (v.get("emptyDir") or {}).get("medium") == "Memory"}
            for c_i, c in enumerate(pod.get("containers") or []):
                env = {e.get("name"): str(e.get("value", "")) for e in c.get("env") or [] if "value" in e}
                res = {**((c.get("resources") or {}).get("requests") or {}),
                       **((c.get("resources") or {}).get("limits") or {})}
                gpus = int(res.get("nvidia.com/gpu", 0) or 0)
                rdma = any(str(k).startswith(RDMA_RESOURCE_PREFIXES) for k in res)
                caps = {str(x).upper() for x in (((c.get("securityContext") or {}).get("capabilities") or {})
                                                 .get("add") or [])}
                shm = max((shm_volumes.get(m.get("name"), 0) for m in c.get("volumeMounts") or []
                           if m.get("mountPath") == "/dev/shm"), default=64 << 20)
                problems += check_nccl(env, gpus=gpus, rdma=rdma, ipc_lock="IPC_LOCK" in caps, shm_bytes=shm,
                                       file=file, path=f"{path}.{where}.template.spec.containers[{c_i}]")
    return problems


# -- Serve ------------------------------------------------------------------------------------
def validate_serve_config(
    config: str | dict[str, Any], file: str = "<serve config>", base_path: str = "$"
) -> list[Problem]:
    """Validate a Serve deploy config (the ``serve deploy`` / ``serveConfigV2`` format).

    Args:
        config: The config, as a YAML string (as in ``serveConfigV2``) or a parsed dict.
        file: Name used in messages.
        base_path: JSON path of the config inside its file.

    Returns:
        The problems found (empty when valid).
    """
    import pydantic
    from ray.serve.schema import ServeDeploySchema

    if isinstance(config, str):
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError as e:
            return [Problem(file, base_path, f"serveConfigV2 is not valid YAML: {e}")]
    if not isinstance(config, dict):
        return [Problem(file, base_path, "a Serve config must be a mapping")]
    problems: list[Problem] = []
    try:
        ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as e:
        for err in e.errors():
            loc = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in err["loc"])
            problems.append(Problem(file, f"{base_path}.{loc}".replace(".[", "["), err["msg"]))
    # Serve 2.60 ignores unknown keys at every level (top level included), so walk the config
    # along the pydantic models and flag any key that is not a field.
    for path, key, fields in _unknown_keys(ServeDeploySchema, config, base_path):
        hint = _closest(key, fields)
        problems.append(
            Problem(
                file,
                f"{path}.{key}",
                "unknown field (Serve would silently ignore it)"
                + (f"; did you mean {hint!r}?" if hint else ""),
            )
        )
    problems += _livelens_args(config, file, base_path)
    # pydantic and our own check can both flag the same key; report it once.
    return list(dict.fromkeys(problems))


def _livelens_args(config: dict[str, Any], file: str, base_path: str) -> list[Problem]:
    """Check the ``args`` of every livelens application against ``AppArgs``, as ``build_app`` will.

    Serve passes ``args`` to the builder untouched, so a typo there (``max_batch_size`` where
    the live config belongs) would only fail when the cluster deploys it.
    """
    import pydantic

    problems: list[Problem] = []
    for i, app in enumerate(config.get("applications") or []):
        if not isinstance(app, dict) or app.get("import_path") != "serve_apps.gateway:build_app":
            continue
        from serve_apps.gateway import AppArgs

        try:
            AppArgs.model_validate(app.get("args") or {})
        except pydantic.ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(x) for x in err["loc"])
                problems.append(Problem(file, f"{base_path}.applications[{i}].args.{loc}", err["msg"]))
    return problems


def _model_in(annotation: Any) -> tuple[type | None, bool]:
    """The pydantic model inside an annotation, and whether it is a list of them."""
    import typing

    import pydantic

    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple) and args:
        model, _ = _model_in(args[0])
        return model, model is not None
    for arg in args:  # Optional[...] / Union[...]
        model, is_list = _model_in(arg)
        if model is not None:
            return model, is_list
    return None, False


def _unknown_keys(model: Any, data: Any, path: str) -> Iterable[tuple[str, str, list[str]]]:
    """Yield ``(path, key, known_fields)`` for keys of ``data`` that ``model`` does not define."""
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    names = {n: n for n in fields} | {f.alias: n for n, f in fields.items() if f.alias}
    for key, value in data.items():
        if key not in names:
            yield path, key, list(fields)
            continue
        sub, is_list = _model_in(fields[names[key]].annotation)
        if sub is None:
            continue
        if is_list and isinstance(value, list):
            for i, item in enumerate(value):
                yield from _unknown_keys(sub, item, f"{path}.{key}[{i}]")
        elif not is_list:
            yield from _unknown_keys(sub, value, f"{path}.{key}")


def _closest(key: str, options: Iterable[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.8)
    return match[0] if match else None


# -- Grafana dashboards -------------------------------------------------------------------------
#: The part of Grafana's dashboard JSON model (schemaVersion 36+) that our dashboards use, strict:
#: Grafana ignores unknown keys, so a typo'd key would silently do nothing. Grafana publishes no
#: JSON Schema file for the classic model; this follows its documented "JSON model" page.
_DASHBOARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels"],
    "additionalProperties": False,
    "properties": {
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "tags": {"type": "array", "items": {"type": "string"}},
        "timezone": {"enum": ["browser", "utc", ""]},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "version": {"type": "integer"},
        "editable": {"type": "boolean"},
        "refresh": {"type": "string"},
        "time": {"type": "object", "required": ["from", "to"], "additionalProperties": False,
                 "properties": {"from": {"type": "string"}, "to": {"type": "string"}}},
        "templating": {"type": "object", "additionalProperties": False, "properties": {"list": {"type": "array"}}},
        "annotations": {"type": "object", "additionalProperties": False, "properties": {"list": {"type": "array"}}},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["id", "type", "title", "gridPos", "targets"], "additionalProperties": False,
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": ["timeseries", "table", "stat", "gauge", "bargauge", "heatmap", "text"]},
                "title": {"type": "string", "minLength": 1},
                "datasource": {"type": "object", "required": ["type", "uid"], "additionalProperties": False,
                               "properties": {"type": {"const": "prometheus"}, "uid": {"type": "string"}}},
                "gridPos": {"type": "object", "required": ["h", "w", "x", "y"], "additionalProperties": False,
                            "properties": {k: {"type": "integer", "minimum": 0, "maximum": 24 if k in "wx" else 1000}
                                           for k in ("h", "w", "x", "y")}},
                "fieldConfig": {"type": "object"},
                "options": {"type": "object"},
                "targets": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["refId", "expr"], "additionalProperties": False,
                    "properties": {"refId": {"type": "string"}, "expr": {"type": "string", "minLength": 1},
                                   "legendFormat": {"type": "string"}}}},
            }}},
    },
}


def dashboard_metrics(doc: dict[str, Any]) -> set[str]:
    """The metric names a dashboard's PromQL uses (``livelens_*``, histogram suffixes stripped)."""
    import re

    names = set()
    for panel in doc.get("panels", []):
        for target in panel.get("targets", []):
            for name in re.findall(r"\b(livelens_[a-z_]+)", target.get("expr", "")):
                names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


def validate_dashboard(doc: dict[str, Any], file: str = "<dashboard>") -> list[Problem]:
    """A Grafana dashboard: its JSON model, unique panel ids, panels inside the 24-column grid,
    and only metrics the service exports (:data:`livelens.serving.telemetry.METRIC_NAMES`)."""
    import jsonschema

    from livelens.serving.telemetry import METRIC_NAMES

    validator = jsonschema.Draft7Validator(_DASHBOARD_SCHEMA)
    problems = [Problem(file, _json_path(e.absolute_path), e.message) for e in validator.iter_errors(doc)]
    if problems:
        return problems
    ids = [p["id"] for p in doc["panels"]]
    if len(ids) != len(set(ids)):
        problems.append(Problem(file, "$.panels", f"panel ids repeat: {sorted(ids)}"))
    for i, p in enumerate(doc["panels"]):
        if p["gridPos"]["x"] + p["gridPos"]["w"] > 24:
            problems.append(Problem(file, f"$.panels[{i}].gridPos", "panel runs past the 24-column grid"))
    exported = {n.removesuffix("_total") for n in METRIC_NAMES} | set(METRIC_NAMES)
    for name in sorted(dashboard_metrics(doc) - exported):
        problems.append(Problem(file, "$.panels", f"metric {name} is not exported by the service"))
    return problems


# -- files ------------------------------------------------------------------------------------
def validate_file(path: str | Path, crd_dir: Path | None = None) -> list[Problem]:
    """Validate every YAML document in a file, choosing the validator by its content.

    KubeRay resources are recognised by ``apiVersion: ray.io/...``, launcher configs by
    ``cluster_name`` + ``provider``, Serve configs by ``applications``.

    Args:
        path: The file.
        crd_dir: Folder of the KubeRay CRDs.

    Returns:
        The problems found (empty when valid).
    """
    path = Path(path)
    name = str(path)
    if path.suffix == ".json":
        import json

        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return [Problem(name, "$", f"cannot read JSON: {e}")]
        if isinstance(doc, dict) and "panels" in doc:
            return validate_dashboard(doc, name)
        return [Problem(name, "$", "unrecognised JSON file: not a Grafana dashboard")]
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        return [Problem(name, "$", f"cannot read YAML: {e}")]
    if not docs:
        return [Problem(name, "$", "empty file")]
    problems: list[Problem] = []
    for k, doc in enumerate(docs):
        where = name if len(docs) == 1 else f"{name}#{k}"
        if not isinstance(doc, dict):
            problems.append(Problem(where, "$", "a document must be a mapping"))
        elif str(doc.get("apiVersion", "")).startswith("ray.io/"):
            problems += validate_kuberay(doc, where, crd_dir)
        elif "provider" in doc and "cluster_name" in doc:
            problems += validate_launcher(doc, where)
        elif "applications" in doc:
            problems += validate_serve_config(doc, where)
        else:
            problems.append(Problem(where, "$", "unrecognised file: not a KubeRay, launcher or Serve config"))
    return problems


def check_files(paths: Iterable[str | Path], crd_dir: Path | None = None) -> None:
    """Validate files and raise on any problem.

    Raises:
        ValidationFailed: Listing every problem of every file.
    """
    problems = [p for path in paths for p in validate_file(path, crd_dir)]
    if problems:
        raise ValidationFailed(problems)


def default_files() -> list[Path]:
    """The deployment files shipped in ``cluster/``."""
    here = Path(__file__).parent
    return [here / "launcher.yaml", *sorted((here / "kuberay").glob("*.yaml")), *sorted((here / "grafana").glob("*.json"))]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; with no files, validates the shipped ones."""
    p = argparse.ArgumentParser(prog="python -m cluster.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="YAML files (default: cluster/'s own)")
    p.add_argument("--crds", type=Path, default=None, help=f"KubeRay CRD folder (default {CRD_DIR})")
    ns = p.parse_args(argv)
    files = ns.files or default_files()
    bad = 0
    for f in files:
        try:
            problems = validate_file(f, ns.crds)
        except ConfigError as e:
            problems = [Problem(str(f), "$", str(e))]
        for prob in problems:
            print(prob)
        print(f"{'FAIL' if problems else 'ok  '} {f}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
