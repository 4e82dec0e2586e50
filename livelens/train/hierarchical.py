"""Two-level allreduce: reduce within a node, allreduce across node leaders, broadcast within a node.

The seed's training platform built its two-level communication on NCCL (基于nccl库实现两级通信).
On a cluster whose GPUs inside a node share NVLink or PCIe while nodes share a slower network, a
flat ring sends each gradient byte across node boundaries once per node *per ring hop that
crosses a node*. The two-level scheme lets only one rank per node (its leader) talk to other
nodes, so the slow links carry one node-sum per node instead of every rank's share:

1. ``reduce`` the bucket to the node's leader over the intra-node group;
2. ``all_reduce`` among the leaders over the leaders' group (optionally compressed: fp16 or
   PowerSGD, so compression is spent where the link is slow);
3. ``broadcast`` the result from the leader to the other ranks of its node.

It is a DDP comm hook (:func:`register_two_level_hook`), built from ``torch.distributed`` process
groups, so it works with gloo (CPU) and NCCL (GPU) alike. Nodes are told apart by their Ray node
id when running under Ray (every raylet of a one-machine test cluster shares 127.0.0.1, so the
IP that Ray Train's ``node_rank`` uses would put all ranks on one "node"), else by host name.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

from livelens.errors import ConfigError

COMPRESSIONS = ("none", "fp16", "powersgd")


def default_node_key() -> str:
    """This process's node: the Ray node id inside a Ray worker, else the host name."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # Ray missing or not connected: fall back to the host
        pass
    return socket.gethostname()


@dataclass
class NodeGroups:
    """The process groups of a two-level allreduce, as seen from one rank.

    Attributes:
        world: Ranks in the default group.
        node_of: Node index of every rank (nodes numbered by their lowest rank).
        local: This rank's intra-node group (None when it is alone on its node).
        local_ranks: Global ranks of this rank's node; the first is the leader.
        leaders: The group of node leaders (None on non-leaders or with a single node).
        leader_ranks: Global rank of each node's leader.
    """

    world: int
    node_of: list[int]
    local: Any
    local_ranks: list[int]
    leaders: Any
    leader_ranks: list[int]

    @property
    def leader(self) -> int:
        """Global rank of this rank's node leader."""
        return self.local_ranks[0]

    @property
    def is_leader(self) -> bool:
        return dist.get_rank() == self.leader

    @property
    def num_nodes(self) -> int:
        return len(self.leader_ranks)


def node_groups(node_key: str | None = None) -> NodeGroups:
    """Create the intra-node and leader process groups (a collective: every rank must call it).

    Args:
        node_key: This rank's node (default :func:`default_node_key`). Ranks with equal keys
            share a node.

    Returns:
        The groups as seen from this rank.
    """
    if not dist.is_initialized():
        raise ConfigError("two-level allreduce needs an initialised torch.distributed process group")
    world = dist.get_world_size()
    keys: list[Any] = [None] * world
    dist.all_gather_object(keys, node_key or default_node_key())
    order: list[str] = []
    for k in keys:
        if k not in order:
            order.append(k)
    node_of = [order.index(k) for k in keys]
    members = [[r for r in range(world) if node_of[r] == n] for n in range(len(order))]
    leader_ranks = [m[0] for m in members]
    me = dist.get_rank()
    local = leaders = None
    # new_group is collective over the default group: every rank creates every group, in one order.
    for m in members:
        g = dist.new_group(m) if len(m) > 1 else None
        if me in m:
            local = g
    lg = dist.new_group(leader_ranks) if len(leader_ranks) > 1 else None
    if me in leader_ranks:
        leaders = lg
    return NodeGroups(world, node_of, local, members[node_of[me]], leaders, leader_ranks)


@dataclass
class TwoLevelState:
    """State of the two-level hook.

    Attributes:
        groups: The process groups.
        compression: ``none``, ``fp16`` (every stage in half precision) or ``powersgd`` (the
            leaders' stage is PowerSGD; the intra-node stages stay fp32).
        powersgd: PowerSGD's state over the leaders' group (leaders only).
        inter_node_elems: Elements handed to the leaders' stage, summed over buckets (what
            crosses node boundaries, before the ring's 2(n-1)/n factor).
        counter: When given, counts the bytes this rank hands to the leaders' stage (a
            ``livelens.train.ddp.ByteCounter``; zero on non-leaders, which talk only inside
            their node).
    """

    groups: NodeGroups
    compression: str = "none"
    powersgd: Any = None
    inter_node_elems: int = 0
    counter: Any = None


def two_level_hook(state, bucket):  # unannotated: DDP compares annotations to real types, not strings
    """The DDP comm hook: average the bucket (a ``dist.GradBucket``) over all ranks in three stages.

    The stages run one after another (each needs the last one's result), so the hook blocks and
    hands DDP a completed future. The intra-node stages are short on NVLink; on CPU gloo the
    whole hook is bound by the leaders' stage.
    """
    g = state.groups
    buf = bucket.buffer()
    half = state.compression == "fp16"
    t = buf.to(torch.float16) if half else buf
    if g.local is not None:
        dist.reduce(t, dst=g.leader, group=g.local)  # node sum at the leader
    if g.leaders is not None and g.is_leader:
        state.inter_node_elems += t.numel()
        sent = t.numel() * t.element_size()
        if state.compression == "powersgd":
            # PowerSGD averages over the leaders; the leader holds its node's sum.
            before = state.powersgd.total_numel_after_compression
            t = powerSGD_hook.powerSGD_hook(state.powersgd, bucket).wait()
            t.mul_(g.num_nodes)
            if state.powersgd.total_numel_after_compression > before:  # past warm-up: P and Q only
                sent = (state.powersgd.total_numel_after_compression - before) * t.element_size()
        else:
            dist.all_reduce(t, group=g.leaders)
        if state.counter is not None:
            state.counter.bytes_sent += sent
            state.counter.buckets += 1
    if g.local is not None:
        dist.broadcast(t, src=g.leader, group=g.local)
    if half:
        buf.copy_(t.float() / g.world)
    else:
        if t.data_ptr() != buf.data_ptr():
            buf.copy_(t)
        buf.div_(g.world)
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(buf)
    return fut


