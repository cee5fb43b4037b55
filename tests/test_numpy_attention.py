"""qkv.numpy.attention (and softmax, gradcheck) against torch float64 autograd and finite
differences: forward values, weights, log-sum-exp, hand-derived gradients, masks, causal
alignment, empty rows, extreme magnitudes and argument validation."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from qkv.numpy import (
    attention_backward,
    attention_forward,
    causal_mask,
    check_gradient,
    log_sum_exp,
    numerical_gradient,
    softmax,
)

# Any RuntimeWarning (overflow, 0/0, log(0), ...) is a failure, and numpy's floating-point
# errors raise instead of merely warning.  Underflow is the one exception: exp(-800) = 0 is
# exactly how a negligible probability is meant to vanish (numpy ignores it by default).
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@pytest.fixture(autouse=True)
def _numpy_fp_errors_raise():
    with np.errstate(all="raise", under="ignore"):
        yield


# --------------------------------------------------------------------------- helpers


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """Norm-based relative error; both arrays must have the same shape and -inf pattern."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), finite)
    np.testing.assert_array_equal(actual[~finite], expected[~finite])
    a, e = actual[finite], expected[finite]
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(a), np.linalg.norm(e), 1e-300))


def torch_causal(tq: int, tk: int) -> torch.Tensor:
    # Independent of qkv: keep j <= i + (Tk - Tq), i.e. the lower triangle shifted right.
    return torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)


