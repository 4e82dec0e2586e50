"""The parameter server (livelens.train.ps): equal to SGD, convergent, and restored after a kill.

Workers are threads of this process, each with its own model copy and data, talking to real
shard actors in the suite's Ray session (the protocol is the same as under Ray Train).
"""

from __future__ import annotations

import threading
import uuid

import pytest
import torch
from torch import nn

from livelens.errors import ConfigError
from livelens.train.ps import PsClient, PsConfig, PsOptimizer, split_by_size, start_shards, stop_shards

W = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(worker: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + worker)
    w_true = torch.randn(6, 3, generator=torch.Generator().manual_seed(7))
    out = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        out.append((x, (x @ w_true).argmax(1)))
    return out


def _train_ps(cfg: PsConfig, steps: int, run: str, *,
              kill_at: int | None = None) -> tuple[nn.Module, list[float], list[dict]]:
    """W threads train their own copies through the shards; worker 0's model and losses, shard stats."""
    import ray

    shards = start_shards(run, W, cfg)
    models = [_model() for _ in range(W)]
    losses: list[list[float]] = [[] for _ in range(W)]
    errors: list[BaseException] = []
    killed = threading.Event()

    def work(w: int) -> None:
        try:
            m = models[w]
            client = PsClient(shards, dict(m.named_parameters()), w)
            opt = PsOptimizer(m.parameters(), client, lr=0.2)
            for i, (x, y) in enumerate(_data(w, steps)):
                if kill_at is not None and w == 0 and i == kill_at:
                    ray.kill(shards[0], no_restart=False)  # Ray restarts it from its checkpoint
                    killed.set()
                opt.zero_grad()
                loss = nn.functional.cross_entropy(m(x), y)
                loss.backward()
                opt.step()
                losses[w].append(loss.item())
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(W)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads), "a worker hung"
        if kill_at is not None:
            assert killed.is_set()
        return models[0], losses[0], ray.get([s.stats.remote() for s in shards])
    finally:
        stop_shards(run, cfg.num_shards)


def _train_local_sgd(steps: int, lr: float = 0.2) -> nn.Module:
    """The reference: one model, SGD on the mean of the workers' losses (synchronous data parallel)."""
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    data = [_data(w, steps) for w in range(W)]
    for i in range(steps):
        opt.zero_grad()
        loss = sum(nn.functional.cross_entropy(m(data[w][i][0]), data[w][i][1]) for w in range(W)) / W
        loss.backward()
        opt.step()
    return m


def _assert_same(a: nn.Module, b: nn.Module, atol: float = 1e-5) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=atol), (name, (pa - pb).abs().max())


def test_split_by_size_balances_and_covers():
    shapes = {"a": (100,), "b": (60,), "c": (50,), "d": (5,)}
    parts = split_by_size(shapes, 2)
    assert sorted(n for part in parts for n in part) == sorted(shapes)
    sizes = [sum(shapes[n][0] for n in p) for p in parts]
    assert max(sizes) - min(sizes) <= 15


def test_config_rejects_bad_values():
    for bad in (PsConfig(mode="gossip"), PsConfig(optimizer="lamb"), PsConfig(num_shards=0),
                PsConfig(mode="sync", staleness=2), PsConfig(mode="async", staleness=-1)):
        with pytest.raises(ConfigError):
            bad.validate()


def test_sync_equals_synchronous_sgd(ray_session):
    steps = 6
    ps_model, _, _ = _train_ps(PsConfig(mode="sync", num_shards=2), steps, f"t-{uuid.uuid4().hex[:8]}")
    _assert_same(ps_model, _train_local_sgd(steps))


def test_async_with_staleness_zero_equals_sync(ray_session):
    steps = 6
    ps_model, _, _ = _train_ps(PsConfig(mode="async", staleness=0, num_shards=3), steps, f"t-{uuid.uuid4().hex[:8]}")
    _assert_same(ps_model, _train_local_sgd(steps))


def test_async_with_staleness_converges(ray_session):
    _, losses, _ = _train_ps(PsConfig(mode="async", staleness=2, num_shards=2, momentum=0.5), 40,
                          f"t-{uuid.uuid4().hex[:8]}")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_shard_is_restored_from_its_checkpoint(ray_session, tmp_path, mode):
    import ray

    steps, kill_at = 12, 5
    run = f"t-{uuid.uuid4().hex[:8]}"
    cfg = PsConfig(mode=mode, num_shards=2, checkpoint_dir=str(tmp_path / "ps"))
    # Keep the shards after training to read their stats: train, then inspect, then stop.
    model, losses, stats = _train_ps(cfg, steps, run, kill_at=kill_at)
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    assert stats[0]["restored_from"] is not None and stats[0]["restored_from"] >= kill_at, stats[0]
    assert stats[1]["restored_from"] is None
    # Nothing was lost: a gradient in flight during the kill was pushed again, so both shards
    # applied every one of the W × steps gradients, as synchronous SGD does.
    updates = steps if mode == "sync" else steps * W  # async applies each worker's gradient alone
    assert [st["version"] for st in stats] == [updates, updates], stats
    _assert_same(model, _train_local_sgd(steps))
    assert (tmp_path / "ps" / "shard-0.pt").exists() and (tmp_path / "ps" / "shard-1.pt").exists()
    saved = torch.load(tmp_path / "ps" / "shard-0.pt", weights_only=True)
    other = torch.load(tmp_path / "ps" / "shard-1.pt", weights_only=True)
    assert saved["version"] == other["version"] == updates
    # The final tensors in the checkpoint are the ones the worker pulled last.
    own = dict(model.named_parameters())
    for k, v in {**saved["params"], **other["params"]}.items():
        assert torch.allclose(v, own[k].detach()), k
    # A shard started again from the same folder resumes from the checkpoint.
    shards = start_shards(run + "-again", W, cfg)
    try:
        stats = ray.get(shards[0].stats.remote())
        assert stats["restored_from"] == saved["version"]
    finally:
        stop_shards(run + "-again", cfg.num_shards)
