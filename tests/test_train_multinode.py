"""The 2-worker DDP safety run on a real multi-node cluster (head + 2 raylets on loopback).

The suite's own Ray session holds this process, so the job runs as a driver subprocess
connected to the LocalCluster; STRICT_SPREAD puts one Train worker on each raylet.
"""

from __future__ import annotations

import json

import pytest

DRIVER = """
import json, sys
from livelens.train import LoopConfig
from train_jobs.safety import SafetyTrainConfig, run
manifest, tmp = sys.argv[1], sys.argv[2]
cfg = SafetyTrainConfig(manifest=manifest, pretrained=False, freeze_backbone=False, evidence_crop=False, image_size=64,
                        num_workers=2,
                        cpus_per_worker=1.0, placement_strategy="STRICT_SPREAD", storage_path=tmp + "/train",
                        run_name="mn", register=False,
                        loop=LoopConfig(epochs=2, lr=3e-3, batch_size=8, precision="bf16", comm_hook="powersgd"))
s = run(cfg)
print("@@" + json.dumps({"nodes": s["val"]["worker_nodes"], "world": s["val"]["world_size"],
                         "loss": s["val"]["train_loss"]}))
"""

NODES = """
import json, ray
ray.init()
print("@@" + json.dumps({n["NodeID"]: n["NodeName"] for n in ray.nodes() if n["Alive"]}))
"""


def _payload(proc) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("@@"))
    return json.loads(line[2:])


@pytest.mark.slow
def test_ddp_workers_on_different_raylets(tmp_path):
    from cluster.local import LocalCluster
    from livelens.data import write_manifest
    from livelens.data.frames import FrameConfig, frames_card, generate_frames

    cfg = FrameConfig()
    manifest = write_manifest(generate_frames(0, 24, seed=7, cfg=cfg), tmp_path / "frames", frames_card(7, 24, cfg),
                              contact_sheet=False)
    with LocalCluster(num_workers=2, cpus_per_worker=2, object_store_mb=200, include_dashboard=False,
                      ) as c:  # default root: a short /tmp path (AF_UNIX socket paths are capped at 107 bytes)
        out = _payload(c.run_driver(DRIVER, timeout=400, args=[str(manifest), str(tmp_path)]))
        names = _payload(c.run_driver(NODES, timeout=60))
    assert out["world"] == 2
    assert len(set(out["nodes"])) == 2, out  # one worker per raylet
    assert {names[n] for n in out["nodes"]} == {"w0", "w1"}
