"""The tiled kernel equals the float64 truth: outputs, weights, lse and every gradient.

Small tiles (e.g. 16 × 8) on purpose, so that every mask kind produces empty, full and
partial tiles, merges across many segments, and sizes of tile ± 1.
"""

from __future__ import annotations

import pytest
import torch

import qkv
from conftest import (
    DTYPES,
    assert_close,
    lse_dtype,
    make_qkv,
    naive_attention,
    naive_lse,
    numpy_truth,
)
from qkv import masks
from qkv._validate import build_problem
from qkv.kernels import tiled
from qkv.kernels.plan import TileConfig, TilePlan
from qkv.kernels.tiles import group_jobs, plan_tiles, refine_jobs


def run_tiled(q, k, v, *, block_q=16, block_k=8, refine_rows=4, **options):
    p = build_problem(q, k, v, **{"return_lse": True, **options})
    return tiled.run(q, k, v, p, block_q=block_q, block_k=block_k, refine_rows=refine_rows)


def _masks(B, Tq, Tk):
    g = torch.Generator().manual_seed(0)
    ids = torch.sort(torch.randint(0, 3, (B, Tq), generator=g), -1).values
    kv = torch.sort(torch.randint(0, 3, (B, Tk), generator=g), -1).values
    dense = torch.rand(B, 1, Tq, Tk, generator=g) > 0.5
    dense[:, :, -1] = False  # the last query row sees nothing
    return {
        "none": (None, False),
        "causal": (None, True),
        "window": (masks.window(6, 1), False),
        "causal-window": (masks.window(10), True),
        "padding": (masks.padding([0, Tk - 2][:B]), False),
        "document": (masks.document(ids, kv), False),
        "document&causal": (masks.document(ids, kv), True),
        "dense": (dense, False),
        "window|padding": (masks.window(3) | masks.padding([5, 1][:B]), False),
    }


