"""Ring attention on 1, 2 and 4 local processes equals single-process `qkv.attention`.

Each world size is one spawned group (starting a process costs seconds here): every worker
runs all the cases, compares its shard of the output, log-sum-exp and gradients with the
same call of `qkv.attention` on the whole sequence, and sends back only the errors.
float64 runs the math engine and must agree to 1e-10; float32 and bfloat16 run torch's
fused kernel and may be FACTOR× as far from the float64 truth as `qkv.attention` in the
same dtype, plus ATOL (the table in conftest.py).
"""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch
import torch.distributed as dist

import qkv
import qkv.distributed as qd
from conftest import ATOL, FACTOR, max_err

T = 24  # global length: 4 ranks × 6, or 8 zigzag chunks of 3
WORLDS = (1, 2, 4)


def _case(name, dtype="float64", B=1, Hq=2, Hkv=2, T=T, D=7, Dv=7, **options):
    return dict(name=name, dtype=dtype, B=B, Hq=Hq, Hkv=Hkv, T=T, D=D, Dv=Dv, **options)


CASES = [
    _case(f"{shape}-{layout}-{'causal' if causal else 'full'}", layout=layout, causal=causal, **kw)
    for layout in qd.LAYOUTS
    for causal in (False, True)
    for shape, kw in [
        ("mha", {}),
        ("mqa-dv", dict(B=2, Hq=4, Hkv=1, Dv=5)),  # one kv head for 4 query heads, Dv != D
        ("gqa-padding", dict(B=4, Hq=4, Hkv=2, padding=[19, 0, 7, T])),  # batch 1 sees nothing
    ]
] + [
    _case("no-overlap-zigzag-causal", layout="zigzag", causal=True, overlap=False, B=2, Hq=4),
    _case("f32-contiguous-causal", "float32", B=2, Hq=4, T=48, D=16, Dv=16, causal=True),
    _case(
        "f32-zigzag-causal-padding",
        "float32",
        B=2,
        Hq=4,
        T=48,
        D=16,
        Dv=16,
        causal=True,
        layout="zigzag",
        padding=[40, 13],
    ),
    _case("bf16-zigzag-causal", "bfloat16", B=2, Hq=4, T=48, D=16, Dv=16, causal=True),
] + [  # masks over global positions (see _global_mask)
    _case(f"{name}-{layout}", layout=layout, mask=name, **kw)
    for layout in qd.LAYOUTS
    for name, kw in [
        ("window", {}),  # window(5): reaches one shard back at W = 4
        ("narrow-window", dict(B=2)),  # window(2): one hop on a contiguous ring
        ("documents", dict(B=2, causal=True)),  # packed causal documents
        ("window&padding", dict(B=4, Hq=4, Hkv=2, padding=[19, 0, 7, T])),
        ("documents&padding", dict(B=2, Hq=4, Hkv=1, causal=True, padding=[13, 22])),
    ]
] + [
    _case("f32-window-gqa", "float32", B=2, Hq=4, Hkv=2, T=96, D=16, Dv=16, mask="window"),
    _case("f32-documents&padding-zigzag", "float32", B=2, Hq=4, Hkv=1, T=96, D=16, Dv=16,
          causal=True, padding=[90, 41], layout="zigzag", mask="documents"),
]  # fmt: skip


def _global_mask(name: str | None, B: int, T: int):
    """The mask= of a case, over global positions (the same on every rank)."""
    if name is None:
        return None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4, (B, T), generator=g).sort(-1).values  # packed documents
    return {
        "window": qkv.masks.window(5),
        "narrow-window": qkv.masks.window(2),
        "documents": qkv.masks.document(ids),
        "window&padding": qkv.masks.window(7),
        "documents&padding": qkv.masks.document(ids),
    }[name.split("&padding")[0] if name.endswith("&padding") else name]


def expected_hops(c: dict, W: int) -> int:
    """The farthest hop (r - src) mod W with an allowed pair, from the dense global mask."""
    B, T, layout = c["B"], c["T"], c.get("layout", "contiguous")
    allowed = torch.ones(B, T, T, dtype=torch.bool)
    mask = _global_mask(c.get("mask"), B, T)
    if mask is not None:
        allowed &= mask.to_dense(B, 1, T, T)[:, 0]
    if c.get("causal"):
        allowed &= torch.ones(T, T, dtype=torch.bool).tril()
    if c.get("padding") is not None:
        allowed &= torch.arange(T)[None, None, :] < torch.tensor(c["padding"])[:, None, None]
    pos = [qd.positions(r, W, T, layout=layout) for r in range(W)]
    return max(
        (
            (r - src) % W
            for r in range(W)
            for src in range(W)
            if allowed[:, pos[r]][:, :, pos[src]].any()
        ),
        default=0,
    )


