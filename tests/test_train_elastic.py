"""Elastic training (Train V2 min/max workers) on a real multi-node cluster that loses a node.

The safety job runs on a LocalCluster (head + two raylets, one Train worker fits on each). Its
train split streams through Ray Data every epoch (``local_rows=0``), as a full-size run's does: the
streaming split is what has to survive the lost node, and its epochs last long enough for the node
to come back before the run ends. Once
an epoch has run on two workers, raylet ``w1`` is SIGKILLed with everything under it, as a lost
machine. The run must go on with one worker from its last checkpoint, then grow back to two
when ``w1`` is started again, and end with every epoch in its history exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

DRIVER = """
import json, sys
from livelens.train import LoopConfig
from livelens.train.driver import read_checkpoint
from ray.train import Checkpoint
from train_jobs.safety import SafetyTrainConfig, run
manifest, tmp = sys.argv[1], sys.argv[2]
cfg = SafetyTrainConfig(manifest=manifest, pretrained=False, freeze_backbone=False, evidence_crop=False, image_size=64,
                        local_rows=0, num_workers=2, min_workers=1, resize_check_s=3, cpus_per_worker=2, max_failures=3,
                        storage_path=tmp + "/train", run_name="el", register=False,
                        loop=LoopConfig(epochs=EPOCHS, lr=3e-3, batch_size=4, precision="fp32", tensorboard_dir="",
                                        max_steps_per_epoch=2))
s = run(cfg)
state, _, _ = read_checkpoint(Checkpoint(s["checkpoint"]))
print("@@" + json.dumps([{k: h.get(k) for k in ("epoch", "world_size", "train_loss")} for h in state["fit"]["history"]]))
"""
# The run must still have epochs left when the returned node is ready (start, resize check, a new
# worker group): with 6, a run on a quiet machine once ended on one worker (sizes [2, 1, 1, 1, 1, 1],
# the node back 41 s before the end). One-worker epochs take about 10 s; 9 leaves a margin of several.
EPOCHS = 9


def _sizes(root: Path) -> list[int]:
    """World size of each committed checkpoint's epoch so far (the run keeps the last two).

    A checkpoint is committed once the Train controller has registered it, which it records in
    its snapshot file (``checkpoint_manager_snapshot.json``, Train V2's own). A folder that is on
    disk but not yet registered dies with a node lost at that moment, and the run restarts from
    the one before: the kill waits for the commit so that the test checks resumption, not luck.
    """
    try:
        committed = (root / "checkpoint_manager_snapshot.json").read_text()
    except OSError:
        return []
    out = []
    for d in sorted(root.glob("checkpoint_*")):
        if d.name not in committed:
            continue
        try:
            m = json.loads((d / "metrics.json").read_text())
        except (OSError, ValueError):  # being written or already rotated away
            continue
        out.append((m["epoch"], m["world_size"]))
        SEEN.add((d.name, m["epoch"], m["world_size"]))
    return [n for _, n in sorted(out)]


SEEN: set[tuple[str, int, int]] = set()


#: Log lines that say what the Train controller and its workers did (the rest of the job's stderr
#: is mostly Ray Data's progress bars, which would fill a failure message on their own).
TELLING = ("Controller", "worker group", "Did not detect", "resiz", "Error", "Traceback", "restart", "Failure",
           "node", "epoch")


def _telling(err: str, n: int = 60) -> str:
    lines = [ln for ln in err.splitlines() if any(t in ln for t in TELLING) and "row/s" not in ln]
    return "\n".join(lines[-n:])


def _logs(logs: Path) -> tuple[str, str]:
    return tuple((logs / f"{name}.log").read_text(errors="replace") for name in ("out", "err"))


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = _logs(logs)
            pytest.fail(f"the job ended while waiting for {what}: {out[-2000:]}\n{_telling(err)}\n{err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            out, err = _logs(logs)
            pytest.fail(f"timed out waiting for {what} (checkpoints seen: {sorted(SEEN)}): {out[-2000:]}\n"
                        f"{_telling(err)}")
        time.sleep(0.5)


@pytest.mark.slow
def test_run_survives_a_lost_node_and_grows_back(tmp_path):
    from cluster.local import REPO, LocalCluster
    from livelens.data import write_manifest
    from livelens.data.frames import FrameConfig, frames_card, generate_frames

    cfg = FrameConfig()
    manifest = write_manifest(generate_frames(0, 24, seed=7, cfg=cfg), tmp_path / "frames", frames_card(7, 24, cfg),
                              contact_sheet=False)
    ckpts = tmp_path / "train" / "el"
    # The job's output goes to files, not pipes: nothing reads a pipe while the test waits, so the
    # driver would block on its first write past the pipe's 64 KiB (Ray Data's progress bars get
    # there quickly), and a failure message would show only the bars.
    logs = tmp_path / "logs"
    logs.mkdir()
    with LocalCluster(num_workers=2, cpus_per_worker=3, object_store_mb=200, include_dashboard=True) as c, \
            open(logs / "out.log", "w") as out_f, open(logs / "err.log", "w") as err_f:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER.replace("EPOCHS", str(EPOCHS)), str(manifest),
                                 str(tmp_path)], env=c.client_env(), cwd=str(REPO), stdout=out_f, stderr=err_f,
                                text=True)
        try:
            # An elastic run starts with the workers it can place at once: wait until it has both.
            _wait(lambda: 2 in _sizes(ckpts), 240, "an epoch on two nodes", proc, logs)
            t0 = time.monotonic()
            c.kill_node("w1")
            # Progress on the one node left, from the last checkpoint.
            _wait(lambda: _sizes(ckpts)[-1:] == [1], 300, "an epoch on one node", proc, logs)
            t1 = time.monotonic()
            c.start_node("w1")
            proc.wait(timeout=600)
            print(f"killed→an epoch on one node {t1 - t0:.0f} s, node back→end {time.monotonic() - t1:.0f} s")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out, err = _logs(logs)
    assert proc.returncode == 0, out[-2000:] + _telling(err) + err[-3000:]
    history = json.loads(next(ln for ln in out.splitlines() if ln.startswith("@@"))[2:])
    # No checkpoint lost: every epoch once, in order, across both restarts.
    assert [h["epoch"] for h in history] == list(range(EPOCHS)), history
    sizes = [h["world_size"] for h in history]
    print("world size per epoch:", sizes)
    # Two workers, then one after the loss, then two again once the node is back.
    runs = [n for i, n in enumerate(sizes) if i == 0 or n != sizes[i - 1]]
    assert runs[-3:] == [2, 1, 2], (sizes, sorted(SEEN))