def torch_reference(q, k, v, mask=None, scale=None, causal=False, dout=None):
    """Plain matmul-softmax-matmul in torch float64 autograd.

    Returns numpy ``out, weights, lse`` and, when ``dout`` is given, ``dq, dk, dv``.
    """
    qt, kt, vt = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (qt @ kt.transpose(-1, -2)) * scale
    allowed = torch.ones(s.shape, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & torch.from_numpy(np.asarray(mask))
    if causal:
        allowed = allowed & torch_causal(q.shape[-2], k.shape[-2])
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows that are all -inf
    # Rows with nothing allowed: softmax a row of zeros instead (no NaN anywhere), then the
    # multiplication by `allowed` zeroes them; their gradient is then exactly 0 as well.
    nonempty = allowed.any(dim=-1, keepdim=True)
    p = torch.softmax(torch.where(nonempty, s, torch.zeros_like(s)), dim=-1) * allowed
    out = p @ vt
    result = [out.detach().numpy(), p.detach().numpy(), lse.detach().numpy()]
    if dout is not None:
        out.backward(torch.from_numpy(dout))
        result += [qt.grad.numpy(), kt.grad.numpy(), vt.grad.numpy()]
    return result


def make_mask(rng, shape, n_empty: int) -> np.ndarray:
    """Random bool mask (True = may attend) with ``n_empty`` fully masked query rows."""
    mask = rng.random(shape) < 0.7
    rows = mask.reshape(-1, shape[-2], shape[-1])
    for n in range(min(n_empty, rows.shape[0] * shape[-2])):
        rows[n % rows.shape[0], (3 * n + 1) % shape[-2], :] = False
    return rows.reshape(shape)


def qkv_inputs(rng, lead, tq, tk, d, dv):
    q = rng.standard_normal((*lead, tq, d))
    k = rng.standard_normal((*lead, tk, d))
    v = rng.standard_normal((*lead, tk, dv))
    return q, k, v


# --------------------------------------------------------------------------- vs torch

SHAPES = [
    pytest.param((), 1, 7, 8, 8, id="Tq=1"),
    pytest.param((), 5, 9, 16, 4, id="Tq<Tk"),
    pytest.param((), 9, 5, 16, 4, id="Tq>Tk"),
    pytest.param((3,), 6, 6, 59, 7, id="D=59"),
    pytest.param((2, 3), 97, 113, 59, 17, id="lead=(2,3),Tq=97,Tk=113"),
    pytest.param((2, 3), 113, 97, 16, 16, id="lead=(2,3),Tq=113,Tk=97"),
]
MASK_KINDS = ["none", "mask", "causal", "causal+mask"]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize(("lead", "tq", "tk", "d", "dv"), SHAPES)
def test_forward_and_backward_match_torch(lead, tq, tk, d, dv, kind):
    rng = np.random.default_rng(zlib.crc32(repr((lead, tq, tk, d, dv, kind)).encode()))
    q, k, v = qkv_inputs(rng, lead, tq, tk, d, dv)
    mask = make_mask(rng, (*lead, tq, tk), n_empty=3 if tq > 1 else 0) if "mask" in kind else None
    causal = "causal" in kind
    dout = rng.standard_normal((*lead, tq, dv))

    out, cache = attention_forward(q, k, v, mask=mask, causal=causal)
    dq, dk, dv_ = attention_backward(dout, cache)
    t_out, t_p, t_lse, t_dq, t_dk, t_dv = torch_reference(q, k, v, mask, None, causal, dout)

    assert out.dtype == np.float64
    assert rel_err(out, t_out) < 1e-12
    assert rel_err(cache.weights, t_p) < 1e-12
    assert rel_err(cache.lse, t_lse) < 1e-12
    for mine, theirs, x in ((dq, t_dq, q), (dk, t_dk, k), (dv_, t_dv, v)):
        assert mine.shape == x.shape
        assert rel_err(mine, theirs) < 1e-10

    # The cases meant to contain rows that see nothing really do, and those rows are 0.
    empty = ~np.any(cache.weights > 0, axis=-1)  # (..., Tq)
    if (kind == "mask" and tq > 1) or (causal and tq > tk):
        assert empty.any()
    assert np.all(out[empty] == 0)
    assert np.all(dq[np.broadcast_to(empty[..., None], dq.shape)] == 0)
    assert np.all(np.isneginf(cache.lse[empty]))
    assert np.all(np.isfinite(cache.lse[~empty]))


@pytest.mark.parametrize("scale", [0.37, 2.5, -1.0, 0.0])
def test_explicit_scale_is_applied_to_scores_before_softmax(scale):
    rng = np.random.default_rng(1)
    q, k, v = qkv_inputs(rng, (2,), 4, 6, 5, 3)
    mask = make_mask(rng, (2, 4, 6), n_empty=1)
    dout = rng.standard_normal((2, 4, 3))
    out, cache = attention_forward(q, k, v, mask=mask, scale=scale)
    t_out, t_p, t_lse, t_dq, t_dk, t_dv = torch_reference(q, k, v, mask, scale, False, dout)
    assert cache.scale == scale
    assert rel_err(out, t_out) < 1e-12
    assert rel_err(cache.weights, t_p) < 1e-12
    for mine, theirs in zip(attention_backward(dout, cache), (t_dq, t_dk, t_dv), strict=True):
        assert rel_err(mine, theirs) < 1e-10
    if scale == 0.0:  # every allowed key equally likely
        counts = mask.sum(axis=-1, keepdims=True)
        expected = np.divide(mask, counts, out=np.zeros(mask.shape), where=counts > 0)
        np.testing.assert_allclose(cache.weights, expected, rtol=1e-15, atol=0)


def test_broadcast_leading_dims_and_mask():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 3, 5, 4))
    k = rng.standard_normal((3, 7, 4))  # missing the leading 2
    v = rng.standard_normal((1, 3, 7, 6))  # a stretched length-1 dim
    mask = rng.random((2, 1, 1, 7)) < 0.6  # padding-style, broadcast over heads and queries
    mask[0, 0, 0, :] = False  # every query of batch 0 sees nothing
    dout = rng.standard_normal((2, 3, 5, 6))
    out, cache = attention_forward(q, k, v, mask=mask)
    dq, dk, dv = attention_backward(dout, cache)
    t_out, t_p, _, t_dq, t_dk, t_dv = torch_reference(q, k, v, mask, None, False, dout)
    assert out.shape == (2, 3, 5, 6)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert rel_err(out, t_out) < 1e-12
    assert rel_err(cache.weights, t_p) < 1e-12
    assert np.all(out[0] == 0)
    for mine, theirs in zip((dq, dk, dv), (t_dq, t_dk, t_dv), strict=True):
        assert rel_err(mine, theirs) < 1e-10


# --------------------------------------------------------------------------- vs finite differences

GRAD_CASES = [
    pytest.param(3, 4, "none", id="plain"),
    pytest.param(3, 4, "mask", id="mask-with-empty-row"),
    pytest.param(4, 2, "causal", id="causal-Tq>Tk"),
    pytest.param(2, 5, "causal+mask", id="causal+mask-Tq<Tk"),
    pytest.param(1, 3, "causal", id="Tq=1"),
]