def _run_case(c: dict, rank: int, W: int) -> dict:
    """This rank's errors for one case: ring vs the float64 truth, and the baseline's."""
    dtype = getattr(torch, c["dtype"])
    layout, causal, padding = (
        c.get("layout", "contiguous"),
        c.get("causal", False),
        c.get("padding"),
    )
    g = torch.Generator().manual_seed(0)
    full = [
        torch.randn(c["B"], c["Hq"], c["T"], c["D"], generator=g, dtype=torch.float64),
        torch.randn(c["B"], c["Hkv"], c["T"], c["D"], generator=g, dtype=torch.float64),
        torch.randn(c["B"], c["Hkv"], c["T"], c["Dv"], generator=g, dtype=torch.float64),
    ]
    dout = torch.randn(c["B"], c["Hq"], c["T"], c["Dv"], generator=g, dtype=torch.float64)
    full = [t.to(dtype).double() for t in full]  # the inputs as the tested dtype sees them
    dout = dout.to(dtype)
    user_mask = _global_mask(c.get("mask"), c["B"], c["T"])
    pad = qkv.masks.padding(padding) if padding is not None else None
    mask = qkv.masks.combine(user_mask, pad)

    def single(dt):
        q, k, v = (t.to(dt).requires_grad_() for t in full)
        res = qkv.attention(q, k, v, causal=causal, mask=mask, return_lse=True)
        grads = torch.autograd.grad(res.output, (q, k, v), dout.to(dt))
        return [res.output, res.lse, *grads]

    def shard(x):  # the sequence is dim -2 of (B, H, T, D), dim -1 of the lse (B, H, T)
        return qd.shard(x.detach(), rank, W, layout=layout, dim=-1 if x.dim() == 3 else -2)

    truth = [shard(x) for x in single(torch.float64)]
    base = [shard(x) for x in single(dtype)] if dtype != torch.float64 else None

    q, k, v = (shard(t).to(dtype).clone().requires_grad_() for t in full)
    stats = qd.RingStats()
    res = qd.ring_attention(
        q,
        k,
        v,
        mask=user_mask,
        causal=causal,
        padding=padding,
        layout=layout,
        return_lse=True,
        overlap=c.get("overlap", True),
        stats=stats,
    )
    grads = torch.autograd.grad(res.output, (q, k, v), shard(dout))
    got = [res.output, res.lse, *grads]
    names = ("out", "lse", "dq", "dk", "dv")
    S = c["T"] // W
    kv_values = c["B"] * S * c["Hkv"] * (c["D"] + c["Dv"])
    stat_size = 8 if dtype == torch.float64 else 4
    hops = expected_hops(c, W)
    return dict(
        err={n: max_err(a, t) for n, a, t in zip(names, got, truth, strict=True)},
        base={n: max_err(b, t) for n, b, t in zip(names, base, truth, strict=True)}
        if base
        else None,
        nan=any(bool(torch.isnan(x).any()) for x in got),
        dtypes=[str(x.dtype) for x in (res.output, *grads)],
        bytes_sent=stats.bytes_sent,
        bytes_received=stats.bytes_received,
        # forward h·|kv|, backward h·|kv| + (h+1)·|dkv| (dkv in the stat dtype), with
        # h = W-1 hops unless the mask lets the ring stop sooner
        bytes_expected=(
            0
            if hops == 0
            else 2 * hops * kv_values * torch.finfo(dtype).bits // 8
            + (hops + 1) * kv_values * stat_size
        ),
        hops=hops,
        steps=(stats.steps_computed, stats.steps_skipped),
    )


