"""Two-level allreduce (livelens.train.hierarchical): equal to the flat ring, fewer bytes between nodes.

The fast tests run four gloo processes on this machine with two made-up nodes; the slow one
runs a Ray Train job on a real LocalCluster (two raylets, two workers each) and counts the
TCP bytes that really crossed between raylets.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from livelens.errors import ConfigError
from livelens.train.hierarchical import ring_inter_node_bytes

WORLD = 4


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def _worker(rank: int, path: str, compression: str, q) -> None:
    from livelens.train.ddp import ByteCounter, register_comm_hook

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        flat = nn.parallel.DistributedDataParallel(_net())
        two = nn.parallel.DistributedDataParallel(_net())
        counter = ByteCounter()
        state = register_comm_hook(two, compression, allreduce="two_level", counter=counter, start_powersgd_iter=2)
        # The same compression on DDP's flat ring, for comparison.
        ref = nn.parallel.DistributedDataParallel(_net())
        register_comm_hook(ref, compression, start_powersgd_iter=2)
        g = torch.Generator().manual_seed(rank)
        rows = []
        for _ in range(4):
            x, y = torch.randn(8, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
            for m in (flat, two, ref):
                m.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
            a, b, c = (torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (flat, two, ref))
            rows.append((float((a - b).abs().max()), float(a.abs().max()),
                         float(nn.functional.cosine_similarity(a, b, dim=0)), b.tolist(),
                         float(nn.functional.cosine_similarity(a, c, dim=0))))
        q.put((rank, rows, counter.bytes_sent, state.groups.leader_ranks))
    finally:
        dist.destroy_process_group()


def _run(compression: str) -> dict[int, tuple]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        # Ranks 0,1 on node "a", 2,3 on node "b": node keys come from the rank via the env below.
        procs = [ctx.Process(target=_keyed, args=(r, d + "/pg", compression, q)) for r in range(WORLD)]
        for p in procs:
            p.start()
        out = {}
        for _ in procs:
            rank, *rest = q.get(timeout=120)
            out[rank] = tuple(rest)
        for p in procs:
            p.join(timeout=30)
    return out


def _keyed(rank: int, path: str, compression: str, q) -> None:
    import livelens.train.hierarchical as h

    h.default_node_key = lambda: f"node-{rank // 2}"  # two ranks per made-up node
    _worker(rank, path, compression, q)


def test_ring_model_counts_links_that_cross_nodes():
    # Four ranks on two nodes: the flat ring crosses twice, 2 × 2·(3/4)·N; the leaders' ring of two, 2 × 2·(1/2)·N.
    assert ring_inter_node_bytes(100, [0, 0, 1, 1]) == pytest.approx(300)
    assert ring_inter_node_bytes(100, [0, 0, 1, 1], [0, 2]) == pytest.approx(200)
    assert ring_inter_node_bytes(100, [0, 0, 0, 0]) == 0
    # Interleaved ranks are the flat ring's worst case: every link crosses.
    assert ring_inter_node_bytes(100, [0, 1, 0, 1]) == pytest.approx(600)


def test_unknown_scheme_or_compression_is_refused():
    from livelens.train.ddp import check_comm_hook
    from livelens.train.hierarchical import register_two_level_hook

    with pytest.raises(ConfigError):
        check_comm_hook("none", allreduce="tree")
    with pytest.raises(ConfigError):
        register_two_level_hook(nn.Linear(2, 2), "topk")
    assert register_two_level_hook(nn.Linear(2, 2)) is None  # one worker: nothing to reduce


@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_two_level_equals_flat_allreduce(compression):
    out = _run(compression)
    tol = 1e-6 if compression == "none" else 2e-3  # fp16 keeps ~3 significant digits
    for rank, (rows, sent, leaders) in out.items():
        assert leaders == [0, 2]
        for diff, scale, *_ in rows:
            assert diff <= tol * max(scale, 1.0), (rank, diff, scale)
        # Only the leaders send between nodes; fp16 halves what they send.
        n_params = sum(p.numel() for p in _net().parameters())
        expect = 4 * n_params * (4 if compression == "none" else 2) if rank in leaders else 0
        assert sent == expect, (rank, sent, expect)
    # Every rank ends with the same averaged gradient.
    assert all(out[r][0][-1][3] == out[0][0][-1][3] for r in out)


def test_two_level_composes_with_powersgd():
    out = _run("powersgd")
    for rows, _, _ in out.values():
        # Two warm-up steps are plain allreduce: exact.
        assert rows[0][0] < 1e-6 and rows[1][0] < 1e-6
        # Then the leaders exchange a rank-2 factorisation: not equal, and about as close to the
        # true mean as PowerSGD over the flat ring is (which sees per-rank, not per-node, gradients).
        for r in rows[2:]:
            assert r[2] > 0.25 and r[2] > 0.7 * r[4], (r[2], r[4])
    assert all(out[r][0][-1][3] == out[0][0][-1][3] for r in out)  # still identical on every rank
    leader_bytes = out[0][1]
    assert 0 < leader_bytes < 4 * 4 * sum(p.numel() for p in _net().parameters())  # compressed after warm-up


@pytest.mark.slow
def test_on_a_multi_node_cluster_same_gradients_fewer_bytes_between_nodes():
    from benchmarks.bench_comm import run_on_cluster

    res = run_on_cluster({"model": "mlp", "image_size": 16, "batch_size": 8, "steps": 3, "compression": "none",
                          "ps": False}, nodes=2, per_node=2, timeout=400)
    assert res["world"] == 4 and res["nodes"] == 2 and res["node_of"] == [0, 0, 1, 1]
    assert res["max_abs_diff"] <= 1e-6 * max(res["grad_scale"], 1.0)
    # Measured from the kernel's socket counters, within 5% of the ring model, and a third fewer.
    flat, two = res["flat_cross_bytes_per_step"], res["two_level_cross_bytes_per_step"]
    assert flat == pytest.approx(res["model_flat_ring_cross_bytes"], rel=0.05)
    assert two == pytest.approx(res["model_two_level_cross_bytes"], rel=0.05)
    assert two < 0.75 * flat