@pytest.mark.parametrize(("tq", "tk", "kind"), GRAD_CASES)
def test_backward_matches_numerical_gradient(tq, tk, kind):
    rng = np.random.default_rng(tq * 10 + tk)
    q, k, v = qkv_inputs(rng, (2,), tq, tk, 3, 2)
    mask = make_mask(rng, (2, tq, tk), n_empty=1) if "mask" in kind else None
    causal = "causal" in kind
    dout = rng.standard_normal((2, tq, 2))
    _, cache = attention_forward(q, k, v, mask=mask, causal=causal)
    grads = attention_backward(dout, cache)

    inputs = [q, k, v]
    for i, analytic in enumerate(grads):

        def loss(x, i=i):
            args = list(inputs)
            args[i] = x
            out, _ = attention_forward(*args, mask=mask, causal=causal)
            return np.sum(out * dout)

        assert check_gradient(loss, inputs[i], analytic) < 1e-8

    empty = ~cache.weights.any(axis=-1)  # (2, Tq)
    if kind in ("mask", "causal") and tq > 1:
        assert empty.any()
    assert np.all(grads[0][empty] == 0)  # dq rows of queries that see nothing: exactly 0
    unseen = ~cache.weights.any(axis=-2)  # (2, Tk), keys nobody attends to
    assert np.all(grads[1][unseen] == 0)
    assert np.all(grads[2][unseen] == 0)


# --------------------------------------------------------------------------- empty rows, causal


def test_empty_rows_are_zero_with_no_warnings_or_nan():
    rng = np.random.default_rng(3)
    q, k, v = qkv_inputs(rng, (2,), 4, 3, 5, 2)
    mask = np.ones((2, 4, 3), dtype=bool)
    mask[0, 1] = False  # one empty row in batch 0
    mask[1] = False  # batch 1 sees nothing at all
    out, cache = attention_forward(q, k, v, mask=mask)
    dq, dk, dv = attention_backward(np.ones_like(out), cache)
    for arr in (out, cache.weights, dq, dk, dv):
        assert np.all(np.isfinite(arr))
    assert np.all(out[0, 1] == 0) and np.all(out[1] == 0)
    assert np.all(cache.weights[0, 1] == 0) and np.all(cache.weights[1] == 0)
    assert np.isneginf(cache.lse[0, 1]) and np.all(np.isneginf(cache.lse[1]))
    assert np.all(np.isfinite(cache.lse[0, [0, 2, 3]]))
    assert np.all(dq[0, 1] == 0) and np.all(dq[1] == 0)
    assert np.all(dk[1] == 0) and np.all(dv[1] == 0)
    # Non-empty rows are still proper distributions.
    np.testing.assert_allclose(cache.weights[0, [0, 2, 3]].sum(-1), 1.0, rtol=1e-15)


def test_no_keys_at_all():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((3, 4))
    out, cache = attention_forward(q, np.zeros((0, 4)), np.zeros((0, 2)))
    assert out.shape == (3, 2) and np.all(out == 0)
    assert np.all(np.isneginf(cache.lse))
    dq, dk, dv = attention_backward(np.ones((3, 2)), cache)
    assert np.all(dq == 0) and dk.shape == (0, 4) and dv.shape == (0, 2)


# Bottom-right alignment, written out by hand (1 = may attend).
CAUSAL_PATTERNS = {
    (4, 4): [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],
    (2, 4): [[1, 1, 1, 0], [1, 1, 1, 1]],
    (4, 2): [[0, 0], [0, 0], [1, 0], [1, 1]],
    (1, 5): [[1, 1, 1, 1, 1]],
    (3, 1): [[0], [0], [1]],
}


@pytest.mark.parametrize(("tq", "tk"), list(CAUSAL_PATTERNS))
def test_causal_is_bottom_right_aligned(tq, tk):
    expected = np.array(CAUSAL_PATTERNS[(tq, tk)], dtype=bool)
    np.testing.assert_array_equal(causal_mask(tq, tk), expected)
    rng = np.random.default_rng(5)
    q, k, v = qkv_inputs(rng, (), tq, tk, 3, 3)
    out, cache = attention_forward(q, k, v, causal=True)
    np.testing.assert_array_equal(cache.weights > 0, expected)
    # causal=True is the same as passing that mask, and ANDs with a user mask.
    out_m, _ = attention_forward(q, k, v, mask=expected)
    np.testing.assert_array_equal(out, out_m)
    user = np.zeros((tq, tk), dtype=bool)
    user[:, 0] = True
    _, both = attention_forward(q, k, v, mask=user, causal=True)
    np.testing.assert_array_equal(both.weights > 0, expected & user)


# --------------------------------------------------------------------------- extreme magnitudes


