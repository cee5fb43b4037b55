"""Bahdanau (additive) and Luong (bilinear, dot) attention against the plain formulas in
float64 NumPy, finite-difference gradients, masks with empty rows, and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import qkv
from qkv.nn.classic import AdditiveAttention, BilinearAttention, DotAttention
from qkv.numpy import check_gradient

B, TQ, TK, DQ, DK, DV, A = 2, 3, 5, 4, 6, 3, 7


def np_softmax_rows(scores, allowed):
    """Per-row stable softmax over the allowed entries; rows with none give 0."""
    out = np.zeros_like(scores)
    for idx in np.ndindex(scores.shape[:-1]):
        row, ok = scores[idx], allowed[idx]
        if ok.any():
            e = np.where(ok, np.exp(row - row[ok].max()), 0.0)
            out[idx] = e / e.sum()
    return out


def np_additive(query, keys, values, Wq, Wk, v, bk, allowed):
    """e_ij = vᵀ tanh(Wq s_i + Wk h_j + b), written pair by pair."""
    scores = np.zeros((query.shape[0], query.shape[1], keys.shape[1]))
    for b in range(query.shape[0]):
        for i in range(query.shape[1]):
            for j in range(keys.shape[1]):
                scores[b, i, j] = v @ np.tanh(Wq @ query[b, i] + Wk @ keys[b, j] + bk)
    weights = np_softmax_rows(scores, allowed)
    return np.einsum("bij,bjd->bid", weights, values), weights


def np_bilinear(query, keys, values, W, allowed, scale=1.0):
    scores = np.einsum("bip,pq,bjq->bij", query, W, keys) * scale  # s_iᵀ W h_j
    weights = np_softmax_rows(scores, allowed)
    return np.einsum("bij,bjd->bid", weights, values), weights


def inputs(seed=0, dk=DK, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, TQ, DQ, generator=g, dtype=dtype)
    keys = torch.randn(B, TK, dk, generator=g, dtype=dtype)
    values = torch.randn(B, TK, DV, generator=g, dtype=dtype)
    return query, keys, values


def padding_with_empty_row():
    """(B, TQ, TK): batch 0 padded to 3 keys; batch 1 query 1 may attend to nothing."""
    allowed = torch.ones(B, TQ, TK, dtype=torch.bool)
    allowed[0, :, 3:] = False
    allowed[1, 1, :] = False
    allowed[1, 2, 0] = False
    return allowed


def additive_params(m):
    bias = m.key_proj.bias
    return (
        m.query_proj.weight.detach().double().numpy(),
        m.key_proj.weight.detach().double().numpy(),
        m.score_proj.weight.detach().double().numpy()[0],
        np.zeros(A) if bias is None else bias.detach().double().numpy(),
    )


# ---- forward against the formulas ---------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("with_values", [False, True])
def test_additive_forward_matches_formula(bias, with_values):
    torch.manual_seed(0)
    m = AdditiveAttention(DQ, DK, A, bias=bias).double()
    if bias:
        torch.nn.init.normal_(m.key_proj.bias)
    query, keys, values = inputs()
    allowed = padding_with_empty_row()
    ctx, w = m(query, keys, values if with_values else None, mask=allowed)
    np_values = (values if with_values else keys).numpy()
    want_ctx, want_w = np_additive(
        query.numpy(), keys.numpy(), np_values, *additive_params(m), allowed.numpy()
    )
    assert ctx.shape == (B, TQ, np_values.shape[-1]) and w.shape == (B, TQ, TK)
    np.testing.assert_allclose(w.detach().numpy(), want_w, atol=1e-12)
    np.testing.assert_allclose(ctx.detach().numpy(), want_ctx, atol=1e-12)
    assert torch.equal(ctx[1, 1], torch.zeros_like(ctx[1, 1]))  # the empty row


def test_bilinear_and_dot_forward_match_formula():
    torch.manual_seed(0)
    query, keys, values = inputs()
    allowed = padding_with_empty_row()
    m = BilinearAttention(DQ, DK).double()
    ctx, w = m(query, keys, values, mask=allowed)
    want_ctx, want_w = np_bilinear(
        query.numpy(), keys.numpy(), values.numpy(), m.weight.detach().numpy(), allowed.numpy()
    )
    np.testing.assert_allclose(w.detach().numpy(), want_w, atol=1e-12)
    np.testing.assert_allclose(ctx.detach().numpy(), want_ctx, atol=1e-12)

    query, keys, values = inputs(dk=DQ)
    eye = np.eye(DQ)
    for scaled, scale in ((False, 1.0), (True, 1 / math.sqrt(DQ))):
        ctx, w = DotAttention(scaled=scaled)(query, keys, values, mask=allowed)
        want_ctx, want_w = np_bilinear(
            query.numpy(), keys.numpy(), values.numpy(), eye, allowed.numpy(), scale
        )
        np.testing.assert_allclose(w.numpy(), want_w, atol=1e-12)
        np.testing.assert_allclose(ctx.numpy(), want_ctx, atol=1e-12)


def test_softmax_is_stable_per_row():
    """Rows whose scores are far apart (one ~1e3 above another): a single global max would
    underflow the low row to 0/0; each row's own max keeps both exact."""
    query = torch.tensor([[[30.0, 0.0], [-30.0, 0.0]]], dtype=torch.float64)  # (1, 2, 2)
    keys = torch.tensor([[[30.0, 0.0], [29.0, 0.0]]], dtype=torch.float64)  # (1, 2, 2)
    ctx, w = DotAttention()(query, keys)
    want = np_softmax_rows(
        np.einsum("bid,bjd->bij", query.numpy(), keys.numpy()), np.ones((1, 2, 2), bool)
    )
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-12)
    assert torch.isfinite(ctx).all()


