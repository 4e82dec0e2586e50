"""Offline validators: shipped deployment files pass; each kind of mistake fails with file + path."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from cluster import validate as v
from cluster.validate import ValidationFailed, check_files, validate_file

CLUSTER = Path(v.__file__).parent
SHARED = Path(os.environ.get("LIVELENS_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
CRDS = SHARED / "kuberay-crds"


@pytest.fixture(scope="module")
def crds() -> Path:
    """../shared/kuberay-crds, or a clear failure (never a skip)."""
    if not all((CRDS / f).is_file() for f in v.CRD_FILES.values()):
        pytest.fail(
            f"the KubeRay CRDs are expected in {CRDS} (the project's shared/ folder); "
            "clone the project next to shared/ or set LIVELENS_SHARED",
            pytrace=False,
        )
    return CRDS


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _write(tmp_path: Path, doc: dict, name: str = "m.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


@pytest.mark.parametrize(
    "name", ["launcher.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml",
             "grafana/livelens.json"]
)
def test_shipped_files_validate(name, crds):
    assert validate_file(CLUSTER / name, crds) == []


def test_every_kuberay_manifest_uses_token_auth(crds):
    for name, spec_key in [
        ("raycluster", None),
        ("rayjob", "rayClusterSpec"),
        ("rayservice", "rayClusterConfig"),
    ]:
        spec = _load(f"kuberay/{name}.yaml")["spec"]
        cluster_spec = spec[spec_key] if spec_key else spec
        assert cluster_spec["authOptions"] == {"mode": "token"}, name


def test_launcher_typo_is_rejected(tmp_path):
    doc = _load("launcher.yaml")
    doc["available_node_types"]["gpu_a10g"]["min_worker"] = doc["available_node_types"]["gpu_a10g"].pop(
        "min_workers"
    )
    problems = validate_file(_write(tmp_path, doc, "launcher.yaml"))
    assert len(problems) == 1
    assert problems[0].path == "$.available_node_types.gpu_a10g"
    assert "'min_worker' was unexpected" in problems[0].message
    assert str(problems[0]).startswith(str(tmp_path / "launcher.yaml"))


def test_launcher_cross_field_error_is_reported(tmp_path):
    doc = _load("launcher.yaml")
    doc["head_node_type"] = "no_such_type"
    problems = validate_file(_write(tmp_path, doc))
    assert problems and "head_node_type" in problems[0].message


def test_raycluster_unknown_field_is_rejected(tmp_path, crds):
    doc = _load("kuberay/raycluster.yaml")
    doc["spec"]["workerGroupSpecs"][0]["minReplica"] = 1  # typo of minReplicas
    doc["spec"]["enableAutoscaling"] = True  # not a RayCluster field
    problems = validate_file(_write(tmp_path, doc), crds)
    paths = {p.path: p.message for p in problems}
    assert set(paths) == {"$.spec", "$.spec.workerGroupSpecs[0]"}
    assert "'enableAutoscaling' was unexpected" in paths["$.spec"]
    assert "'minReplica' was unexpected" in paths["$.spec.workerGroupSpecs[0]"]


def test_raycluster_wrong_type_and_enum_are_rejected(tmp_path, crds):
    doc = _load("kuberay/raycluster.yaml")
    doc["spec"]["authOptions"]["mode"] = "tokens"
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    problems = {p.path for p in validate_file(_write(tmp_path, doc), crds)}
    assert problems == {"$.spec.authOptions.mode", "$.spec.workerGroupSpecs[0].maxReplicas"}


def test_metadata_and_pod_template_stay_open(tmp_path, crds):
    # ObjectMeta is validated by the API server, not the CRD: labels/annotations must pass.
    doc = _load("kuberay/raycluster.yaml")
    doc["metadata"]["annotations"] = {"team": "livelens"}
    doc["spec"]["headGroupSpec"]["template"]["metadata"] = {"labels": {"a": "b"}}
    assert validate_file(_write(tmp_path, doc), crds) == []


def test_unserved_or_unknown_version_is_a_clear_error(tmp_path, crds):
    doc = _load("kuberay/raycluster.yaml")
    doc["apiVersion"] = "ray.io/v9"
    with pytest.raises(v.ConfigError, match="no version 'v9'"):
        validate_file(_write(tmp_path, doc), crds)


def test_rayjob_unknown_field_is_rejected(tmp_path, crds):
    doc = _load("kuberay/rayjob.yaml")
    doc["spec"]["entrypointCmd"] = doc["spec"].pop("entrypoint")
    problems = validate_file(_write(tmp_path, doc), crds)
    assert [p.path for p in problems] == ["$.spec"]
    assert "'entrypointCmd' was unexpected" in problems[0].message


def _serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def test_serve_unknown_deployment_key_is_rejected(tmp_path, crds):
    doc = _load("kuberay/rayservice.yaml")
    cfg = _serve_config(doc)
    # Serve's own schema accepts this silently: the typo would just be ignored in production.
    from ray.serve.schema import ServeDeploySchema

    broken = copy.deepcopy(cfg)
    broken["applications"][0]["deployments"] = [{"name": "Moderation", "num_replica": 3}]
    ServeDeploySchema.model_validate(broken)
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(broken, sort_keys=False)
    problems = validate_file(_write(tmp_path, doc), crds)
    assert len(problems) == 1
    assert problems[0].path == "$.spec.serveConfigV2.applications[0].deployments[0].num_replica"
    assert "silently ignore" in problems[0].message
    assert "did you mean 'num_replicas'" in problems[0].message


def test_livelens_app_args_are_checked_as_build_app_will(tmp_path, crds):
    doc = _load("kuberay/rayservice.yaml")
    cfg = _serve_config(doc)
    cfg["applications"][0]["args"]["moderation"]["max_batch_size"] = 16  # a live knob outside `live`
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(cfg, sort_keys=False)
    problems = validate_file(_write(tmp_path, doc), crds)
    assert [p.path for p in problems] == ["$.spec.serveConfigV2.applications[0].args.moderation.max_batch_size"]


def test_serve_schema_errors_are_reported(tmp_path, crds):
    doc = _load("kuberay/rayservice.yaml")
    cfg = _serve_config(doc)
    cfg["proxy_location"] = "Nowhere"  # not an enum value: Serve's own schema rejects it
    cfg["http_option"] = {}  # unknown top-level key: Serve 2.60 accepts it, we do not
    cfg["http_options"]["request_timeout"] = 5  # unknown nested key
    cfg["applications"][0]["deployments"] = [{"name": "Gateway", "autoscaling_config": {"max_replica": 3}}]
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    paths = {p.path for p in validate_file(_write(tmp_path, doc), crds)}
    base = "$.spec.serveConfigV2"
    assert paths == {
        f"{base}.proxy_location",
        f"{base}.http_option",
        f"{base}.http_options.request_timeout",
        f"{base}.applications[0].deployments[0].autoscaling_config.max_replica",
    }


def test_serve_config_that_is_not_yaml(tmp_path, crds):
    doc = _load("kuberay/rayservice.yaml")
    doc["spec"]["serveConfigV2"] = "applications: [unclosed"
    problems = validate_file(_write(tmp_path, doc), crds)
    assert problems and "not valid YAML" in problems[0].message


def test_rayservice_args_match_the_gateway_builder():
    # The manifest's args must be accepted by the builder it names (serve_apps owns AppArgs).
    from serve_apps.gateway import AppArgs

    app = _serve_config(_load("kuberay/rayservice.yaml"))["applications"][0]
    assert app["import_path"] == "serve_apps.gateway:build_app"
    AppArgs.model_validate(app["args"])


def test_check_files_raises_with_every_problem(tmp_path, crds):
    bad = _load("kuberay/rayjob.yaml")
    bad["spec"]["bogus"] = 1
    with pytest.raises(ValidationFailed) as exc:
        check_files([_write(tmp_path, bad), CLUSTER / "kuberay/raycluster.yaml"], crds)
    assert exc.value.code == "invalid_manifest"
    assert len(exc.value.problems) == 1 and "bogus" in str(exc.value)


def test_garbage_files_are_problems_not_crashes(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    (tmp_path / "other.yaml").write_text("apiVersion: v1\nkind: Pod\n")
    for name, needle in [
        ("empty", "empty"),
        ("list", "mapping"),
        ("bad", "cannot read"),
        ("other", "unrecognised"),
    ]:
        problems = validate_file(tmp_path / f"{name}.yaml")
        assert len(problems) == 1 and needle in problems[0].message, (name, problems)
    assert "cannot read" in validate_file(tmp_path / "missing.yaml")[0].message


def test_cli_exit_codes(tmp_path, crds, capsys):
    assert v.main([str(CLUSTER / "kuberay/rayjob.yaml"), "--crds", str(crds)]) == 0
    bad = _load("kuberay/rayjob.yaml")
    bad["spec"]["entrypointt"] = "x"
    assert v.main([str(_write(tmp_path, bad)), "--crds", str(crds)]) == 1
    assert "entrypointt" in capsys.readouterr().out


def _dashboard() -> dict:
    import json

    return json.loads((CLUSTER / "grafana" / "livelens.json").read_text())


def test_dashboard_mistakes_are_reported(tmp_path):
    import json

    doc = _dashboard()
    doc["panels"][0]["gridpos"] = doc["panels"][0].pop("gridPos")  # typo'd key
    doc["panels"][1]["targets"][0]["expr"] = "rate(livelens_request_total[1m])"  # not an exported metric
    doc["panels"][2]["id"] = doc["panels"][3]["id"]
    p = tmp_path / "d.json"
    p.write_text(json.dumps(doc))
    problems = [str(x) for x in validate_file(p)]
    assert any("gridpos" in x for x in problems), problems
    doc = _dashboard()
    doc["panels"][1]["targets"][0]["expr"] = "rate(livelens_request_total[1m])"
    doc["panels"][2]["id"] = doc["panels"][3]["id"]
    p.write_text(json.dumps(doc))
    problems = [str(x) for x in validate_file(p)]
    assert any("livelens_request_total is not exported" in x for x in problems), problems
    assert any("panel ids repeat" in x for x in problems), problems
    assert v.dashboard_metrics(_dashboard()) >= {"livelens_requests_total", "livelens_request_seconds",
                                                  "livelens_stage_seconds", "livelens_decisions_total"}


def test_control_plane_ports_are_never_published_and_token_auth_is_required(tmp_path, crds):
    """Issue 19: a NodePort/LoadBalancer head would publish GCS, dashboard and client; the validator says so."""
    cluster = _load("kuberay/raycluster.yaml")
    public = copy.deepcopy(cluster)
    public["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    msgs = [p.message for p in validate_file(_write(tmp_path, public), crds)]
    assert sum("outside the cluster" in m for m in msgs) == 3, msgs  # 6379, 8265, 10001 (8000 may be public)
    assert any("GCS port 6379" in m for m in msgs) and any("dashboard" in m for m in msgs)
    # A public head service whose own port list holds only Serve's HTTP port is fine.
    serve_only = copy.deepcopy(public)
    serve_only["spec"]["headGroupSpec"]["headService"] = {"spec": {"type": "LoadBalancer",
                                                                   "ports": [{"name": "serve", "port": 8000}]}}
    assert validate_file(_write(tmp_path, serve_only), crds) == []
    no_auth = copy.deepcopy(_load("kuberay/rayjob.yaml"))
    del no_auth["spec"]["rayClusterSpec"]["authOptions"]
    (problem,) = validate_file(_write(tmp_path, no_auth), crds)
    assert problem.path == "$.spec.rayClusterSpec.authOptions.mode" and "token" in problem.message
    service = copy.deepcopy(_load("kuberay/rayservice.yaml"))
    service["spec"]["serveService"] = {"spec": {"type": "NodePort", "ports": [{"name": "dash", "port": 8265}]}}
    assert [p.path for p in validate_file(_write(tmp_path, service), crds)] == ["$.spec.serveService"]


def _ib_container(doc: dict) -> dict:
    group = next(g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-a100-ib")
    return group["template"]["spec"]["containers"][0]


def _env(c: dict) -> dict:
    return {e["name"]: e for e in c["env"]}


@pytest.mark.parametrize("mutate, expect", [
    (lambda c: _env(c)["NCCL_NET_GDR_LEVEL"].update(value="NVLINK"), "NCCL_NET_GDR_LEVEL"),
    (lambda c: _env(c)["NCCL_SOCKET_IFNAME"].update(value="lo"), "loopback"),
    (lambda c: c["env"].remove(_env(c)["NCCL_SOCKET_IFNAME"]), "NCCL_SOCKET_IFNAME is not set"),
    (lambda c: c["env"].remove(_env(c)["NCCL_IB_HCA"]), "NCCL_IB_HCA"),
    (lambda c: c["env"].append({"name": "NCCL_IB_DISABLE", "value": "1"}), "NCCL_IB_DISABLE=1"),
    (lambda c: c.pop("securityContext"), "IPC_LOCK"),
    (lambda c: c.pop("volumeMounts"), "/dev/shm is 64 MiB"),
    # HCAs named for a pod that asks for no RDMA device.
    (lambda c: [c["resources"][k].pop("rdma/rdma_shared_device_a") for k in ("requests", "limits")], "no RDMA device"),
])
def test_kuberay_nccl_and_rdma_mistakes_are_caught(tmp_path, crds, mutate, expect):
    doc = _load("kuberay/raycluster.yaml")
    mutate(_ib_container(doc))
    problems = validate_file(_write(tmp_path, doc), crds)
    assert any(expect in p.message and "workerGroupSpecs[1]" in p.path for p in problems), problems


def test_launcher_nccl_settings_are_read_from_docker_options(tmp_path):
    doc = _load("launcher.yaml")
    opts = doc["available_node_types"]["gpu_a100x8"]["docker"]["worker_run_options"]
    assert validate_file(_write(tmp_path, doc, "launcher.yaml")) == []
    for drop, expect in [("--cap-add=IPC_LOCK", "IPC_LOCK"), ("--shm-size=64g", None),
                         ("-e NCCL_SOCKET_IFNAME=ens", "NCCL_SOCKET_IFNAME is not set")]:
        bad = copy.deepcopy(doc)
        bad["available_node_types"]["gpu_a100x8"]["docker"]["worker_run_options"] = [o for o in opts if
                                                                                     not o.startswith(drop)]
        if drop.startswith("--shm"):
            bad["docker"]["run_options"] = [o for o in bad["docker"]["run_options"] if "shm" not in o]
            expect = "/dev/shm is 0 MiB"
        problems = validate_file(_write(tmp_path, bad, "launcher.yaml"))
        assert any(expect in p.message and p.path == "$.available_node_types.gpu_a100x8" for p in problems), problems