def test_large_inputs_stay_finite_and_match_torch():
    rng = np.random.default_rng(6)
    q, k, v = (1e3 * x for x in qkv_inputs(rng, (2,), 6, 8, 4, 3))
    mask = make_mask(rng, (2, 6, 8), n_empty=1)
    dout = rng.standard_normal((2, 6, 3))
    out, cache = attention_forward(q, k, v, mask=mask)
    dq, dk, dv = attention_backward(dout, cache)
    t_out, t_p, t_lse, *t_grads = torch_reference(q, k, v, mask, None, False, dout)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(cache.weights))
    assert np.abs(cache.lse[np.isfinite(cache.lse)]).max() > 1e4  # scores really are huge
    assert rel_err(cache.weights, t_p) < 1e-8
    assert rel_err(out, t_out) < 1e-8
    assert rel_err(cache.lse, t_lse) < 1e-12
    for mine, theirs in zip((dq, dk, dv), t_grads, strict=True):
        assert np.all(np.isfinite(mine))
        assert rel_err(mine, theirs) < 1e-6


def test_each_row_uses_its_own_max():
    # Row 0's scores are (1, 2, 3); row 1's are (1000, 2000, 3000); row 2's (-1000, ...).
    # A single global max (3000) would underflow rows 0 and 2 to all zeros (then 0/0).
    q = np.array([[1.0], [1000.0], [-1000.0]])
    k = np.array([[1.0], [2.0], [3.0]])
    v = np.eye(3)
    out, cache = attention_forward(q, k, v, scale=1.0)
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(cache.weights[0], e / e.sum(), rtol=1e-15)
    np.testing.assert_allclose(cache.weights[1], [0.0, 0.0, 1.0], atol=1e-300)
    np.testing.assert_allclose(cache.weights[2], [1.0, 0.0, 0.0], atol=1e-300)
    np.testing.assert_allclose(out, cache.weights, rtol=1e-15)  # v = identity
    np.testing.assert_allclose(cache.lse[0], np.log(e.sum()), rtol=1e-15)
    np.testing.assert_allclose(cache.lse[1:], [3000.0, -1000.0], rtol=1e-15)


def test_masked_entry_does_not_set_the_row_max():
    # The hidden score (5000) must not act as the max, or the visible ones underflow to 0/0.
    q = np.array([[1.0]])
    k = np.array([[1.0], [2.0], [5000.0]])
    v = np.eye(3)
    mask = np.array([[True, True, False]])
    out, cache = attention_forward(q, k, v, mask=mask, scale=1.0)
    e = np.exp([1.0, 2.0])
    np.testing.assert_allclose(cache.weights[0], [*(e / e.sum()), 0.0], rtol=1e-15)
    np.testing.assert_allclose(cache.lse, [np.log(e.sum())], rtol=1e-15)


# --------------------------------------------------------------------------- softmax module


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_and_log_sum_exp_match_torch(axis):
    rng = np.random.default_rng(7)
    x = 30 * rng.standard_normal((4, 5, 6))
    where = rng.random(x.shape) < 0.6
    np.moveaxis(where, axis, -1)[1, 2, :] = False  # one empty row along `axis`
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(softmax(x, axis=axis), torch.softmax(xt, axis).numpy(), rtol=1e-13)
    np.testing.assert_allclose(
        log_sum_exp(x, axis=axis), torch.logsumexp(xt, axis).numpy(), rtol=1e-14
    )
    masked = xt.masked_fill(~torch.from_numpy(where), float("-inf"))
    t_lse = torch.logsumexp(masked, axis).numpy()
    t_p = torch.nan_to_num(torch.softmax(masked, axis), nan=0.0).numpy()
    p = softmax(x, axis=axis, where=where)
    assert np.all(p[~where] == 0)
    np.testing.assert_allclose(p, t_p, rtol=1e-13, atol=1e-300)
    lse = log_sum_exp(x, axis=axis, where=where)
    assert lse.shape == t_lse.shape
    np.testing.assert_array_equal(np.isneginf(lse), ~where.any(axis=axis))
    assert np.isneginf(lse).any()
    assert rel_err(lse, t_lse) < 1e-14


def test_softmax_edge_cases():
    x = np.array([[0.0, 1.0], [-np.inf, -np.inf], [1e308, 1e308]])
    p = softmax(x)
    np.testing.assert_array_equal(p[1], [0.0, 0.0])  # no allowed entry: zeros, not NaN
    np.testing.assert_allclose(p[2], [0.5, 0.5])
    np.testing.assert_allclose(log_sum_exp(x)[2], 1e308)
    assert np.isneginf(log_sum_exp(x)[1])
    assert softmax(np.array([1, 2, 3])).dtype == np.float64
    with pytest.raises(TypeError, match="where"):
        softmax(x, where=np.ones(x.shape, dtype=int))
    with pytest.raises(ValueError, match="where"):
        log_sum_exp(x, where=np.ones((3, 3), dtype=bool))


# --------------------------------------------------------------------------- gradcheck module


