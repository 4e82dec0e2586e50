"""Elastic training (Train V2 min/max workers) on a real multi-node cluster that loses a node.

The safety job runs on a LocalCluster (head + two raylets, one Train worker fits on each). Once
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
                        num_workers=2, min_workers=1, resize_check_s=3, cpus_per_worker=2, max_failures=3,
                        storage_path=tmp + "/train", run_name="el", register=False,
                        loop=LoopConfig(epochs=EPOCHS, lr=3e-3, batch_size=4, precision="fp32", tensorboard_dir="",
                                        max_steps_per_epoch=2))
s = run(cfg)
state, _, _ = read_checkpoint(Checkpoint(s["checkpoint"]))
print("@@" + json.dumps([{k: h.get(k) for k in ("epoch", "world_size", "train_loss")} for h in state["fit"]["history"]]))
"""
EPOCHS = 6


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


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the job ended while waiting for {what}: {out[-2000:]}{err[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"timed out waiting for {what}: {out[-2000:]}{err[-4000:]}")
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
    with LocalCluster(num_workers=2, cpus_per_worker=3, object_store_mb=200, include_dashboard=True) as c:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER.replace("EPOCHS", str(EPOCHS)), str(manifest),
                                 str(tmp_path)], env=c.client_env(), cwd=str(REPO), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            # An elastic run starts with the workers it can place at once: wait until it has both.
            _wait(lambda: 2 in _sizes(ckpts), 240, "an epoch on two nodes", proc)
            t0 = time.monotonic()
            c.kill_node("w1")
            # Progress on the one node left, from the last checkpoint.
            _wait(lambda: _sizes(ckpts)[-1:] == [1], 300, "an epoch on one node", proc)
            t1 = time.monotonic()
            c.start_node("w1")
            out, err = proc.communicate(timeout=600)
            print(f"killed→an epoch on one node {t1 - t0:.0f} s, node back→end {time.monotonic() - t1:.0f} s")
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-5000:]
    history = json.loads(next(ln for ln in out.splitlines() if ln.startswith("@@"))[2:])
    # No checkpoint lost: every epoch once, in order, across both restarts.
    assert [h["epoch"] for h in history] == list(range(EPOCHS)), history
    sizes = [h["world_size"] for h in history]
    print("world size per epoch:", sizes)
    # Two workers, then one after the loss, then two again once the node is back.
    runs = [n for i, n in enumerate(sizes) if i == 0 or n != sizes[i - 1]]
    assert runs[-3:] == [2, 1, 2], (sizes, sorted(SEEN))
