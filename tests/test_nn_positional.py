"""Positional encodings against the papers' formulas, written here independently in NumPy.

Sinusoidal (Vaswani et al. 2017), learned, RoPE (Su et al. 2021) and ALiBi (Press et al.
2022): values, the relative-position properties each exists for, and the offsets that
decoding with a KV cache relies on.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import qkv
from conftest import assert_close, naive_attention
from qkv.nn.positional import (
    ALiBi,
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)

# ---- sinusoidal ---------------------------------------------------------------------------


def paper_pe(positions, E, base=10000.0):
    """§3.5: PE(pos, 2i) = sin(pos / base^(2i/E)), PE(pos, 2i+1) = cos(pos / base^(2i/E))."""
    pe = np.zeros((len(positions), E))
    for r, pos in enumerate(positions):
        for d in range(E):
            i = d // 2
            angle = pos / base ** (2 * i / E)
            pe[r, d] = math.sin(angle) if d % 2 == 0 else math.cos(angle)
    return pe


@pytest.mark.parametrize("E", [16, 7])
def test_sinusoidal_matches_paper_formula(E):
    enc = SinusoidalPositionalEncoding(E, max_len=64)
    x = torch.zeros(2, 40, E, dtype=torch.float64)
    got = enc(x)  # float64: computed on the fly
    want = torch.from_numpy(paper_pe(range(40), E))
    assert torch.allclose(got[0], want, atol=1e-12, rtol=0)
    assert torch.equal(got[0], got[1])
    # the float32 table agrees to float32 rounding
    got32 = enc(x.float())
    assert got32.dtype == torch.float32
    assert torch.allclose(got32[0].double(), want, atol=1e-6, rtol=0)


def test_sinusoidal_adds_to_x_with_offset_and_beyond_max_len():
    enc = SinusoidalPositionalEncoding(8, max_len=10, base=100.0)
    x = torch.randn(3, 6, 8)
    for offset in (0, 4, 7, 50):  # 7 and 50 run past the 10 precomputed positions
        want = x.double() + torch.from_numpy(paper_pe(range(offset, offset + 6), 8, base=100.0))
        got = enc(x, offset=offset)
        assert torch.allclose(got.double(), want, atol=1e-5, rtol=0), offset
    # step-by-step positions equal the full pass
    full = enc(x)
    steps = torch.cat([enc(x[:, t : t + 1], offset=t) for t in range(6)], dim=1)
    assert torch.equal(full, steps)


def test_sinusoidal_shift_is_a_rotation_independent_of_position():
    """PE(pos + k) = M_k PE(pos) with M_k block-diagonal 2×2 rotations (angle-sum formulas)."""
    E, base = 12, 10000.0
    enc = SinusoidalPositionalEncoding(E, max_len=256)
    pe = enc(torch.zeros(1, 256, E, dtype=torch.float64))[0].numpy()  # (256, E)
    omega = 1.0 / base ** (np.arange(0, E, 2) / E)
    for k in (1, 5, 37):
        M = np.zeros((E, E))
        for i, w in enumerate(omega):
            c, s = math.cos(k * w), math.sin(k * w)
            # [sin(a+b), cos(a+b)] = [[cos b, sin b], [-sin b, cos b]] @ [sin a, cos a]
            M[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[c, s], [-s, c]]
        assert np.allclose(M @ M.T, np.eye(E), atol=1e-12)  # a rotation
        np.testing.assert_allclose(pe[:-k] @ M.T, pe[k:], atol=1e-12)
        # consequence: PE(pos)·PE(pos + k) is the same for every pos
        dots = np.einsum("te,te->t", pe[:-k], pe[k:])
        np.testing.assert_allclose(dots, dots[0], atol=1e-12)


def test_sinusoidal_validation():
    enc = SinusoidalPositionalEncoding(8)
    with pytest.raises(ValueError, match="embed_dim=8"):
        enc(torch.zeros(1, 3, 6))
    with pytest.raises(ValueError, match=r"\(B, T, E\)"):
        enc(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="offset"):
        enc(torch.zeros(1, 3, 8), offset=-1)
    with pytest.raises(ValueError, match="dropout"):
        SinusoidalPositionalEncoding(8, dropout=1.5)


# ---- learned ------------------------------------------------------------------------------


def test_learned_adds_rows_and_refuses_positions_beyond_max_len():
    emb = LearnedPositionalEmbedding(10, 4)
    x = torch.randn(2, 3, 4)
    assert torch.equal(emb(x, offset=7), x + emb.weight[7:10])
    with pytest.raises(ValueError, match="max_len=10"):
        emb(x, offset=8)  # positions 8, 9, 10
    with pytest.raises(ValueError, match="max_len=10"):
        emb(torch.randn(1, 11, 4))
    # gradients reach only the rows used
    emb(x, offset=2).sum().backward()
    used = emb.weight.grad.abs().sum(-1) != 0
    assert used.tolist() == [False, False, True, True, True] + [False] * 5


# ---- RoPE ---------------------------------------------------------------------------------


def complex_rope(x, positions, base=10000.0):
    """Independent RoPE: pair k = (x[k], x[k + D/2]) as the complex x[k] + i·x[k + D/2],
    multiplied by e^{i·m·θ_k}, θ_k = base^(-2k/D). x (..., T, D) float64 NumPy."""
    D = x.shape[-1]
    theta = base ** (-np.arange(D // 2) * 2.0 / D)  # (D/2,)
    z = x[..., : D // 2] + 1j * x[..., D // 2 :]  # (..., T, D/2)
    z = z * np.exp(1j * np.asarray(positions, dtype=np.float64)[..., :, None] * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_equals_complex_multiplication_float64():
    rope = RotaryEmbedding(10, max_positions=16)
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    for offset in (0, 5, 100):  # 100 is past the cache
        got = rope(x, offset=offset)
        want = complex_rope(x.numpy(), np.arange(offset, offset + 9))
        np.testing.assert_allclose(got.numpy(), want, atol=1e-12, rtol=0)


def test_rope_score_depends_only_on_relative_position():
    rope = RotaryEmbedding(16)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)

    def score(m, n):
        return float((rope(q, offset=m) * rope(k, offset=n)).sum())

    by_shift = {}
    for shift in (-7, -1, 0, 3, 40):
        values = [score(n + shift, n) for n in (50, 51, 200, 3000, 5000)]
        np.testing.assert_allclose(values, values[0], atol=1e-10)
        by_shift[shift] = values[0]
    # and it does depend on the shift (the test would pass for a constant otherwise)
    assert len({round(v, 6) for v in by_shift.values()}) == len(by_shift)
    assert by_shift[0] == pytest.approx(float((q * k).sum()))


def test_rope_single_step_with_offset_equals_full_rotation():
    """KV-cache decoding rotates one new token at position t; it must match the full pass."""
    rope = RotaryEmbedding(8, max_positions=32)
    x = torch.randn(2, 3, 12, 8)
    full = rope(x)
    for t in range(12):
        assert torch.equal(rope(x[:, :, t : t + 1], offset=t), full[:, :, t : t + 1])
    assert torch.equal(rope(x[:, :, 5:], offset=5), full[:, :, 5:])


def test_rope_preserves_norms_shape_and_dtype():
    rope = RotaryEmbedding(32)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.randn(2, 4, 7, 32, dtype=torch.float64).to(dtype)
        y = rope(x, offset=3)
        assert y.shape == x.shape and y.dtype == dtype
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
        # every pair keeps its length, so the whole vector does too
        pair_norm = lambda t: t[..., :16].double() ** 2 + t[..., 16:].double() ** 2  # noqa: E731
        assert torch.allclose(pair_norm(y), pair_norm(x), atol=tol * 10, rtol=tol)
        want = torch.from_numpy(complex_rope(x.double().numpy(), np.arange(3, 10)))
        baseline = want.to(dtype)  # the best the dtype can hold
        assert_close(y, want, baseline, dtype, f"rope {dtype}")


def test_rope_per_sequence_tensor_offsets():
    rope = RotaryEmbedding(8, max_positions=64)
    x = torch.randn(3, 2, 5, 8, dtype=torch.float64)
    offsets = torch.tensor([0, 17, 4100])  # the last one far beyond max_positions
    got = rope(x, offset=offsets)
    for b, o in enumerate(offsets.tolist()):
        want = complex_rope(x[b].numpy(), np.arange(o, o + 5))
        np.testing.assert_allclose(got[b].numpy(), want, atol=1e-12, rtol=0)
        assert torch.equal(got[b : b + 1], rope(x[b : b + 1], offset=o))
    # float32: tensor offsets (computed) and int offsets (cached) agree
    x32 = x.float()
    got32 = rope(x32, offset=torch.tensor([0, 17, 40]))
    for b, o in enumerate([0, 17, 40]):
        assert torch.allclose(got32[b : b + 1], rope(x32[b : b + 1], offset=o), atol=1e-6)


def test_rope_beyond_cache_matches_bigger_cache():
    small, big = RotaryEmbedding(8, max_positions=4), RotaryEmbedding(8, max_positions=64)
    x = torch.randn(1, 2, 20, 8)
    assert torch.allclose(small(x, offset=10), big(x, offset=10), atol=1e-6)


def test_rope_validation():
    with pytest.raises(ValueError, match="head_dim must be even"):
        RotaryEmbedding(7)
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match="head_dim=8"):
        rope(torch.randn(1, 1, 3, 6))
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        rope(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"\(B,\)=\(2,\)"):
        rope(torch.randn(2, 1, 3, 8), offset=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="offset"):
        rope(torch.randn(2, 1, 3, 8), offset=torch.tensor([1.0, 2.0]))


# ---- ALiBi --------------------------------------------------------------------------------


def test_alibi_slopes_power_of_two():
    assert ALiBi(8).slopes.tolist() == [1 / 2**h for h in range(1, 9)]
    assert ALiBi(4).slopes.tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256]


def paper_slopes(n):
    """Press et al. §3: geometric from 2^(-8/n) with that ratio; for n not a power of two,
    the slopes of the closest power of two below n, then every other slope of 2× that power."""
    if math.log2(n).is_integer():
        start = 2 ** (-8 / n)  # the first slope is also the ratio
        return [start * start**h for h in range(n)]
    p = 2 ** math.floor(math.log2(n))
    return paper_slopes(p) + paper_slopes(2 * p)[::2][: n - p]


@pytest.mark.parametrize("n", [6, 12, 3, 1, 16])
def test_alibi_slopes_follow_paper_rule(n):
    np.testing.assert_allclose(ALiBi(n).slopes.numpy(), paper_slopes(n), rtol=1e-6)


def test_alibi_slopes_six_heads_literal():
    # 4 heads: 1/4, 1/16, 1/64, 1/256; then from 8 heads' 1/2, 1/4, ..., every other: 1/2, 1/8
    assert ALiBi(6).slopes.tolist() == [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]


@pytest.mark.parametrize("Tq,Tk", [(5, 5), (3, 7), (1, 9)])
def test_alibi_bias_formula_bottom_right(Tq, Tk):
    alibi = ALiBi(3)
    got = alibi(Tq, Tk)
    assert got.shape == (1, 3, Tq, Tk) and got.dtype == torch.float32
    slopes = paper_slopes(3)
    want = torch.tensor(
        [
            [[-slopes[h] * abs(i + Tk - Tq - j) for j in range(Tk)] for i in range(Tq)]
            for h in range(3)
        ]
    )
    assert torch.allclose(got[0], want, atol=1e-6)
    # the last Tq rows of the square bias: what a KV cache of Tk keys needs
    assert torch.equal(got, alibi(Tk, Tk)[:, :, Tk - Tq :])
    assert alibi(Tq, Tk, dtype=torch.float64).dtype == torch.float64


def test_alibi_through_qkv_attention_causal_and_cached():
    H, T, D = 4, 9, 8
    alibi = ALiBi(H)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    bias = alibi(T, T, dtype=torch.float64)
    out = qkv.attention(q, k, v, bias=bias, causal=True)
    assert torch.isfinite(out).all()
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    want, _ = naive_attention(q, k, v, allowed=allowed, bias=bias)
    assert torch.allclose(out, want, atol=1e-12)
    # decoding the last token against the cache gives the last row of the full pass
    step = qkv.attention(q[:, :, -1:], k, v, bias=alibi(1, T, dtype=torch.float64), causal=True)
    assert torch.allclose(step, out[:, :, -1:], atol=1e-12)
    # and the bias matters: without it the result differs
    assert not torch.allclose(qkv.attention(q, k, v, causal=True), out, atol=1e-3)


def test_alibi_validation():
    with pytest.raises(ValueError, match="num_heads"):
        ALiBi(0)
    with pytest.raises(ValueError, match="Tk"):
        ALiBi(2)(3, -1)