def _errors_worker() -> dict:
    """The error messages each rank of a pair gets for bad shards, and a valid call after."""
    rank = dist.get_rank()
    x = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    caught = {}

    def attempt(name, *args, **kwargs):
        try:
            qd.ring_attention(*args, **kwargs)
            caught[name] = None
        except (TypeError, ValueError) as e:
            caught[name] = (type(e).__name__, str(e))

    longer = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    mine = x if rank == 0 else longer
    attempt("lengths", mine, mine, mine)
    kv = x if rank == 0 else x[:, :1]
    attempt("heads", x, kv, kv)
    attempt("rank1-3d", x if rank == 0 else x[0], x, x)
    odd = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    attempt("zigzag-odd", odd, odd, odd, layout="zigzag", causal=True)
    attempt("padding-too-long", x, x, x, padding=[9])
    attempt("causal-differs", x, x, x, causal=rank == 1)
    attempt("dtype", x, x.float(), x)
    attempt("layout", x, x, x, layout="striped")
    attempt("mask-type", x, x, x, mask=[True, False])
    local_ids = torch.zeros(1, 4, dtype=torch.long)  # a shard's ids, not the global ones
    attempt("mask-local", x, x, x, mask=qkv.masks.document(local_ids))
    # the group is still in step after all these: a valid call works
    attempt("valid", x, x, x, causal=True)
    return caught


def _ring_worker(with_errors: bool) -> dict:
    rank, W = dist.get_rank(), dist.get_world_size()
    # count the tile jobs that ran on the native kernel (this spawned process only)
    from qkv.kernels import native, stacked

    original, ran = stacked._native_forward, []
    stacked._native_forward = lambda *a: ran.append(1) or original(*a)
    results = {"cases": {}}
    for c in CASES:
        ran.clear()
        results["cases"][c["name"]] = {**_run_case(c, rank, W), "native_jobs": len(ran)}
    stacked._native_forward = original
    results["native"] = native.unavailable(build=False)
    if with_errors:
        results["errors"] = _errors_worker()
    return results


@pytest.fixture(autouse=True)
def no_leftover_processes():
    before = set(multiprocessing.active_children())
    yield
    left = set(multiprocessing.active_children()) - before
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def ring_group():
    """ring_group(W): every rank's results of one spawned W-process group (run once per W)."""
    cache: dict[int, list] = {}

    def run(W: int) -> list:
        if W not in cache:
            cache[W] = qd.run_local(_ring_worker, W, W == 2, timeout=90)
            assert not multiprocessing.active_children()
        return cache[W]

    return run


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("W", WORLDS, ids=lambda w: f"W{w}")
def test_ring_matches_single_process_attention(ring_group, W, case):
    per_rank = ring_group(W)
    dtype = getattr(torch, case["dtype"])
    for rank, res in enumerate(per_rank):
        r = res["cases"][case["name"]]
        assert not r["nan"], f"rank {rank}: NaN"
        assert r["dtypes"] == [str(dtype)] * 4, f"rank {rank}: dtypes {r['dtypes']}"
        for what, err in r["err"].items():
            base = r["base"][what] if r["base"] else 0.0
            bound = FACTOR * base + ATOL[dtype]
            assert err <= bound, (
                f"W={W} rank {rank} {what}: error {err:.3g} > {bound:.3g} (baseline {base:.3g})"
            )
        assert r["bytes_sent"] == r["bytes_expected"], f"rank {rank}: bytes sent"
        assert r["bytes_received"] == r["bytes_expected"], f"rank {rank}: bytes received"
        if case.get("mask") is None and case.get("padding") is None:
            assert r["hops"] == W - 1  # causal and full attention: every hop


@pytest.mark.parametrize("W", [1, 2], ids=lambda w: f"W{w}")
def test_float32_ring_tiles_run_on_the_native_kernel(ring_group, W):
    """The ring's steps run on the tile engine, so float32 tiles of at least 32 queries
    (shards of 96 / W positions here) run on the native kernel where it is built."""
    for rank, res in enumerate(ring_group(W)):
        if res["native"] is not None:
            pytest.skip(f"native kernel unavailable: {res['native']}")
        assert res["cases"]["f32-window-gqa"]["native_jobs"] > 0, f"rank {rank}"
        assert res["cases"]["window-contiguous"]["native_jobs"] == 0  # float64: torch's


