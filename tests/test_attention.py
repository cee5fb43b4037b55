"""qkv.attention against the float64 NumPy truth: every kernel, dtype, mask kind and shape.

Shapes are awkward on purpose (flash-attention's habit): Tq = 1, Tq != Tk both ways, head
dims 59 and 40, lengths 97 and 113, grouped-query ratios 1, 2 and 4.
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

# (B, Hq, Hkv, Tq, Tk, D, Dv)
SHAPES = {
    "decode-1": (2, 4, 4, 1, 97, 59, 59),
    "gqa2-short-q": (1, 4, 2, 97, 113, 32, 40),
    "gqa4-long-q": (2, 8, 2, 113, 97, 16, 16),
    "mqa-square": (1, 2, 1, 64, 64, 24, 24),
}


def _mask(kind: str, B: int, Tq: int, Tk: int):
    """(mask argument, causal flag) for each mask kind; some leave rows that see nothing."""
    g = torch.Generator().manual_seed(1)
    if kind == "none":
        return None, False
    if kind == "causal":  # rows that see nothing when Tq > Tk
        return None, True
    if kind == "window":
        return masks.window(5, 2), False
    if kind == "padding":  # the first batch element has no real key at all
        return masks.padding([0, Tk - 3][:B] if B > 1 else [Tk - 3]), False
    if kind == "document":
        ids = torch.arange(Tq)[None].expand(B, Tq) * 3 // max(Tq, 1)
        kv = torch.arange(Tk)[None].expand(B, Tk) * 3 // max(Tk, 1)
        return masks.document(ids, kv), False
    if kind == "dense":  # random bool mask, its query row 0 sees nothing
        m = torch.rand(B, 1, Tq, Tk, generator=g) > 0.4
        m[:, :, 0] = False
        return m, False
    if kind == "causal&padding":
        return masks.padding([max(Tk - 5, 0)] * B), True
    if kind == "window|document":
        ids = (torch.arange(Tq) * 2 // max(Tq, 1))[None].expand(B, Tq)
        kv = (torch.arange(Tk) * 2 // max(Tk, 1))[None].expand(B, Tk)
        return masks.window(3) | masks.document(ids, kv), False
    raise ValueError(kind)


MASK_KINDS = [
    "none",
    "causal",
    "window",
    "padding",
    "document",
    "dense",
    "causal&padding",
    "window|document",
]


def _allowed(mask, causal, B, H, Tq, Tk):
    m = masks.combine(
        masks.causal() if causal else None,
        masks.from_dense(mask) if isinstance(mask, torch.Tensor) else mask,
    )
    return None if m is None else m.to_dense(B, H, Tq, Tk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("kernel", ["reference", "fused"])
def test_forward_backward_match_numpy(kernel, shape, mask_kind, dtype):
    B, Hq, Hkv, Tq, Tk, D, Dv = shape
    q, k, v = make_qkv(shape, dtype, seed=hash((mask_kind, Tq)) % 1000)
    mask, causal = _mask(mask_kind, B, Tq, Tk)
    allowed = _allowed(mask, causal, B, Hq, Tq, Tk)
    dout = torch.randn(
        B, Hq, Tq, Dv, dtype=torch.float64, generator=torch.Generator().manual_seed(7)
    )
    truth = numpy_truth(q, k, v, allowed, dout=dout)

    out = qkv.attention(q, k, v, mask=mask, causal=causal, kernel=kernel)
    assert out.dtype == dtype and out.shape == (B, Hq, Tq, Dv)
    out.backward(dout.to(dtype))

    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    base_out, _ = naive_attention(qb, kb, vb, allowed)
    base_out.backward(dout.to(dtype))

    assert_close(out, truth["out"], base_out, dtype, "output")
    for name, got, base in (
        ("dq", q.grad, qb.grad),
        ("dk", k.grad, kb.grad),
        ("dv", v.grad, vb.grad),
    ):
        assert_close(got, truth[name], base, dtype, name)

    if allowed is not None:  # rows that see nothing: exactly zero output and gradient
        empty = ~allowed.any(-1)  # (B, Hq, Tq)
        assert (out.detach()[empty] == 0).all()
        assert (q.grad[empty] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", list(SHAPES.values())[:3], ids=list(SHAPES)[:3])
def test_weights_and_lse_match_numpy(shape, mask_kind, dtype):
    B, Hq, Hkv, Tq, Tk, D, Dv = shape
    q, k, v = make_qkv(shape, dtype, seed=3)
    mask, causal = _mask(mask_kind, B, Tq, Tk)
    allowed = _allowed(mask, causal, B, Hq, Tq, Tk)
    truth = numpy_truth(q, k, v, allowed)

    res = qkv.attention(q, k, v, mask=mask, causal=causal, return_weights=True, return_lse=True)
    assert isinstance(res, qkv.AttentionOutput)
    assert res.weights.dtype == dtype and res.weights.shape == (B, Hq, Tq, Tk)
    assert res.lse.dtype == lse_dtype(dtype) and res.lse.shape == (B, Hq, Tq)
    base_out, base_w = naive_attention(q.detach(), k.detach(), v.detach(), allowed)
    assert_close(res.output, truth["out"], base_out, dtype, "output")
    assert_close(res.weights, truth["weights"], base_w, dtype, "weights")
    assert_close(res.lse, truth["lse"], naive_lse(q, k, allowed), dtype, "lse")
    if allowed is not None:
        empty = ~allowed.any(-1)
        assert torch.isneginf(res.lse[empty]).all()
        assert (res.weights[empty] == 0).all()
        assert torch.isfinite(res.lse[~empty]).all()


def test_only_requested_fields_are_filled():
    q, k, v = make_qkv((1, 2, 2, 5, 6, 8, 8), torch.float32)
    r = qkv.attention(q, k, v, return_lse=True)
    assert r.weights is None and r.lse is not None
    r = qkv.attention(q, k, v, return_weights=True)
    assert r.lse is None and r.weights is not None
    out, w, lse = r  # unpacks like a tuple
    assert out is r.output and w is r.weights and lse is None
    assert isinstance(qkv.attention(q, k, v), torch.Tensor)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_bias_is_added_and_differentiable(dtype):
    """Bias against torch's own SDPA with an additive float mask (float64 truth)."""
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 9, 13, 16
    q, k, v = make_qkv((B, Hq, Hkv, Tq, Tk, D, D), dtype)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(1, Hq, Tq, Tk, generator=g, dtype=torch.float64).to(dtype)
    bias.requires_grad_()
    allowed = masks.window(4, 1).to_dense(B, Hq, Tq, Tk)
    out = qkv.attention(q, k, v, bias=bias, mask=masks.window(4, 1))
    out.sum().backward()

    q64, k64, v64, b64 = (t.detach().double().requires_grad_() for t in (q, k, v, bias))
    add = b64.masked_fill(~allowed, float("-inf"))
    want = torch.nn.functional.scaled_dot_product_attention(
        q64, k64.repeat_interleave(2, 1), v64.repeat_interleave(2, 1), attn_mask=add
    )
    want.sum().backward()
    assert_close(out, want, None, dtype, "output")
    for name, got, ref in (
        ("dq", q.grad, q64.grad),
        ("dk", k.grad, k64.grad),
        ("dbias", bias.grad, b64.grad),
    ):
        assert_close(got, ref, None, dtype, name)
    assert (bias.grad[~allowed[:1]] == 0).all()  # forbidden pairs get no gradient