def register_two_level_hook(model: torch.nn.Module, compression: str = "none", *, powersgd_rank: int = 2,
                            start_powersgd_iter: int = 2, node_key: str | None = None,
                            counter: Any = None) -> TwoLevelState | None:
    """Install the two-level allreduce on a DDP model; a no-op for a plain module (one worker).

    Args:
        model: The (possibly DDP-wrapped) model.
        compression: ``none``, ``fp16`` or ``powersgd`` (see :class:`TwoLevelState`).
        powersgd_rank: PowerSGD's matrix approximation rank.
        start_powersgd_iter: Plain allreduce steps before PowerSGD compresses.
        node_key: This rank's node (default: Ray node id, else host name).
        counter: A ``ByteCounter`` for the bytes this rank sends between nodes.

    Returns:
        The hook state (its ``inter_node_elems`` counts what the leaders' stage carried), or None.

    Raises:
        ConfigError: Unknown compression.
    """
    from torch.nn.parallel import DistributedDataParallel

    if compression not in COMPRESSIONS:
        raise ConfigError(f"unknown two-level compression {compression!r}; choose one of {COMPRESSIONS}")
    if not isinstance(model, DistributedDataParallel):
        return None
    groups = node_groups(node_key)
    state = TwoLevelState(groups, compression, counter=counter)
    if compression == "powersgd" and groups.leaders is not None and groups.is_leader:
        state.powersgd = powerSGD_hook.PowerSGDState(process_group=groups.leaders,
                                                     matrix_approximation_rank=powersgd_rank,
                                                     start_powerSGD_iter=max(2, start_powersgd_iter))
    model.register_comm_hook(state, two_level_hook)
    return state


def ring_inter_node_bytes(nbytes: float, node_of: list[int], ranks: list[int] | None = None) -> float:
    """Bytes a ring allreduce of ``nbytes`` sends across node boundaries (the textbook model).

    A ring over ``n`` ranks sends ``2(n-1)/n × nbytes`` on each of its ``n`` links; a link
    crosses nodes when its two ranks do. Used as the model beside the measured socket bytes.

    Args:
        nbytes: Size of the reduced buffer.
        node_of: Node index of every global rank.
        ranks: The ring's ranks in ring order (default: every rank, in rank order, as gloo and
            NCCL order a flat ring).
    """
    ring = list(range(len(node_of))) if ranks is None else list(ranks)
    n = len(ring)
    if n < 2:
        return 0.0
    crossing = sum(node_of[ring[i]] != node_of[ring[(i + 1) % n]] for i in range(n))
    return crossing * 2 * (n - 1) / n * nbytes


def tcp_bytes_sent(pid: int | None = None) -> dict[tuple[str, str], int]:
    """Bytes sent so far on each established TCP socket of process ``pid`` (default: this one).

    Read from ``ss -tinp`` (iproute2), which reports the kernel's per-socket ``bytes_sent``. On a
    one-machine test cluster every node talks over loopback, so interface counters cannot tell
    nodes apart; sockets can, once each end's owner is known (see :func:`cross_node_bytes`).

    Returns:
        ``{(local address, peer address): bytes_sent}``; empty when ``ss`` is missing.
    """
    import os
    import re
    import shutil
    import subprocess

    if shutil.which("ss") is None:
        return {}
    pid = os.getpid() if pid is None else pid
    out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True, text=True,
                         timeout=30).stdout
    res: dict[tuple[str, str], int] = {}
    key: tuple[str, str] | None = None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            parts = line.split()
            key = None
            if f"pid={pid}," in line and len(parts) >= 4:
                # With a state filter ss drops the state column: recv-q, send-q, local, peer, users.
                key = (parts[2], parts[3])
                res[key] = 0
        elif key is not None:
            m = re.search(r"\bbytes_sent:(\d+)", line)
            res[key] = int(m.group(1)) if m else 0
    return res


def cross_node_bytes(before: dict[tuple[str, str], int], after: dict[tuple[str, str], int], my_node: int,
                     node_of_addr: dict[str, int]) -> int:
    """Bytes this process sent, between two :func:`tcp_bytes_sent` snapshots, to another node.

    Args:
        before: Snapshot at the start.
        after: Snapshot at the end.
        my_node: This process's node index.
        node_of_addr: Node index of every local socket address of every peer process of the job
            (gathered from all ranks' snapshots); sockets to anything else (Ray's own services)
            are not counted.
    """
    total = 0
    for (local, peer), sent in after.items():
        node = node_of_addr.get(peer)
        if node is not None and node != my_node:
            total += sent - before.get((local, peer), 0)
    return total