def test_numerical_gradient_and_check_gradient():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4))
    before = x.copy()

    def f(z):
        return np.sum(np.sin(z) * z)

    analytic = np.cos(x) * x + np.sin(x)
    num = numerical_gradient(f, x)
    assert num.shape == x.shape and num.dtype == np.float64
    np.testing.assert_allclose(num, analytic, rtol=1e-8, atol=1e-9)
    np.testing.assert_array_equal(x, before)  # x is not modified
    assert check_gradient(f, x, analytic) < 1e-9
    wrong = analytic.copy()
    wrong[1, 2] += 0.5
    assert check_gradient(f, x, wrong) > 1e-2
    assert check_gradient(lambda z: 3.0, x, np.zeros_like(x)) == 0.0
    with pytest.raises(ValueError, match="scalar"):
        numerical_gradient(lambda z: z, x)
    with pytest.raises(ValueError, match="shape"):
        check_gradient(f, x, analytic[:2])


# --------------------------------------------------------------------------- dtype and validation


def test_dtype_default_and_explicit():
    rng = np.random.default_rng(9)
    q, k, v = (x.astype(np.float32) for x in qkv_inputs(rng, (), 3, 4, 5, 2))
    out64, c64 = attention_forward(q, k, v)
    assert out64.dtype == np.float64 and c64.weights.dtype == np.float64
    out32, c32 = attention_forward(q, k, v, dtype=np.float32)
    assert out32.dtype == np.float32 and c32.lse.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=1e-5, atol=1e-6)
    assert all(g.dtype == np.float32 for g in attention_backward(np.ones_like(out32), c32))
    with pytest.raises(TypeError, match="dtype"):
        attention_forward(q, k, v, dtype=np.int64)
    out_int, _ = attention_forward(np.ones((2, 3), dtype=int), np.ones((4, 3), dtype=int), v)
    assert out_int.dtype == np.float64


def test_cache_contents():
    rng = np.random.default_rng(10)
    q, k, v = qkv_inputs(rng, (2,), 3, 4, 5, 2)
    mask = make_mask(rng, (2, 3, 4), n_empty=1)
    _, cache = attention_forward(q, k, v, mask=mask, causal=True)
    assert cache.scale == pytest.approx(1 / math.sqrt(5))
    assert cache.weights.shape == (2, 3, 4) and cache.lse.shape == (2, 3)
    np.testing.assert_array_equal(cache.allowed, mask & causal_mask(3, 4))
    assert cache["weights"] is cache.weights
    assert attention_forward(q, k, v)[1].allowed is None


def test_validation_errors():
    rng = np.random.default_rng(11)
    q, k, v = qkv_inputs(rng, (2,), 4, 5, 3, 2)
    with pytest.raises(TypeError, match="mask"):
        attention_forward(q, k, v, mask=np.ones((4, 5), dtype=int))
    with pytest.raises(TypeError, match="mask"):
        attention_forward(q, k, v, mask=np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"mask.*\(5, 5\).*\(2, 4, 5\)"):
        attention_forward(q, k, v, mask=np.ones((5, 5), dtype=bool))
    with pytest.raises(ValueError, match=r"mask.*\(3, 4, 5\)"):
        attention_forward(q, k, v, mask=np.ones((3, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match=r"q and k.*\(2, 4, 3\).*\(2, 5, 4\)"):
        attention_forward(q, rng.standard_normal((2, 5, 4)), v)
    with pytest.raises(ValueError, match=r"k and v.*\(2, 5, 3\).*\(2, 6, 2\)"):
        attention_forward(q, k, rng.standard_normal((2, 6, 2)))
    with pytest.raises(ValueError, match="leading"):
        attention_forward(q, rng.standard_normal((3, 5, 3)), v)
    with pytest.raises(ValueError, match=r"q must have shape"):
        attention_forward(q[0, 0], k, v)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="scale"):
            attention_forward(q, k, v, scale=bad)
    _, cache = attention_forward(q, k, v)
    with pytest.raises(ValueError, match="dout"):
        attention_backward(np.ones((2, 4, 3)), cache)


def test_nan_input_propagates_instead_of_becoming_an_empty_row():
    # An empty row's output is 0 by definition; a NaN input must not masquerade as one.
    rng = np.random.default_rng(12)
    q, k, v = qkv_inputs(rng, (), 4, 5, 3, 2)
    q[2, 1] = np.nan
    out, cache = attention_forward(q, k, v)
    assert np.all(np.isnan(out[2])) and np.isnan(cache.lse[2])
    assert np.all(np.isfinite(np.delete(out, 2, axis=0)))
    assert np.all(np.isnan(softmax(np.array([1.0, np.nan]))))