SIZES = [  # (B, Hq, Hkv, Tq, Tk, D, Dv): tile ± 1 with block_q=16, block_k=8
    (2, 2, 2, 17, 15, 8, 8),
    (2, 4, 2, 33, 41, 12, 7),
    (1, 4, 1, 15, 9, 16, 16),
    (2, 2, 1, 1, 65, 8, 8),
    (2, 2, 2, 40, 24, 8, 8),
]
MASK_NAMES = list(_masks(2, 4, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_tiled_matches_truth(size, mask_name, dtype):
    B, Hq, Hkv, Tq, Tk, D, Dv = size
    mask, causal = _masks(B, Tq, Tk)[mask_name]
    q, k, v = make_qkv(size, dtype, seed=Tq + Tk)
    m = masks.combine(
        masks.causal() if causal else None,
        masks.from_dense(mask) if isinstance(mask, torch.Tensor) else mask,
    )
    allowed = None if m is None else m.to_dense(B, Hq, Tq, Tk)
    dout = torch.randn(B, Hq, Tq, Dv, dtype=torch.float64)
    truth = numpy_truth(q, k, v, allowed, dout=dout)

    res = run_tiled(q, k, v, mask=mask, causal=causal)
    res.output.backward(dout.to(dtype))
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    base, _ = naive_attention(qb, kb, vb, allowed)
    base.backward(dout.to(dtype))

    assert res.output.dtype == dtype and res.lse.dtype == lse_dtype(dtype)
    assert_close(res.output, truth["out"], base, dtype, "output")
    assert_close(res.lse, truth["lse"], naive_lse(q, k, allowed), dtype, "lse")
    for name, got, b in (("dq", q.grad, qb.grad), ("dk", k.grad, kb.grad), ("dv", v.grad, vb.grad)):
        assert_close(got, truth[name], b, dtype, name)
    if allowed is not None:
        empty = ~allowed.any(-1)
        assert (res.output.detach()[empty] == 0).all() and torch.isneginf(res.lse[empty]).all()
        assert (q.grad[empty] == 0).all()


@pytest.mark.parametrize("mask_name", MASK_NAMES)
def test_tiled_weights_match_truth(mask_name):
    B, Hq, Hkv, Tq, Tk = 2, 4, 2, 33, 41
    mask, causal = _masks(B, Tq, Tk)[mask_name]
    q, k, v = make_qkv((B, Hq, Hkv, Tq, Tk, 8, 8), torch.float32)
    m = masks.combine(
        masks.causal() if causal else None,
        masks.from_dense(mask) if isinstance(mask, torch.Tensor) else mask,
    )
    allowed = None if m is None else m.to_dense(B, Hq, Tq, Tk)
    truth = numpy_truth(q, k, v, allowed)
    with torch.no_grad():
        res = run_tiled(q, k, v, mask=mask, causal=causal, return_weights=True)
    assert_close(res.weights, truth["weights"], None, torch.float32, "weights")


def test_auto_dispatch_uses_tiled_for_weights_without_grad():
    q, k, v = make_qkv((1, 2, 2, 300, 300, 8, 8), torch.float32)
    with torch.no_grad():
        assert qkv.explain(q, k, v, causal=True, return_weights=True).name == "tiled"
        assert qkv.explain(q, k, v, mask=masks.window(16)).name == "fused"  # small: dense
        big = make_qkv((1, 2, 2, 1100, 1100, 8, 8), torch.float32)
        assert qkv.explain(*big, mask=masks.window(16)).name == "tiled"
    assert qkv.explain(q, k, v, causal=True, return_weights=True).name == "reference"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bias_shape", [(1, 4, 33, 41), (2, 1, 1, 41), (33, 1)])
def test_tiled_bias_and_its_gradient(dtype, bias_shape):
    B, Hq, Hkv, Tq, Tk = 2, 4, 2, 33, 41
    q, k, v = make_qkv((B, Hq, Hkv, Tq, Tk, 8, 8), dtype)
    bias = torch.randn(bias_shape, dtype=dtype, requires_grad=True)
    mask = masks.window(9, 2)
    res = run_tiled(q, k, v, mask=mask, bias=bias)
    dout = torch.randn_like(res.output)
    res.output.backward(dout)
    q2, k2, v2, b2 = (t.detach().requires_grad_() for t in (q, k, v, bias))
    want = qkv.attention(q2, k2, v2, mask=mask, bias=b2, kernel="reference")
    want.backward(dout)
    assert_close(res.output, want, None, dtype, "output")
    for name, got, ref in (
        ("dq", q.grad, q2.grad),
        ("dk", k.grad, k2.grad),
        ("dv", v.grad, v2.grad),
        ("dbias", bias.grad, b2.grad),
    ):
        assert_close(got, ref, None, dtype, name)


def test_tiled_bias_without_grad_uses_fused_backward():
    q, k, v = make_qkv((1, 2, 2, 20, 20, 8, 8), torch.float64)
    bias = torch.randn(20, 20, dtype=torch.float64)
    res = run_tiled(q, k, v, bias=bias, causal=True)
    res.output.sum().backward()
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    qkv.attention(q2, k2, v2, bias=bias, causal=True, kernel="reference").sum().backward()
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(k.grad, k2.grad)


def test_tiled_dropout_is_reproducible_unbiased_and_consistent():
    B, H, T = 2, 2, 40
    q, k, _ = make_qkv((B, H, H, T, T, 8, 8), torch.float64)
    eye = torch.eye(T, dtype=torch.float64).expand(B, H, T, T)
    mask = masks.window(12)
    p = 0.25

    def dropped(seed):
        g = torch.Generator().manual_seed(seed)
        return run_tiled(q.detach(), k.detach(), eye, mask=mask, dropout_p=p, generator=g).output

    w = qkv.attention(q.detach(), k.detach(), eye, mask=mask, return_weights=True).weights
    a, b, c = dropped(1), dropped(1), dropped(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = a != 0
    torch.testing.assert_close(a[kept], w[kept] / (1 - p))
    allowed = w > 0
    frac = (a[allowed] == 0).double().mean().item()
    n = int(allowed.sum())
    assert abs(frac - p) < 4 * (p * (1 - p) / n) ** 0.5
    mean = sum(dropped(s) for s in range(100)) / 100
    assert (mean - w).abs().mean() < 5e-3
    # gradients use the same keep-mask as the forward pass
    v = torch.randn(B, H, T, 5, dtype=torch.float64, requires_grad=True)
    out = run_tiled(q, k, v, mask=mask, dropout_p=p, generator=torch.Generator().manual_seed(1))
    dout = torch.randn_like(out.output)
    out.output.backward(dout)
    torch.testing.assert_close(out.output, a @ v.detach())
    torch.testing.assert_close(v.grad, a.transpose(-2, -1) @ dout)
    # dq by finite differences of the same (seeded) function
    q64 = q.detach().clone().requires_grad_()

    def f(qq):
        return (
            run_tiled(
                qq,
                k.detach(),
                v.detach(),
                mask=mask,
                dropout_p=p,
                generator=torch.Generator().manual_seed(1),
            ).output
            * dout
        ).sum()

    f(q64).backward()
    eps, idx = 1e-6, (0, 1, 7, 3)
    qp, qm = q.detach().clone(), q.detach().clone()
    qp[idx] += eps
    qm[idx] -= eps
    numeric = (f(qp) - f(qm)) / (2 * eps)
    assert abs(float(numeric) - float(q64.grad[idx])) < 1e-6


def test_plan_skips_empty_tiles_and_keeps_masks_small():
    bq, bk, w = 64, 64, 256
    plan = plan_tiles(masks.window(w - 1), 16384, 16384, bq, bk)
    assert len(plan) == 16384 // bq
    for blk in plan:  # one masked segment per block: the window plus the block's staircase
        assert len(blk.segments) == 1
        seg = blk.segments[0]
        assert seg.k1 - seg.k0 <= w + bq and seg.k1 == blk.q1
    jobs = group_jobs(plan, heads=4)
    assert len(jobs) <= 6  # the interior blocks share one shape: a handful of fused calls
    T = 65536
    ids = (torch.arange(T) * 4 // T)[None]
    plan = plan_tiles(masks.document(ids) & masks.causal(), T, T, 256, 128)
    computed = sum((seg.k1 - seg.k0) * (blk.q1 - blk.q0) for blk in plan for seg in blk.segments)
    assert computed < 0.14 * T * T  # 4 causal documents need 1/8 of the matrix
    for blk in plan:  # long full stretches run without a mask; masks stay near the diagonal
        for seg in blk.segments:
            assert seg.mask is None or seg.k1 - seg.k0 <= 1024 + 2 * 128


@pytest.mark.parametrize("seed", range(6))
def test_float16_is_computed_in_float32(seed):
    """float16 runs in float32 inside the tiled kernel, so dv (summed over 16 tiles per key
    here) is rounded to float16 once: within half a unit of the largest value, as the
    exactly rounded result is. (torch's fused kernel rounds each call's partial sum: 0.56
    units with seed 5.) dq and dk also depend on the output, saved in float16, through
    rowsum(dO ⊙ O), as in every FlashAttention-style backward; the property tests bound them.
    """
    B, H, T, D = 1, 2, 64, 16
    q, k, v = make_qkv((B, H, H, T, T, D, D), torch.float16, seed=seed)
    dout = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed)).half()
    truth = numpy_truth(q, k, v, masks.causal().to_dense(B, H, T, T), dout=dout.double(), scale=2.0)
    res = run_tiled(q, k, v, causal=True, scale=2.0, block_q=4, block_k=4)
    res.output.backward(dout)
    half_unit = torch.finfo(torch.float16).eps / 2 * float(truth["dv"].abs().max())
    assert float((v.grad.double() - truth["dv"]).abs().max()) <= half_unit


def test_refined_window_reads_the_window_plus_one_sub_block():
    """256-row blocks of a 256-key window become 32-row sub-blocks in one regular job."""
    from qkv.kernels import stacked

    T, w = 16384, 256
    jobs = group_jobs(plan_tiles(masks.window(w - 1), T, T, 256, 256), heads=4)
    fine = refine_jobs(jobs, T, rows=32)
    interior = max(fine, key=lambda j: len(j.q_starts))
    assert interior.rows == 32 and interior.keys == w + 32  # 287 keys widened to 288
    assert len(interior.q_starts) == (T - 256) // 32
    assert stacked._steps(interior) == (32, 32)  # overlapping views, one fused call
    assert all(m is interior.masks[0] for m in interior.masks)  # one shared pattern
    computed = sum(len(j.q_starts) * j.rows * j.keys for j in fine)
    assert computed < 1.15 * T * w  # was (w + 256) keys per row before refinement
    assert sum(len(j.q_starts) * j.rows for j in fine) == T  # every row exactly once


@pytest.mark.parametrize("mask_name", ["window", "causal-window", "document", "document&causal"])
@pytest.mark.parametrize("segments", ["few", "many"])
def test_refined_jobs_change_nothing(mask_name, segments):
    """Sub-blocks (and their widened, masked key spans) give the unrefined results,
    also when a block has several segments whose keys a widened span reaches into."""
    # "many": full runs of more than 8 keys become segments of their own
    base = TileConfig(block_q=16, block_k=8, max_masked_full=8 if segments == "many" else 1024)
    B, Hq, Hkv, Tq, Tk = 2, 4, 2, 70, 90
    mask, causal = _masks(B, Tq, Tk)[mask_name]
    full = masks.combine(masks.causal() if causal else None, mask)
    q, k, v = make_qkv((B, Hq, Hkv, Tq, Tk, 8, 8), torch.float64)
    dout = torch.randn(B, Hq, Tq, 8, dtype=torch.float64)

    def refined(rows):
        jobs = TilePlan(full, Tq, Tk, TileConfig(**{**base.__dict__, "refine_rows": rows}))
        jobs = jobs.jobs(Hq, compact=True)
        return len(jobs.fine) != len(jobs.coarse) or any(
            a is not b for a, b in zip(jobs.fine, jobs.coarse, strict=False)
        )

    def run(rows):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        config = TileConfig(**{**base.__dict__, "refine_rows": rows})
        p = build_problem(qq, kk, vv, mask=mask, causal=causal, return_lse=True)
        res = tiled.run(qq, kk, vv, p, config=config)
        res.output.backward(dout)
        return res.output, res.lse, qq.grad, kk.grad, vv.grad

    whole = run(16)  # sub-blocks as large as the blocks: nothing to refine
    assert not refined(16)
    for rows in (4, 1):
        assert refined(rows)  # the refinement really runs
        got = run(rows)
        for a, b in zip(got, whole, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mask_name", ["window", "causal-window", "padding", "document&causal"])
def test_strided_and_gathered_jobs_agree(mask_name, monkeypatch):
    """Evenly spaced blocks run on overlapping views; others on gathered copies: same result."""
    from qkv.kernels import stacked

    B, Hq, Hkv, Tq, Tk = 2, 4, 2, 96, 96
    mask, causal = _masks(B, Tq, Tk)[mask_name]
    q, k, v = make_qkv((B, Hq, Hkv, Tq, Tk, 8, 8), torch.float64)
    dout = torch.randn(B, Hq, Tq, 8, dtype=torch.float64)

    def run():
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        res = run_tiled(qq, kk, vv, mask=mask, causal=causal)
        res.output.backward(dout)
        return res.output, res.lse, qq.grad, kk.grad, vv.grad

    steps = []
    original = stacked._steps
    monkeypatch.setattr(stacked, "_steps", lambda j: steps.append(original(j)) or steps[-1])
    strided = run()
    assert any(s is not None for s in steps)  # the strided path really ran
    monkeypatch.setattr(stacked, "_steps", lambda j: None)
    gathered = run()
    for a, b in zip(strided, gathered, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_decoding_with_a_window_reads_only_the_window():
    """Tq = 1 against a long cache: only the window's keys are copied, gradients go home."""
    q, k, v = make_qkv((2, 4, 2, 1, 300, 16, 16), torch.float64)
    res = run_tiled(q, k, v, mask=masks.window(20))
    res.output.sum().backward()
    config = TileConfig(block_q=16, block_k=8, refine_rows=4)
    plan = tiled.PLANS.get(masks.window(20), 1, 300, config, q.device)  # the run's plan
    keys = plan.jobs(4, compact=True, device=q.device).keys
    assert keys is not None and keys.numel() < 300
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    want = qkv.attention(q2, k2, v2, mask=masks.window(20), kernel="reference")
    want.sum().backward()
    torch.testing.assert_close(res.output, want)
    for got, ref in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(got, ref)
    assert (k.grad[:, :, :279] == 0).all()  # keys outside the window get no gradient