def test_float32_close_to_float64():
    torch.manual_seed(0)
    m64 = AdditiveAttention(DQ, DK, A).double()
    m32 = AdditiveAttention(DQ, DK, A)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    query, keys, values = inputs()
    c64, w64 = m64(query, keys, values)
    c32, w32 = m32(query.float(), keys.float(), values.float())
    assert c32.dtype == torch.float32
    assert torch.allclose(c32.double(), c64, atol=1e-5)
    assert torch.allclose(w32.double(), w64, atol=1e-5)


# ---- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["additive", "bilinear", "dot"])
def test_input_gradients_torch_gradcheck(kind):
    torch.manual_seed(0)
    dk = DQ if kind == "dot" else DK
    m = {
        "additive": lambda: AdditiveAttention(DQ, DK, A, bias=True),
        "bilinear": lambda: BilinearAttention(DQ, DK),
        "dot": lambda: DotAttention(scaled=True),
    }[kind]().double()
    query, keys, values = (t.requires_grad_() for t in inputs(dk=dk))
    allowed = padding_with_empty_row()

    def f(q, k, v):
        return tuple(m(q, k, v, mask=allowed))

    assert torch.autograd.gradcheck(f, (query, keys, values), eps=1e-6, atol=1e-8)


def test_parameter_gradients_against_finite_differences_of_numpy_formula():
    """Autograd's gradient of every weight vs finite differences of the NumPy formula."""
    torch.manual_seed(0)
    m = AdditiveAttention(DQ, DK, A, bias=True).double()
    torch.nn.init.normal_(m.key_proj.bias)
    query, keys, values = inputs()
    allowed = padding_with_empty_row()
    g = torch.Generator().manual_seed(3)
    dctx = torch.randn(B, TQ, DV, generator=g, dtype=torch.float64)
    dw = torch.randn(B, TQ, TK, generator=g, dtype=torch.float64)
    ctx, w = m(query, keys, values, mask=allowed)
    ((ctx * dctx).sum() + (w * dw).sum()).backward()

    Wq, Wk, v, bk = additive_params(m)
    args = (query.numpy(), keys.numpy(), values.numpy())

    def loss(Wq_, Wk_, v_, bk_):
        c, wt = np_additive(*args, Wq_, Wk_, v_, bk_, allowed.numpy())
        return (c * dctx.numpy()).sum() + (wt * dw.numpy()).sum()

    checks = {
        "W_q": (Wq, lambda x: loss(x, Wk, v, bk), m.query_proj.weight.grad),
        "W_k": (Wk, lambda x: loss(Wq, x, v, bk), m.key_proj.weight.grad),
        "v": (v, lambda x: loss(Wq, Wk, x, bk), m.score_proj.weight.grad[0]),
        "b": (bk, lambda x: loss(Wq, Wk, v, x), m.key_proj.bias.grad),
    }
    for name, (x0, f, grad) in checks.items():
        assert check_gradient(f, x0, grad.numpy()) < 1e-7, name

    b = BilinearAttention(DQ, DK).double()
    ctx, w = b(query, keys, values, mask=allowed)
    ((ctx * dctx).sum() + (w * dw).sum()).backward()

    def loss_w(W):
        c, wt = np_bilinear(*args, W, allowed.numpy())
        return (c * dctx.numpy()).sum() + (wt * dw.numpy()).sum()

    assert check_gradient(loss_w, b.weight.detach().numpy(), b.weight.grad.numpy()) < 1e-7


