"""qkv.distributed.ddp: a toy model trained under DDP on 2 processes equals full-batch training.

The two ranks start from different seeds (DDP must broadcast rank 0's weights), each takes
its half of every batch from `shard_indices`, and DDP averages the gradients: so the
gradients must be identical across ranks and the weights after a few steps equal those of
one process trained on the whole batch. Only rank 0 writes its metrics file.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from qkv.distributed import ddp, run_local

N, STEPS = 8, 3


def _toy() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    ).double()


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 3, generator=g, dtype=torch.float64), torch.randn(
        N, 2, generator=g, dtype=torch.float64
    )


def _train(out_dir: str) -> dict:
    """One rank's run, as a demo's training loop would do it under torchrun."""
    info = ddp.setup_from_env(timeout=datetime.timedelta(seconds=30))
    torch.manual_seed(100 + info.rank)  # different on purpose: DDP syncs rank 0's weights
    model = ddp.wrap(_toy())
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads, losses, shards = [], [], []
    for step in range(STEPS):
        idx = ddp.shard_indices(N, shuffle=True, seed=0, epoch=step)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).tolist())
        opt.step()
        losses.append(ddp.all_reduce_mean(loss.item()))
        shards.append(idx)
    if info.is_main:
        Path(out_dir, "metrics.json").write_text(json.dumps({"rank": info.rank, "loss": losses}))
    ddp.barrier()
    params = torch.cat([p.detach().flatten() for p in ddp.unwrap(model).parameters()])
    ddp.cleanup()
    return dict(
        info=(info.rank, info.world_size, info.is_main),
        grads=grads,
        losses=losses,
        shards=shards,
        params=params.tolist(),
    )


@pytest.fixture(autouse=True)
def no_leftover_processes():
    before = set(multiprocessing.active_children())
    yield
    left = set(multiprocessing.active_children()) - before
    assert not left, f"processes left behind: {left}"


def test_ddp_training_matches_full_batch_on_two_processes(tmp_path):
    r0, r1 = run_local(_train, 2, str(tmp_path), init=False, timeout=90)
    assert r0["info"] == (0, 2, True) and r1["info"] == (1, 2, False)
    assert r0["grads"] == r1["grads"], "DDP gradients differ across ranks"
    assert r0["params"] == r1["params"]
    assert r0["losses"] == r1["losses"]
    for s0, s1 in zip(r0["shards"], r1["shards"], strict=True):
        assert sorted(s0 + s1) == list(range(N)), "the shards of a step must cover the batch"

    # one process on the whole batch, from rank 0's initial weights
    torch.manual_seed(100)
    model = _toy()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        assert abs(loss.item() - r0["losses"][step]) < 1e-12
        opt.zero_grad()
        loss.backward()
        opt.step()
    want = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(torch.tensor(r0["params"], dtype=torch.float64), want, atol=1e-12)

    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]
    assert json.loads((tmp_path / "metrics.json").read_text())["rank"] == 0


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    info = ddp.setup_from_env()
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    model = _toy()
    assert ddp.wrap(model) is model and ddp.unwrap(model) is model
    assert ddp.all_reduce_mean(2.5) == 2.5
    assert ddp.broadcast_object({"a": 1}) == {"a": 1}
    assert ddp.shard_indices(5) == [0, 1, 2, 3, 4]
    ddp.barrier()
    ddp.cleanup()


def test_world_size_without_master_address_says_to_use_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        ddp.setup_from_env()


@pytest.mark.parametrize("n", [0, 1, 7, 8, 10])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_indices_give_every_rank_the_same_count(n, world):
    shards = [ddp.shard_indices(n, shuffle=True, rank=r, world_size=world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1, "unequal shards make DDP ranks wait for ever"
    assert set().union(*map(set, shards)) == set(range(n))
    if n % world == 0:
        assert sorted(i for s in shards for i in s) == list(range(n))
    with pytest.raises(ValueError, match="rank < world_size"):
        ddp.shard_indices(n, rank=world, world_size=world)
