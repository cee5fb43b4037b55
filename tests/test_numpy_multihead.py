"""qkv.numpy.multihead against torch.nn.MultiheadAttention (float64, same weights copied in)
and against finite differences: outputs, per-head weights, and the gradients of the inputs and
of every weight and bias."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkv.numpy import (
    MultiHeadParams,
    check_gradient,
    multi_head_attention_backward,
    multi_head_attention_forward,
    numerical_gradient,
)

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

NAMES = ("w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o")


@pytest.fixture(autouse=True)
def _numpy_fp_errors_raise():
    with np.errstate(all="raise", under="ignore"):  # underflow to 0 is by design in softmax
        yield


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    return float(
        np.linalg.norm(actual - expected)
        / max(np.linalg.norm(actual), np.linalg.norm(expected), 1e-300)
    )


def random_params(rng, embed_dim, num_heads, kdim=None, vdim=None, bias=True):
    params = MultiHeadParams.init(embed_dim, num_heads, kdim=kdim, vdim=vdim, bias=bias, rng=rng)
    if bias:  # torch initialises biases to 0, which would hide bias bugs: randomise them
        for name in ("b_q", "b_k", "b_v", "b_o"):
            setattr(params, name, 0.5 * rng.standard_normal(embed_dim))
    return params


def torch_mha(params: MultiHeadParams, num_heads: int) -> torch.nn.MultiheadAttention:
    """A torch.nn.MultiheadAttention holding exactly ``params``."""
    e, bias = params.embed_dim, params.b_q is not None
    mha = torch.nn.MultiheadAttention(
        e,
        num_heads,
        bias=bias,
        kdim=params.kdim,
        vdim=params.vdim,
        batch_first=True,
        dtype=torch.float64,
    )
    t = torch.from_numpy
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(t(np.concatenate([params.w_q, params.w_k, params.w_v])))
        else:
            mha.q_proj_weight.copy_(t(params.w_q))
            mha.k_proj_weight.copy_(t(params.w_k))
            mha.v_proj_weight.copy_(t(params.w_v))
        mha.out_proj.weight.copy_(t(params.w_o))
        if bias:
            mha.in_proj_bias.copy_(t(np.concatenate([params.b_q, params.b_k, params.b_v])))
            mha.out_proj.bias.copy_(t(params.b_o))
    return mha


def torch_param_grads(mha: torch.nn.MultiheadAttention, e: int) -> dict[str, np.ndarray | None]:
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.grad.numpy().reshape(3, e, e)
    else:
        w_q, w_k, w_v = (
            mha.q_proj_weight.grad.numpy(),
            mha.k_proj_weight.grad.numpy(),
            mha.v_proj_weight.grad.numpy(),
        )
    grads = {"w_q": w_q, "w_k": w_k, "w_v": w_v, "w_o": mha.out_proj.weight.grad.numpy()}
    if mha.in_proj_bias is None:
        grads.update(b_q=None, b_k=None, b_v=None, b_o=None)
    else:
        b_q, b_k, b_v = mha.in_proj_bias.grad.numpy().reshape(3, e)
        grads.update(b_q=b_q, b_k=b_k, b_v=b_v, b_o=mha.out_proj.bias.grad.numpy())
    return grads


CASES = [
    # (E, H, kdim, vdim, bias, padding, causal, Tq, Tk)
    pytest.param(8, 2, None, None, True, False, False, 5, 7, id="E=kdim=vdim"),
    pytest.param(8, 4, 5, 3, True, True, False, 6, 4, id="kdim,vdim,padding"),
    pytest.param(12, 3, None, None, False, False, True, 5, 7, id="no-bias,causal"),
    pytest.param(12, 4, 6, 9, False, True, True, 6, 6, id="kdim,vdim,no-bias,causal+padding"),
    pytest.param(6, 1, None, 4, True, True, True, 1, 5, id="one-head,Tq=1"),
]


@pytest.mark.parametrize(("e", "h", "kdim", "vdim", "bias", "padding", "causal", "tq", "tk"), CASES)
def test_matches_torch_multihead_attention(e, h, kdim, vdim, bias, padding, causal, tq, tk):
    rng = np.random.default_rng(e * 1000 + h * 100 + tq * 10 + tk)
    b = 3
    params = random_params(rng, e, h, kdim, vdim, bias)
    query = rng.standard_normal((b, tq, e))
    key = rng.standard_normal((b, tk, params.kdim))
    value = rng.standard_normal((b, tk, params.vdim))
    dout = rng.standard_normal((b, tq, e))

    # torch's key_padding_mask is True = ignore; ours is True = may attend.  Pad the tail of
    # the keys (as real padding does) so that, with causal, no query is left with nothing.
    kpm = np.zeros((b, tk), dtype=bool)
    if padding:
        kpm[0, -2:] = True
        kpm[2, -1:] = True
    mask = ~kpm[:, None, None, :] if padding else None  # (B, 1, 1, Tk)
    causal_t = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)  # bottom-right

    out, cache = multi_head_attention_forward(
        query, key, value, params, h, mask=mask, causal=causal
    )
    dquery, dkey, dvalue, grads = multi_head_attention_backward(dout, cache)

    mha = torch_mha(params, h)
    tq_, tk_, tv_ = (torch.tensor(x, requires_grad=True) for x in (query, key, value))
    t_out, t_w = mha(
        tq_,
        tk_,
        tv_,
        key_padding_mask=torch.from_numpy(kpm) if padding else None,
        attn_mask=~causal_t if causal else None,
        need_weights=True,
        average_attn_weights=False,
    )
    t_out.backward(torch.from_numpy(dout))

    assert out.shape == (b, tq, e)
    assert cache.weights.shape == (b, h, tq, tk)
    assert rel_err(out, t_out.detach().numpy()) < 1e-12
    assert rel_err(cache.weights, t_w.detach().numpy()) < 1e-12
    assert rel_err(dquery, tq_.grad.numpy()) < 1e-10
    assert rel_err(dkey, tk_.grad.numpy()) < 1e-10
    assert rel_err(dvalue, tv_.grad.numpy()) < 1e-10
    expected = torch_param_grads(mha, e)
    for name in NAMES:
        mine = getattr(grads, name)
        if expected[name] is None:
            assert mine is None, name
        elif name == "b_k":
            # b_k adds the same q·b_k to every score of a row, which the softmax ignores: its
            # true gradient is 0, so both sides are rounding noise and only that is checked.
            assert np.abs(mine).max() < 1e-13 and np.abs(expected[name]).max() < 1e-13
        else:
            assert rel_err(mine, expected[name]) < 1e-10, name
    if padding:  # padded keys receive exactly zero gradient
        assert np.all(dkey[0, -2:] == 0) and np.all(dvalue[2, -1:] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_numerical_gradients(causal):
    rng = np.random.default_rng(20 + causal)
    # Tq > Tk, so with causal the first query sees nothing.
    b, tq, tk, e, h, kdim, vdim = 2, 3, 2, 4, 2, 3, 5
    params = random_params(rng, e, h, kdim, vdim)
    inputs = {
        "query": rng.standard_normal((b, tq, e)),
        "key": rng.standard_normal((b, tk, kdim)),
        "value": rng.standard_normal((b, tk, vdim)),
    }
    mask = np.ones((b, 1, 1, tk), dtype=bool)
    mask[1, 0, 0, 0] = False  # batch 1 pads its first key
    dout = rng.standard_normal((b, tq, e))

    def loss(inp, prm):
        out, _ = multi_head_attention_forward(
            inp["query"], inp["key"], inp["value"], prm, h, mask=mask, causal=causal
        )
        return np.sum(out * dout)

    _, cache = multi_head_attention_forward(
        inputs["query"], inputs["key"], inputs["value"], params, h, mask=mask, causal=causal
    )
    dquery, dkey, dvalue, grads = multi_head_attention_backward(dout, cache)

    for name, analytic in (("query", dquery), ("key", dkey), ("value", dvalue)):

        def f_input(x, name=name):
            return loss({**inputs, name: x}, params)

        assert check_gradient(f_input, inputs[name], analytic) < 1e-8, name

    for name in NAMES:

        def f_param(x, name=name):
            return loss(inputs, MultiHeadParams(**{**params.as_dict(), name: x}))

        if name == "b_k":  # true gradient 0 (see above): a relative error would be all noise
            assert np.abs(grads.b_k).max() < 1e-13
            assert np.abs(numerical_gradient(f_param, params.b_k)).max() < 1e-8
        else:
            analytic = getattr(grads, name)
            assert check_gradient(f_param, getattr(params, name), analytic) < 1e-8, name

    if causal:  # query 0 sees nothing: its output is just b_o and its gradient is exactly 0
        out, _ = multi_head_attention_forward(
            inputs["query"], inputs["key"], inputs["value"], params, h, mask=mask, causal=True
        )
        np.testing.assert_array_equal(out[:, 0], np.broadcast_to(params.b_o, (b, e)))
        assert np.all(dquery[:, 0] == 0)
    assert np.all(dkey[1, 0] == 0) and np.all(dvalue[1, 0] == 0)  # the padded key


def test_heads_split_on_the_feature_axis():
    # With identity projections and zero biases, head h must see exactly features
    # h*Dh .. (h+1)*Dh - 1 of every token: compare with attention done per slice.
    rng = np.random.default_rng(30)
    b, t, e, h = 2, 5, 6, 3
    dh = e // h
    eye, zero = np.eye(e), np.zeros(e)
    params = MultiHeadParams(eye, zero, eye, zero, eye, zero, eye, zero)
    x = rng.standard_normal((b, t, e))
    out, cache = multi_head_attention_forward(x, x, x, params, h)
    for head in range(h):
        xs = x[..., head * dh : (head + 1) * dh]
        s = xs @ xs.swapaxes(-1, -2) / np.sqrt(dh)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(cache.weights[:, head], p, rtol=1e-13)
        np.testing.assert_allclose(out[..., head * dh : (head + 1) * dh], p @ xs, rtol=1e-13)


def test_init():
    p = MultiHeadParams.init(8, 2, kdim=3, vdim=5, rng=0)
    assert p.w_q.shape == (8, 8) and p.w_k.shape == (8, 3) and p.w_v.shape == (8, 5)
    assert p.w_o.shape == (8, 8) and p.b_q.shape == (8,) and np.all(p.b_o == 0)
    assert (p.embed_dim, p.kdim, p.vdim) == (8, 3, 5)
    assert p.w_q.dtype == np.float64
    assert np.abs(p.w_k).max() <= np.sqrt(6 / (8 + 3))
    assert np.abs(p.w_k).max() > 0.5 * np.sqrt(6 / (8 + 3))
    again = MultiHeadParams.init(8, 2, kdim=3, vdim=5, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(p.w_v, again.w_v)
    assert not np.array_equal(p.w_q, MultiHeadParams.init(8, rng=1).w_q)
    no_bias = MultiHeadParams.init(4, bias=False, rng=0)
    assert all(getattr(no_bias, n) is None for n in ("b_q", "b_k", "b_v", "b_o"))
    with pytest.raises(ValueError, match=r"embed_dim.*num_heads"):
        MultiHeadParams.init(10, 4)


def test_validation_errors():
    rng = np.random.default_rng(40)
    params = MultiHeadParams.init(6, rng=rng)
    x = rng.standard_normal((2, 3, 6))
    with pytest.raises(ValueError, match=r"embed_dim \(6\).*num_heads \(4\)"):
        multi_head_attention_forward(x, x, x, params, 4)
    with pytest.raises(TypeError, match="mask"):
        multi_head_attention_forward(x, x, x, params, 2, mask=np.ones((2, 1, 1, 3)))
    with pytest.raises(ValueError, match="mask"):
        multi_head_attention_forward(x, x, x, params, 2, mask=np.ones((2, 1, 1, 4), dtype=bool))
    with pytest.raises(ValueError, match="w_k"):
        multi_head_attention_forward(x, rng.standard_normal((2, 3, 5)), x, params, 2)
    with pytest.raises(ValueError, match=r"key and value.*\(2, 3, 6\).*\(2, 4, 6\)"):
        multi_head_attention_forward(x, x, rng.standard_normal((2, 4, 6)), params, 2)
    with pytest.raises(ValueError, match="query"):
        multi_head_attention_forward(x[0], x, x, params, 2)
    _, cache = multi_head_attention_forward(x, x, x, params, 2)
    with pytest.raises(ValueError, match="dout"):
        multi_head_attention_backward(np.ones((2, 3, 5)), cache)