# ---- masks --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["additive", "bilinear", "dot"])
def test_fully_masked_row_gives_zero_context_and_zero_gradients(kind):
    torch.manual_seed(0)
    dk = DQ if kind == "dot" else DK
    m = {
        "additive": lambda: AdditiveAttention(DQ, DK, A),
        "bilinear": lambda: BilinearAttention(DQ, DK),
        "dot": lambda: DotAttention(),
    }[kind]()
    query, keys, values = (t.float().requires_grad_() for t in inputs(dk=dk))
    allowed = padding_with_empty_row()
    ctx, w = m(query, keys, values, mask=allowed)
    assert not torch.isnan(ctx).any() and not torch.isnan(w).any()
    assert torch.equal(ctx[1, 1], torch.zeros(DV)) and torch.equal(w[1, 1], torch.zeros(TK))
    assert torch.equal(w[~allowed], torch.zeros(int((~allowed).sum())))
    torch.testing.assert_close(w.sum(-1)[allowed.any(-1)], torch.ones(B * TQ - 1))
    (ctx.pow(2).sum() + w.pow(2).sum()).backward()
    for t in (query, keys, values, *m.parameters()):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(query.grad[1, 1], torch.zeros(DQ))  # the empty row's query
    assert torch.equal(keys.grad[0, 3:], torch.zeros(TK - 3, dk))  # padded keys
    assert torch.equal(values.grad[0, 3:], torch.zeros(TK - 3, DV))


def test_mask_forms_agree():
    """(B, 1, Tk) padding tensor, a (Tk,) row and qkv.masks.padding mean the same."""
    torch.manual_seed(0)
    m = AdditiveAttention(DQ, DK, A).double()
    query, keys, values = inputs()
    lengths = torch.tensor([3, 0])  # batch 1: every row empty
    padded = torch.arange(TK)[None, None, :] < lengths[:, None, None]  # (B, 1, Tk)
    a = m(query, keys, values, mask=padded)
    b = m(query, keys, values, mask=qkv.masks.padding(lengths))
    assert torch.equal(a.context, b.context) and torch.equal(a.weights, b.weights)
    assert torch.equal(a.context[1], torch.zeros(TQ, DV))
    c = m(query, keys, values, mask=padded[0, 0])  # (Tk,): the same keys for everyone
    d = m(query, keys, values, mask=padded[:1].expand(B, TQ, TK))
    assert torch.equal(c.weights, d.weights)


def test_mask_all_false_is_not_uniform():
    """The `masked_fill(mask == 0, -1e9)` pitfall: an all-False mask gives uniform weights.
    Here it gives zeros."""
    m = DotAttention()
    query, keys, values = inputs(dk=DQ)
    ctx, w = m(query, keys, values, mask=torch.zeros(B, TQ, TK, dtype=torch.bool))
    assert torch.equal(w, torch.zeros_like(w)) and torch.equal(ctx, torch.zeros_like(ctx))


# ---- validation ---------------------------------------------------------------------------


def test_validation_errors_name_the_argument_and_shapes():
    m = AdditiveAttention(DQ, DK, A).double()
    query, keys, values = inputs()
    with pytest.raises(ValueError, match=r"query .*\(2, 4\).*unsqueeze"):
        m(query[:, 0], keys)
    with pytest.raises(ValueError, match=r"query_dim=4.*\(2, 3, 5\)"):
        m(torch.randn(B, TQ, 5, dtype=torch.float64), keys)
    with pytest.raises(ValueError, match=r"key_dim=6.*\(2, 5, 4\)"):
        m(query, torch.randn(B, TK, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"keys must have shape \(B, Tk, Dk\)"):
        m(query, keys[0])
    with pytest.raises(ValueError, match=r"same length Tk.*\(2, 4, 3\)"):
        m(query, keys, values[:, :4])
    with pytest.raises(ValueError, match="batch size"):
        m(query, keys[:1], values[:1])
    with pytest.raises(TypeError, match="one dtype"):
        m(query, keys, values.float())
    with pytest.raises(TypeError, match=r"mask must be .*bool"):
        m(query, keys, mask=torch.ones(B, TQ, TK))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 4\) does not broadcast"):
        m(query, keys, mask=torch.ones(B, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same size D"):
        DotAttention()(query, keys)
    with pytest.raises(ValueError, match="hidden_dim"):
        AdditiveAttention(DQ, DK, 0)
    with pytest.raises(TypeError, match="scaled"):
        DotAttention(scaled=1)
