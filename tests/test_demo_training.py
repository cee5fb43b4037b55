"""Training the demo: determinism, checkpoints that survive interruption, resume, and DDP.

- the same seed with a fixed thread count trains bit for bit the same; another seed does not;
- Ctrl-C finishes the step under way, saves the training state and exits 130; `--resume`
  from it reaches weights bit-identical to a run that was never stopped;
- a process killed with SIGKILL leaves its last periodic state loadable and resumable;
- truncated, foreign, wrong-version and wrong-shape training states give clear errors;
- on 2 processes (gloo, loopback) the demo follows the 1-process loss trajectory on the
  same global batches, and rank 0 alone writes files.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qkv import cli
from qkv.demo import QUICK, TRAIN_STATE, CheckpointError, load_checkpoint, load_train_state
from qkv.demo.train import (
    LengthBuckets,
    TrainingInterrupted,
    prepare,
    shard_batch,
    train,
)
from qkv.distributed import run_local

REPO = Path(__file__).resolve().parents[1]
train_module = importlib.import_module("qkv.demo.train")  # qkv.demo.train is the function
# QUICK, smaller still: a tenth of a second per run of 10 steps.
TINY = dataclasses.replace(QUICK, train_examples=2_000, eval_examples=40, steps=10,
                           heatmap_examples=1)  # fmt: skip


@pytest.fixture(autouse=True)
def keep_threads_and_processes():
    threads = torch.get_num_threads()
    before = set(multiprocessing.active_children())
    yield
    torch.set_num_threads(threads)
    left = set(multiprocessing.active_children()) - before
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def data():
    train_set, _, src, tgt = prepare(TINY)
    return train_set, src, tgt


def run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"{name} differs"


def interrupt_at(monkeypatch, step: int) -> None:
    """Send this process SIGINT (Ctrl-C) while training step `step` (0-based) runs."""
    real, sent = train_module.lr_at, []

    def lr_at(s, config):
        if s == step and not sent:
            sent.append(s)
            signal.raise_signal(signal.SIGINT)
        return real(s, config)

    monkeypatch.setattr(train_module, "lr_at", lr_at)


# ---- the batch stream and its shards ------------------------------------------------------


def test_batch_stream_restores_its_position_across_epochs(data):
    train_set, src, tgt = data
    buckets = LengthBuckets(train_set, src, tgt)

    # the order the stream promises (and that runs before resumable streams had): per epoch,
    # each bucket shuffled and cut, then all the batches shuffled, all from one generator
    g = torch.Generator().manual_seed(3)
    expected = []
    for _ in range(2):
        epoch = []
        for s, t in buckets.buckets.values():
            order = torch.randperm(s.shape[0], generator=g)
            epoch += [
                (s[order[i : i + 64]], t[order[i : i + 64]]) for i in range(0, len(order), 64)
            ]
        expected += [epoch[j] for j in torch.randperm(len(epoch), generator=g).tolist()]
    stream = buckets.stream(64, torch.Generator().manual_seed(3))
    for want in expected:
        got = next(stream)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    per_epoch = len(expected) // 2
    for cut in (0, 5, per_epoch, per_epoch + 3):  # before, inside, at the end of, after epoch 1
        first = buckets.stream(64, torch.Generator().manual_seed(3))
        for _ in range(cut):
            next(first)
        state = first.state_dict()
        second = buckets.stream(64, torch.Generator().manual_seed(99))  # another seed: replaced
        second.load_state_dict(state)
        for _ in range(per_epoch + 2):  # into the next epoch
            a, b = next(first), next(second)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), cut


@pytest.mark.parametrize("B, W", [(64, 2), (7, 2), (33, 4), (1, 2), (3, 4)])
def test_shards_weighted_by_their_rows_average_to_the_global_batch_mean(B, W):
    s = torch.arange(B * 3).view(B, 3)  # (B, S)
    t = torch.arange(B * 12).view(B, 12)  # (B, T+1)
    shards = [shard_batch(s, t, r, W) for r in range(W)]
    got = [(src, w) for src, _, w in shards if w > 0]
    assert torch.equal(torch.cat([src for src, _ in got]), s)  # every row once, in order
    if B % W == 0:
        assert {src.shape[0] for src, _, _ in shards} == {B // W}
        assert {w for _, _, w in shards} == {1.0}
    # DDP's mean over ranks of w_r * (rank r's mean) is the mean over the global batch
    value = torch.randn(B, dtype=torch.float64)
    per_rank = []
    for src, _, w in shards:  # rows are identified by their first column
        rows = src[:, 0] // 3
        per_rank.append(w * value[rows].mean())
    assert torch.stack(per_rank).mean().item() == pytest.approx(value.mean().item(), rel=1e-12)
    assert torch.equal(shard_batch(s, t, 0, 1)[0], s) and shard_batch(s, t, 0, 1)[2] == 1.0


# ---- determinism --------------------------------------------------------------------------


def test_same_seed_and_thread_count_train_bit_identically(data):
    config = dataclasses.replace(TINY, steps=6, threads=1)
    a = train(config, *data, progress=False)
    b = train(config, *data, progress=False)
    assert_same_weights(a.model, b.model)
    assert a.losses == b.losses
    c = train(dataclasses.replace(config, seed=1), *data, progress=False)
    assert any(
        not torch.equal(x, y)
        for x, y in zip(a.model.parameters(), c.model.parameters(), strict=True)
    )
    assert a.losses != c.losses


# ---- interrupt and resume -----------------------------------------------------------------


def test_ctrl_c_then_resume_is_bit_identical_to_an_uninterrupted_run(data, tmp_path, monkeypatch):
    config = dataclasses.replace(TINY, steps=10, threads=1)
    straight = train(config, *data, progress=False)

    path = tmp_path / TRAIN_STATE
    interrupt_at(monkeypatch, 4)  # Ctrl-C during the 5th step: it finishes, then stops
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, *data, progress=False, state_path=path, checkpoint_every=3)
    monkeypatch.undo()
    e = stopped.value
    assert (e.step, e.steps, e.signum, e.is_main, e.path) == (5, 10, signal.SIGINT, True, path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    state = load_train_state(path)
    assert state.step == 5 and state.demo_config == dataclasses.asdict(config)
    resumed = train(config, *data, progress=False, state_path=path, resume=state)
    assert_same_weights(straight.model, resumed.model)
    assert resumed.losses == straight.losses and resumed.history == straight.history
    assert resumed.examples_seen == straight.examples_seen and resumed.resumed_from == 5
    assert load_train_state(path).step == 10  # the final state is saved too


def test_cli_ctrl_c_exits_130_and_resume_continues(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["demo", "--quick", "--steps", "10", "--out", str(out), "--no-progress",
            "--checkpoint-every", "3"]  # fmt: skip
    interrupt_at(monkeypatch, 6)
    code, _, err = run_cli(argv, capsys)
    monkeypatch.undo()
    assert code == 130
    assert (
        "interrupted after step 7 of 10" in err
        and f"--out {out} --quick --steps 10 --resume" in err
    )
    assert sorted(p.name for p in out.iterdir()) == [TRAIN_STATE]  # nothing else, no temp file
    assert load_train_state(out / TRAIN_STATE).step == 7

    code, _, err = run_cli([*argv[:3], "12", *argv[4:], "--resume"], capsys)
    assert code == 2 and "another config (steps 10 -> 12)" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(["demo", "--out", str(tmp_path / "empty"), "--resume"], capsys)
    assert code == 2 and "no training state at" in err

    code, stdout, err = run_cli([*argv, "--resume"], capsys)
    assert code == 0, err
    assert "resuming from" in stdout and "at step 7 of 10" in stdout
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["resumed_from_step"] == 7 and metrics["steps"] == 10

    train_set, _, src, tgt = prepare(QUICK)
    straight = train(dataclasses.replace(QUICK, steps=10), train_set, src, tgt, progress=False)
    assert_same_weights(straight.model, load_checkpoint(out / "model.pt").model)


def _start_demo(out: Path) -> subprocess.Popen:
    """`python -m qkv demo` long enough to be stopped, saving its state every 5 steps."""
    argv = [sys.executable, "-m", "qkv", "demo", "--quick", "--steps", "100000", "--threads",
            "1", "--checkpoint-every", "5", "--no-progress", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the demo ended early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"no {path.name} after {timeout:g} s")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_a_stopped_process_leaves_a_loadable_state_that_resumes(sig, tmp_path, monkeypatch):
    out = tmp_path / "run"
    proc = _start_demo(out)
    try:
        _wait_for(out / TRAIN_STATE, proc)
        time.sleep(0.3)  # a few more states: the signal lands at any point of the loop
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    state = load_train_state(out / TRAIN_STATE)
    assert 5 <= state.step < 100_000
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert f"interrupted after step {state.step:,} of 100,000" in err
    else:
        assert proc.returncode == -signal.SIGKILL and state.step % 5 == 0
    assert load_checkpoint(out / TRAIN_STATE).model.config.embed_dim == QUICK.embed_dim

    config = dataclasses.replace(QUICK, steps=100_000)
    train_set, _, src, tgt = prepare(config)
    interrupt_at(monkeypatch, state.step)  # resume, then stop after one more step
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, train_set, src, tgt, progress=False, state_path=out / TRAIN_STATE,
              resume=state)  # fmt: skip
    assert stopped.value.step == state.step + 1
    assert load_train_state(out / TRAIN_STATE).step == state.step + 1


# ---- bad training states ------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("state") / TRAIN_STATE
    train(dataclasses.replace(TINY, steps=2, threads=1), *data, progress=False, state_path=path)
    return path


def test_training_state_errors_are_clear(saved_state, tmp_path):
    raw = saved_state.read_bytes()
    payload = torch.load(saved_state, weights_only=True)
    cases = {
        "truncated": (raw[: len(raw) // 2], "truncated or corrupt"),
        "empty": (b"", "is empty"),
        "text": (b"not a checkpoint at all\n", "truncated or corrupt"),
    }
    for name, (content, needle) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=needle):
            load_train_state(tmp_path / name)
    bad = {
        "foreign": ({"weights": torch.zeros(3)}, "not a qkv demo training state"),
        "model": ({**payload, "format": "qkv.demo.dates"}, "is a model checkpoint, not a qkv demo training state"),
        "version": ({**payload, "version": 2}, "version 2; this qkv reads version 1"),
        "shape": ({**payload, "model_config": {**payload["model_config"], "ffn_dim": 7}},
                  "has shape"),
        "optimizer": ({**payload, "optimizer": [1, 2]}, "'optimizer' is list"),
        "step": ({**payload, "step": 10**6}, "step 1000000 of 2 steps"),
    }  # fmt: skip
    for name, (obj, needle) in bad.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=needle):
            load_train_state(tmp_path / name)
    with pytest.raises(CheckpointError, match=r"no training state at .* without --resume"):
        load_train_state(tmp_path / "missing.pt")


def test_resume_refuses_a_state_that_does_not_fit(saved_state, data, tmp_path):
    config = dataclasses.replace(TINY, steps=2, threads=1)
    payload = torch.load(saved_state, weights_only=True)

    moments = payload["optimizer"]["state"]
    first = next(iter(moments))
    wrong = {**moments, first: {**moments[first], "exp_avg": torch.zeros(3, 5)}}
    torch.save({**payload, "optimizer": {**payload["optimizer"], "state": wrong}}, tmp_path / "o")
    with pytest.raises(CheckpointError, match="does not fit this model: exp_avg of parameter"):
        train(config, *data, progress=False, resume=load_train_state(tmp_path / "o"))

    torch.save(
        {**payload, "data": {**payload["data"], "epoch_rng": torch.zeros(3)}}, tmp_path / "d"
    )
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train(config, *data, progress=False, resume=load_train_state(tmp_path / "d"))

    with pytest.raises(CheckpointError, match=r"another config \(seed 0 -> 1\)"):
        train(dataclasses.replace(config, seed=1), *data, progress=False,
              resume=load_train_state(saved_state))  # fmt: skip
    # threads change only the summation order: a resumed run may choose another count
    again = train(dataclasses.replace(config, threads=None), *data, progress=False,
                  resume=load_train_state(saved_state))  # fmt: skip
    assert again.resumed_from == 2


def test_demo_options_reach_run_demo(monkeypatch, capsys):
    import qkv.demo

    seen = []
    monkeypatch.setattr(qkv.demo, "run_demo", lambda out, **kw: seen.append(kw))
    assert cli.main(["demo", "--deterministic"]) == 0
    assert cli.main(["demo", "--deterministic", "--threads", "2", "--checkpoint-every", "0"]) == 0
    assert cli.main(["demo", "--resume", "--checkpoint-every", "7"]) == 0
    assert [kw["config"].threads for kw in seen] == [1, 2, None]
    assert [kw["checkpoint_every"] for kw in seen] == [200, 0, 7]
    assert [kw["resume"] for kw in seen] == [False, False, True]
    code, _, err = run_cli(["demo", "--checkpoint-every", "-1"], capsys)
    assert code == 2 and "--checkpoint-every" in err


# ---- data-parallel ------------------------------------------------------------------------

# seed 11: the first 6 global batches have 1, 14, 60, 8, 33 and 64 rows: a rank left without
# rows, and an odd split. No heatmaps: matplotlib takes seconds (test_cli.py draws them).
DDP_CONFIG = dataclasses.replace(TINY, steps=6, threads=None, seed=11, heatmap_examples=0)


def _ddp_demo(base: str) -> dict:
    """One torchrun-like rank running the demo; rank r is given the directory base/rank{r}."""
    import qkv.demo
    from qkv.demo import checkpoint

    rank = int(os.environ["RANK"])
    writes = []
    for module in (checkpoint, qkv.demo):  # the one writer every file of the demo goes through
        real = module.atomic_write

        def spy(path, write, _real=real):
            writes.append(str(path))
            return _real(path, write)

        module.atomic_write = spy
    lines: list[str] = []
    result = qkv.demo.run_demo(Path(base, f"rank{rank}"), config=DDP_CONFIG, progress=False,
                               echo=lines.append, checkpoint_every=4)  # fmt: skip
    return {"rank": rank, "writes": writes, "lines": lines, "result": result,
            "threads": torch.get_num_threads()}  # fmt: skip


def test_demo_on_two_processes_matches_one_and_only_rank_0_writes(tmp_path):
    train_set, _, src, tgt = prepare(DDP_CONFIG)
    stream = LengthBuckets(train_set, src, tgt).stream(64, torch.Generator().manual_seed(11))
    assert [next(stream)[0].shape[0] for _ in range(6)] == [1, 14, 60, 8, 33, 64]

    r0, r1 = run_local(_ddp_demo, 2, str(tmp_path), init=False, timeout=180)
    assert r1["writes"] == [] and r1["lines"] == []
    assert not (tmp_path / "rank1").exists()
    assert r1["result"]["rank"] == 1 and r1["result"]["world_size"] == 2
    assert r0["result"]["processes"] == 2 and r0["result"]["threads"]["fixed"] == 1
    assert r0["result"]["final_loss"] == r1["result"]["final_loss"]  # the mean over ranks
    names = sorted(Path(p).name for p in r0["writes"])
    assert names == ["metrics.json", "model.pt", TRAIN_STATE, TRAIN_STATE]  # step 4 and 6
    out = tmp_path / "rank0"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.html", "metrics.json", "model.pt", TRAIN_STATE]
    )
    assert sum("qkv demo:" in line for line in r0["lines"]) == 1

    one = train(dataclasses.replace(DDP_CONFIG, threads=1), train_set, src, tgt, progress=False)
    two = load_train_state(out / TRAIN_STATE).progress["losses"]
    assert len(two) == len(one.losses) == DDP_CONFIG.steps
    assert two[0] == pytest.approx(one.losses[0], rel=1e-6)  # the same weights, the same batch
    assert two == pytest.approx(one.losses, rel=1e-4)
    assert r0["result"]["examples_seen"] == one.examples_seen == 180  # no row left out
    # The weights agree too, except the key projections' biases: softmax ignores what they
    # add (the same q.b to every score of a row), so their gradient is rounding noise, which
    # Adam scales up to full-size steps that differ with any change of summation order.
    weights = load_checkpoint(out / "model.pt").model.state_dict()
    for name, want in one.model.state_dict().items():
        if not name.endswith("k_proj.bias"):
            assert torch.allclose(weights[name], want, rtol=1e-3, atol=1e-4), name
