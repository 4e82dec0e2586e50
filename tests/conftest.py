"""Shared fixtures: one Ray session for the whole suite, and the real data in ../shared.

Ray start-up costs ~10 s and Serve ~15 s on this 2-core machine, so every test that needs
Ray uses the session-scoped ``ray_session`` (and ``serve_session``) below; nothing else in
the suite calls ``ray.init`` or ``ray.shutdown``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray reads RAY_AUTH_MODE once, when it is first imported: set it before anything imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# The suite runs Serve in the mode `make run` uses (LIVELENS_SERVE_MODE=default for stock Serve);
# its flags, too, are read at import and inherited by the raylet, so they go in before ray.init.
_SERVE_MODE = os.environ.setdefault("LIVELENS_SERVE_MODE", "throughput")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVELENS_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"

# Logical CPUs for the test cluster: deployments and trainers use fractional CPUs, but a
# larger logical count keeps several small actors schedulable on a 2-core machine.
RAY_TEST_CPUS = 8


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a failure that says what is missing (never a silent skip)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"this test needs the real test images in {SHARED_DATA} (the project's shared/ folder). "
            "Clone the project next to shared/ or set LIVELENS_SHARED to its path.",
            pytrace=False,
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray cluster for the whole test session (token auth on, small object store)."""
    import ray

    from serve_apps.common import SERVE_MODES

    os.environ.update(SERVE_MODES[_SERVE_MODE])
    # Workers must not import the repo's datasets/ folder as a package (see test_datasets_shadow).
    if not ray.is_initialized():
        ray.init(
            num_cpus=RAY_TEST_CPUS,
            object_store_memory=512 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO),
                                      **({"TORCH_HOME": os.environ["TORCH_HOME"]} if os.environ.get("TORCH_HOME") else {})}},
        )
    yield ray
    # No serve.shutdown() here: at the end of the session ray.shutdown() ends the controller and
    # every replica anyway, and Serve's graceful shutdown racing the test apps' deletions once
    # aborted the whole pytest process after every test had passed.
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_session(ray_session):
    """Ray Serve started once on the shared cluster, HTTP on a free loopback port."""
    import socket

    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def window_detector():
    """A function that stores a real mmdet detector which calls every place a picture-in-picture window.

    Its classification layers are set by hand (every anchor: ``pip`` at 0.993, nothing else; each
    box 4 strides a side), so a test of the detection stage's routing knows what the detector
    will say without training one (``make train-persons`` trains the real one).
    """
    def save(store: Path | str, size: int = 256) -> str:
        import torch

        from livelens.ocr.mm_configs import OBJECT_CLASSES
        from livelens.ocr.mmocr_adapter import build_object_detector
        from livelens.store import ModelStore

        model = build_object_detector("rtmdet_mobilenetv2", pretrained=False)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "rtm_cls" in name or "rtm_reg" in name:
                    p.zero_()
                    if name.endswith("bias"):
                        p.fill_(2.0 if "rtm_reg" in name else -10.0)
                        if "rtm_cls" in name:
                            p[OBJECT_CLASSES.index("pip")] = 5.0
        card = {"task": "object_detection", "arch": {"backend": "mmdet", "config": "rtmdet_mobilenetv2",
                                                     "classes": list(OBJECT_CLASSES), "size": size},
                "metrics": {"heldout_thr_pip": 0.5}}
        return ModelStore(str(store)).save("persons_det", model.state_dict(), card)

    return save


# -- where the suite's CPU goes ---------------------------------------------------------------
# A test that takes 15 s alone took 48 s in CI: something else held the two cores. After every
# test, the processes that used the most CPU during it (the suite's own process included) go to
# runs/test-cpu.tsv, so the next trim of the suite starts from where the time went.
_CPU_LOG = Path(__file__).resolve().parents[1] / "runs" / "test-cpu.tsv"
_cpu_seen: dict[int, float] = {}


def _cpu_snapshot() -> dict[int, tuple[float, str]]:
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cpu_times", "cmdline", "name"]):
        try:
            t = p.info["cpu_times"]
            cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])
            out[p.info["pid"]] = (t.user + t.system, cmd)
        except (TypeError, AttributeError):
            continue
    return out


def pytest_sessionstart(session) -> None:
    _CPU_LOG.parent.mkdir(parents=True, exist_ok=True)
    _CPU_LOG.write_text("test\tseconds\tcpu_s\ttop processes (cpu s)\n")
    _cpu_seen.update({pid: t for pid, (t, _) in _cpu_snapshot().items()})


_test_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    _test_seconds[report.nodeid] = _test_seconds.get(report.nodeid, 0.0) + report.duration
    if report.when != "teardown":
        return
    try:
        snap = _cpu_snapshot()
    except Exception:  # diagnostics only: never fail a test over them
        return
    used = sorted(((t - _cpu_seen.get(pid, 0.0), cmd) for pid, (t, cmd) in snap.items()), reverse=True)
    _cpu_seen.clear()
    _cpu_seen.update({pid: t for pid, (t, _) in snap.items()})
    top = "; ".join(f"{cmd[:90]} ({s:.1f})" for s, cmd in used[:4] if s >= 0.5)
    with open(_CPU_LOG, "a", encoding="utf-8") as f:
        f.write(f"{report.nodeid}\t{_test_seconds.pop(report.nodeid, 0.0):.1f}\t{sum(max(s, 0) for s, _ in used):.1f}\t{top}\n")
