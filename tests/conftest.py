"""Shared test helpers: the one dtype tolerance table and the float64 NumPy truth.

Correctness follows flash-attention's tests: the truth is computed in float64 by the
independent NumPy implementation (qkv.numpy); a kernel run in dtype X may be at most
`FACTOR` times as far from the truth as plain attention computed in X, plus `ATOL[X]`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

import qkv

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")

# The one tolerance table: absolute slack per dtype on top of FACTOR × baseline error.
ATOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 3e-2,  # bf16 gradients vary with the thread count by ~1e-2
    torch.float16: 2e-3,
}
FACTOR = 3.0
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, treating matching infinities as equal."""
    a, b = a.detach().double(), b.detach().double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(same_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_close(got, truth, baseline, dtype, what: str) -> None:
    """|got - truth| <= FACTOR * |baseline - truth| + ATOL[dtype] + eps(dtype) * max|truth|
    (max over elements).

    The last term is one unit of rounding of the largest value: storing the exact result
    in `dtype` may cost that much, even where the baseline happened to round luckily
    (float16 gradients of size 4 are spaced 0.004 apart, above ATOL).
    """
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert not torch.isnan(got).any(), f"{what}: NaN"
    err = max_err(got, truth)
    base = max_err(baseline, truth) if baseline is not None else 0.0
    finite = truth.detach().double()
    finite = finite[torch.isfinite(finite)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    bound = FACTOR * base + ATOL[dtype] + torch.finfo(dtype).eps * scale
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (baseline {base:.3g})"


def make_qkv(shape, dtype, seed=0, scale=1.0):
    """Random q (B,Hq,Tq,D), k (B,Hkv,Tk,D), v (B,Hkv,Tk,Dv), rounded to `dtype`."""
    B, Hq, Hkv, Tq, Tk, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g, dtype=torch.float64) * scale
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=torch.float64) * scale
    v = torch.randn(B, Hkv, Tk, Dv, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def numpy_truth(q, k, v, allowed=None, scale=None, dout=None):
    """float64 truth from qkv.numpy: out, weights, lse and (with dout) dq, dk, dv.

    Grouped-query heads are expanded (query head h uses kv head h // group) and the
    gradients of the shared kv heads summed back.
    """
    qn, kn, vn = (t.detach().double().numpy() for t in (q, k, v))
    group = qn.shape[1] // kn.shape[1]
    kn, vn = np.repeat(kn, group, axis=1), np.repeat(vn, group, axis=1)
    mask = None if allowed is None else allowed.detach().cpu().numpy()
    out, cache = qkv.numpy.attention_forward(qn, kn, vn, mask=mask, scale=scale)
    result = {
        "out": torch.from_numpy(out),
        "weights": torch.from_numpy(np.ascontiguousarray(cache.weights)),
        "lse": torch.from_numpy(np.ascontiguousarray(cache.lse)),
    }
    if dout is not None:
        dq, dk, dv = qkv.numpy.attention_backward(dout.detach().double().numpy(), cache)
        B, Hq, Tk = kn.shape[0], kn.shape[1], kn.shape[2]
        dk = dk.reshape(B, Hq // group, group, Tk, -1).sum(2)
        dv = dv.reshape(B, Hq // group, group, Tk, -1).sum(2)
        result.update(dq=torch.from_numpy(dq), dk=torch.from_numpy(dk), dv=torch.from_numpy(dv))
    return result


def naive_attention(q, k, v, allowed=None, scale=None, bias=None):
    """Plain attention computed entirely in the inputs' dtype: the baseline for tolerances."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v, p


def naive_lse(q, k, allowed=None, scale=None):
    """Log-sum-exp of the scores computed in the inputs' dtype: the baseline for lse."""
    group = q.shape[1] // k.shape[1]
    k = k.detach().repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.detach() @ k.transpose(-2, -1)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.logsumexp(s, dim=-1)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids OpenMP contention on a shared machine (and is faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn64(*shape, seed=0):
    """float64 standard normal values from their own seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