def test_bias_rows_of_minus_inf_are_safe():
    q, k, v = make_qkv((1, 1, 1, 3, 4, 8, 8), torch.float64)
    bias = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    bias[..., 1, :] = float("-inf")  # row 1 sees nothing through the bias alone
    r = qkv.attention(q, k, v, bias=bias, return_lse=True)
    r.output.sum().backward()
    assert (r.output[0, 0, 1] == 0).all() and torch.isneginf(r.lse[0, 0, 1])
    assert not torch.isnan(q.grad).any() and (q.grad[0, 0, 1] == 0).all()


def test_scale_is_applied_before_softmax():
    q, k, v = make_qkv((1, 2, 2, 7, 7, 16, 16), torch.float64)
    truth = numpy_truth(q, k, v, scale=0.37)
    out = qkv.attention(q, k, v, scale=0.37)
    assert_close(out, truth["out"], None, torch.float64, "output")


def test_causal_is_bottom_right_aligned():
    q, k, v = make_qkv((1, 1, 1, 2, 4, 4, 4), torch.float64)
    w = qkv.attention(q, k, v, causal=True, return_weights=True).weights[0, 0]
    assert (w > 0).tolist() == [[True, True, True, False], [True, True, True, True]]
    # a single query against a cache sees every key
    w1 = qkv.attention(q[:, :, -1:], k, v, causal=True, return_weights=True).weights
    assert (w1 > 0).all()


def test_extreme_scores_stay_finite():
    q, k, v = make_qkv((1, 2, 2, 33, 33, 16, 16), torch.float32, scale=30.0)
    r = qkv.attention(q, k, v, causal=True, return_weights=True, return_lse=True)
    assert torch.isfinite(r.output).all() and torch.isfinite(r.lse).all()
    truth = numpy_truth(q, k, v, masks.causal().to_dense(1, 2, 33, 33))
    torch.testing.assert_close(r.weights.double(), truth["weights"], atol=1e-5, rtol=0)


def test_empty_sequences():
    q, k, v = make_qkv((2, 2, 2, 0, 5, 8, 8), torch.float32)
    assert qkv.attention(q, k, v).shape == (2, 2, 0, 8)
    q, k, v = make_qkv((2, 2, 2, 3, 0, 8, 8), torch.float32)
    r = qkv.attention(q, k, v, return_lse=True)
    assert (r.output == 0).all() and torch.isneginf(r.lse).all()
