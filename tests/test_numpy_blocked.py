"""qkv.numpy.blocked (FlashAttention's tiled algorithm) against the plain NumPy attention:
same outputs, log-sum-exp and gradients for block sizes that do and do not divide the
lengths, with masks, causal masking and empty rows; plus the two properties that make it
worth having: it skips hidden tiles and never holds the full score matrix."""

from __future__ import annotations

import tracemalloc
import zlib

import numpy as np
import pytest

from qkv.numpy import (
    attention_backward,
    attention_forward,
    blocked_attention_backward,
    blocked_attention_forward,
)

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


@pytest.fixture(autouse=True)
def _numpy_fp_errors_raise():
    with np.errstate(all="raise", under="ignore"):  # underflow to 0 is by design in softmax
        yield


def rel_err(actual, expected, floor: float = 1e-300) -> float:
    """Norm-based relative error; the arrays must agree on shape and on where they are -inf.

    ``floor`` bounds the denominator from below, for gradients whose true value is 0 (a lone
    key's softmax is constant, say) and where both sides are rounding noise.
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), finite)
    np.testing.assert_array_equal(actual[~finite], expected[~finite])
    a, e = actual[finite], expected[finite]
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(a), np.linalg.norm(e), floor))


def make_inputs(seed, lead, tq, tk, d, dv, kind):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((*lead, tq, d))
    k = rng.standard_normal((*lead, tk, d))
    v = rng.standard_normal((*lead, tk, dv))
    dout = rng.standard_normal((*lead, tq, dv))
    mask = None
    if "mask" in kind:
        mask = rng.random((*lead, tq, tk)) < 0.7
        mask[..., tq // 2, :] = False  # a query that sees nothing
        if tk > 20:
            mask[..., :, 3:19] = False  # a hidden band: whole tiles of small blocks are empty
    return q, k, v, dout, mask


CASES = [
    # (lead, Tq, Tk, D, Dv, block_q, block_k)
    pytest.param((2,), 97, 97, 8, 8, 16, 32, id="T=97,blocks=16x32"),
    pytest.param((2,), 97, 97, 8, 8, 32, 16, id="T=97,blocks=32x16"),
    pytest.param((2,), 64, 64, 8, 8, 16, 16, id="T=64,blocks divide"),
    pytest.param((), 1, 1, 4, 4, 16, 16, id="T=1"),
    pytest.param((), 1, 40, 4, 3, 8, 8, id="Tq=1"),
    pytest.param((3,), 37, 53, 6, 5, 8, 16, id="Tq<Tk"),
    pytest.param((3,), 53, 37, 6, 5, 16, 8, id="Tq>Tk"),
    pytest.param((2, 2), 10, 12, 4, 4, 64, 64, id="blocks>T"),
    pytest.param((), 9, 11, 3, 2, 1, 1, id="blocks=1"),
]
MASK_KINDS = ["none", "mask", "causal", "causal+mask"]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize(("lead", "tq", "tk", "d", "dv", "block_q", "block_k"), CASES)
def test_blocked_equals_plain(lead, tq, tk, d, dv, block_q, block_k, kind):
    seed = zlib.crc32(repr((lead, tq, tk, block_q, block_k, kind)).encode())
    q, k, v, dout, mask = make_inputs(seed, lead, tq, tk, d, dv, kind)
    causal = "causal" in kind
    blocks = {"block_q": block_q, "block_k": block_k}

    out_ref, cache = attention_forward(q, k, v, mask=mask, causal=causal)
    grads_ref = attention_backward(dout, cache)
    out, lse = blocked_attention_forward(q, k, v, mask=mask, causal=causal, **blocks)
    grads = blocked_attention_backward(dout, q, k, v, out, lse, mask, None, causal, **blocks)

    assert out.shape == out_ref.shape and lse.shape == (*lead, tq)
    assert rel_err(out, out_ref) < 1e-10
    assert rel_err(lse, cache.lse) < 1e-10
    for mine, ref, x in zip(grads, grads_ref, (q, k, v), strict=True):
        assert mine.shape == x.shape
        assert rel_err(mine, ref, floor=1e-4) < 1e-10

    empty = np.isneginf(cache.lse)  # (..., Tq) queries that see nothing
    if "mask" in kind or (causal and tq > tk):
        assert empty.any()
    assert np.all(out[empty] == 0)
    assert np.all(grads[0][empty] == 0)


def test_backward_blocks_may_differ_from_forward_and_leading_dims_broadcast():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 3, 29, 5))
    k = rng.standard_normal((3, 31, 5))
    v = rng.standard_normal((1, 3, 31, 4))
    mask = rng.random((2, 1, 1, 31)) < 0.8  # padding-style mask, broadcast
    dout = rng.standard_normal((2, 3, 29, 4))
    out_ref, cache = attention_forward(q, k, v, mask=mask, causal=True, scale=0.3)
    out, lse = blocked_attention_forward(
        q, k, v, mask=mask, causal=True, scale=0.3, block_q=7, block_k=5
    )
    grads = blocked_attention_backward(
        dout, q, k, v, out, lse, mask=mask, causal=True, scale=0.3, block_q=4, block_k=9
    )
    assert rel_err(out, out_ref) < 1e-10
    for mine, ref in zip(grads, attention_backward(dout, cache), strict=True):
        assert rel_err(mine, ref) < 1e-10
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_empty_rows_out_zero_lse_minus_inf_zero_grads():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 6, 3))
    k = rng.standard_normal((2, 4, 3))
    v = rng.standard_normal((2, 4, 2))
    mask = np.ones((2, 6, 4), dtype=bool)
    mask[1] = False  # batch 1: nobody sees anything
    # causal with Tq = 6 > Tk = 4: queries 0 and 1 see nothing either.
    out, lse = blocked_attention_forward(q, k, v, mask=mask, causal=True, block_q=4, block_k=4)
    dq, dk, dv = blocked_attention_backward(
        np.ones_like(out), q, k, v, out, lse, mask=mask, causal=True, block_q=4, block_k=4
    )
    for arr in (out, dq, dk, dv):
        assert np.all(np.isfinite(arr))
    assert np.all(np.isneginf(lse[0, :2])) and np.all(np.isfinite(lse[0, 2:]))
    assert np.all(np.isneginf(lse[1]))
    assert np.all(out[0, :2] == 0) and np.all(out[1] == 0)
    assert np.all(dq[0, :2] == 0) and np.all(dq[1] == 0)
    assert np.all(dk[1] == 0) and np.all(dv[1] == 0)
    assert np.abs(dq[0, 2:]).max() > 0


def test_causal_skips_key_blocks_beyond_the_diagonal():
    # Keys 32.. are poisoned with NaN.  Query block 0 (rows 0..31) cannot see them under
    # causal masking.  If their tiles are skipped, and not merely masked (0 * NaN = NaN,
    # and -inf masking does not help a NaN that arrives through V or K in a product), rows
    # 0..31 of out, lse and dq stay finite and equal the 32 x 32 sub-problem's.
    rng = np.random.default_rng(3)
    q, k, v, dout = (rng.standard_normal((64, 4)) for _ in range(4))
    blocks = {"block_q": 32, "block_k": 32}
    out_clean, lse_clean = blocked_attention_forward(q, k, v, causal=True, **blocks)
    v_bad, k_bad = v.copy(), k.copy()
    v_bad[32:] = np.nan  # would reach out through P @ V in the forward
    k_bad[32:] = np.nan  # would reach dq through dS @ K in the backward
    with np.errstate(invalid="ignore"):
        out, lse = blocked_attention_forward(q, k, v_bad, causal=True, **blocks)
        dq, _, _ = blocked_attention_backward(
            dout, q, k_bad, v, out_clean, lse_clean, causal=True, **blocks
        )
    # The poison is real: the later rows, which do see keys 32.., are NaN.
    assert np.all(np.isnan(out[32:])) and np.all(np.isnan(dq[32:]))

    ref_out, cache = attention_forward(q[:32], k[:32], v[:32], causal=True)
    ref_dq, _, _ = attention_backward(dout[:32], cache)
    assert rel_err(out[:32], ref_out) < 1e-10
    assert rel_err(lse[:32], cache.lse) < 1e-10
    assert rel_err(dq[:32], ref_dq) < 1e-10


def test_user_mask_hiding_a_whole_tile_skips_it():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((8, 3)) for _ in range(3))
    v[4:] = np.nan
    mask = np.ones((8, 8), dtype=bool)
    mask[:4, 4:] = False  # queries 0..3 may not see keys 4..7: that tile is hidden
    with np.errstate(invalid="ignore"):
        out, _ = blocked_attention_forward(q, k, v, mask=mask, block_q=4, block_k=4)
    assert np.all(np.isfinite(out[:4]))
    ref, _ = attention_forward(q[:4], k[:4], v[:4])
    assert rel_err(out[:4], ref) < 1e-10


def test_never_holds_the_full_score_matrix():
    # numpy reports its allocations to tracemalloc.  A (T, T) float64 matrix is 8 MiB here;
    # a (64, 64) tile is 32 KiB, and the (T, D) arrays 64 KiB each.
    rng = np.random.default_rng(5)
    t, d = 1024, 8
    q, k, v = (rng.standard_normal((t, d)) for _ in range(3))
    mask = rng.random((t, t)) < 0.9
    full = t * t * 8

    def peak(fn) -> int:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    plain = peak(lambda: attention_forward(q, k, v, mask=mask, causal=True))
    assert plain > full  # the reference does build it (so the measurement works)
    out, lse = blocked_attention_forward(q, k, v, mask=mask, causal=True)
    fwd = peak(lambda: blocked_attention_forward(q, k, v, mask=mask, causal=True))
    bwd = peak(
        lambda: blocked_attention_backward(
            np.ones_like(out), q, k, v, out, lse, mask=mask, causal=True
        )
    )
    assert fwd < full / 8
    assert bwd < full / 8


def test_validation_errors():
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((4, 3)) for _ in range(3))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="block_q"):
            blocked_attention_forward(q, k, v, block_q=bad)
        with pytest.raises(ValueError, match="block_k"):
            blocked_attention_forward(q, k, v, block_k=bad)
    with pytest.raises(TypeError, match="mask"):
        blocked_attention_forward(q, k, v, mask=np.ones((4, 4)))
    with pytest.raises(ValueError, match=r"mask.*\(3, 4\)"):
        blocked_attention_forward(q, k, v, mask=np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match=r"q and k.*\(4, 3\).*\(4, 2\)"):
        blocked_attention_forward(q, k[:, :2], v)
    with pytest.raises(ValueError, match=r"k and v.*\(4, 3\).*\(5, 3\)"):
        blocked_attention_forward(q, k, np.ones((5, 3)))
    with pytest.raises(ValueError, match="scale"):
        blocked_attention_forward(q, k, v, scale=float("nan"))
    out, lse = blocked_attention_forward(q, k, v)
    with pytest.raises(ValueError, match="lse"):
        blocked_attention_backward(out, q, k, v, out, lse[:3])
    with pytest.raises(ValueError, match="dout"):
        blocked_attention_backward(out[:, :2], q, k, v, out, lse)
    with pytest.raises(ValueError, match="out"):
        blocked_attention_backward(out, q, k, v, out[:3], lse)


def test_nan_input_propagates_instead_of_becoming_an_empty_row():
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((6, 3)) for _ in range(3))
    q[2, 1] = np.nan
    out, lse = blocked_attention_forward(q, k, v, block_q=2, block_k=4)
    assert np.all(np.isnan(out[2])) and np.isnan(lse[2])
    assert np.all(np.isfinite(np.delete(out, 2, axis=0)))