@pytest.mark.parametrize("W", [2, 4], ids=lambda w: f"W{w}")
def test_a_narrow_window_ring_stops_after_one_hop(ring_group, W):
    """window(2) on a contiguous ring: each rank needs its own block and the last keys
    of the previous rank's, so a ring of any size runs one hop (its other W - 2 steps are
    neither computed nor sent), and rank 0, which needs no other block, skips its step."""
    for rank, res in enumerate(ring_group(W)):
        r = res["cases"]["narrow-window-contiguous"]
        assert r["hops"] == 1
        computed, skipped = r["steps"]  # forward and backward: own block and r-1's
        assert computed == (2 if rank == 0 else 4) and skipped == (2 if rank == 0 else 0)
        kv = 2 * (T // W) * 2 * (7 + 7) * 8  # B=2, S, Hkv=2, D+Dv=14, float64
        assert r["bytes_received"] == 2 * kv + 2 * kv  # k, v twice; dk, dv one hop + home


def test_error_messages_across_a_pair(ring_group):
    r0, r1 = (res["errors"] for res in ring_group(2))
    for caught in (r0, r1):
        kind, msg = caught["lengths"]
        assert kind == "ValueError" and "all slices equally long" in msg
        assert "differing across ranks: S (rank 0: 4, rank 1: 6)" in msg
        assert "rank 0: q (B=1, Hq=2, S=4, D=8)" in msg and "rank 1: q (B=1, Hq=2, S=6" in msg
        assert "Hkv (rank 0: 2, rank 1: 1)" in caught["heads"][1]
        assert "2·world_size" in caught["zigzag-odd"][1] and "S=3" in caught["zigzag-odd"][1]
        assert "padding" in caught["padding-too-long"][1] and "T=8" in caught["padding-too-long"][1]
        assert "causal (rank 0: False, rank 1: True)" in caught["causal-differs"][1]
        assert caught["dtype"][0] == "TypeError" and "one dtype" in caught["dtype"][1]
        assert "layout must be one of" in caught["layout"][1]
        assert caught["mask-type"][0] == "TypeError" and "qkv.masks mask" in caught["mask-type"][1]
        kind, msg = caught["mask-local"]
        assert kind == "ValueError" and "global sequence, T = world_size · shard length = 8" in msg
        assert caught["valid"] is None
    assert "q must have 4 dimensions" in r1["rank1-3d"][1]
    assert "rank(s) [1]" in r0["rank1-3d"][1]


def test_uninitialised_group_says_what_to_call():
    assert not dist.is_initialized()
    x = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match=r"torch\.distributed\.init_process_group"):
        qd.ring_attention(x, x, x)


@pytest.mark.parametrize("layout", qd.LAYOUTS)
@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_shard_unshard_round_trip(layout, W):
    x = torch.arange(2 * 3 * 24 * 2).view(2, 3, 24, 2)
    shards = [qd.shard(x, r, W, layout=layout) for r in range(W)]
    assert torch.equal(qd.unshard(shards, layout=layout), x)
    assert torch.equal(qd.unshard(torch.cat(shards, 2), layout=layout, world_size=W), x)
    for r, s in enumerate(shards):  # a shard holds the values at its global positions
        assert torch.equal(s, x[:, :, qd.positions(r, W, 24, layout=layout)])
    on_dim1 = [qd.shard(x.transpose(1, 2), r, W, layout=layout, dim=1) for r in range(W)]
    assert torch.equal(qd.unshard(on_dim1, layout=layout, dim=1), x.transpose(1, 2))


def test_zigzag_positions_pair_early_and_late_chunks():
    assert qd.positions(0, 2, 8, layout="zigzag").tolist() == [0, 1, 6, 7]
    assert qd.positions(1, 2, 8, layout="zigzag").tolist() == [2, 3, 4, 5]
    assert qd.chunk_ranges(1, 4, 16, layout="zigzag") == [(2, 4), (12, 14)]


def test_layout_errors_name_the_argument():
    x = torch.zeros(1, 1, 12, 4)
    with pytest.raises(ValueError, match=r"divisible by 8.*length 12 with world_size=4"):
        qd.shard(x, 0, 4, layout="zigzag")
    with pytest.raises(ValueError, match="rank must lie in"):
        qd.shard(x, 3, 3)
    with pytest.raises(ValueError, match="layout must be one of"):
        qd.shard(x, 0, 2, layout="striped")
    with pytest.raises(ValueError, match="world_size="):
        qd.unshard(x, layout="zigzag")
    with pytest.raises(ValueError, match="one shape"):
        qd.unshard([x, x[:, :, :6]])


def _raise_on_rank_1():
    if dist.get_rank() == 1:
        raise ValueError("boom from rank 1")
    time.sleep(120)  # rank 0 would wait for ever: the harness must kill it


def _sleep():
    time.sleep(120)


def test_worker_error_surfaces_and_peers_are_killed():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed:(.|\n)*boom from rank 1"):
        qd.run_local(_raise_on_rank_1, 2, timeout=60)
    assert time.monotonic() - t0 < 60


def test_run_local_times_out():
    with pytest.raises(TimeoutError, match="did not finish within 3 s"):
        qd.run_local(_sleep, 1, timeout=3, init=False)
