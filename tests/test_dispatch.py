"""Kernel dispatch (which kernel runs and why) and dropout (reproducible, unbiased)."""

from __future__ import annotations

import pytest
import torch

import qkv
from conftest import make_qkv
from qkv import masks


@pytest.fixture
def inputs():
    return make_qkv((2, 4, 2, 16, 16, 8, 8), torch.float32)


@pytest.mark.parametrize(
    "options,kernel,why",
    [
        ({}, "fused", "fastest"),
        ({"causal": True}, "fused", "fastest"),
        ({"mask": masks.window(3)}, "fused", "fastest"),
        ({"return_weights": True}, "reference", "carry no gradient"),
        ({"return_lse": True}, "tiled", "log-sum-exp"),
        ({"bias": torch.zeros(16, 16)}, "tiled", "bias"),
        ({"dropout_p": 0.1}, "tiled", "dropout"),
        ({"kernel": "reference"}, "reference", "forced"),
    ],
)
def test_explain_names_kernel_and_reason(inputs, options, kernel, why):
    choice = qkv.explain(*inputs, **options)
    assert choice.name == kernel and why in choice.reason
    assert str(choice).startswith(kernel + ":")


def test_auto_dispatch_equals_forced_reference(inputs):
    q, k, v = inputs
    for opts in ({}, {"causal": True}, {"mask": masks.window(3) & masks.padding([16, 9])}):
        auto = qkv.attention(q, k, v, **opts)
        ref = qkv.attention(q, k, v, kernel="reference", **opts)
        torch.testing.assert_close(auto, ref, atol=2e-6, rtol=1e-5)


def _dropped_weights(q, k, p, seed, kernel="auto"):
    """With v = identity, the output *is* the dropped weight matrix."""
    B, H, Tk = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(Tk, dtype=q.dtype).expand(B, H, Tk, Tk)
    g = torch.Generator().manual_seed(seed)
    return qkv.attention(q, k, eye, dropout_p=p, generator=g, kernel=kernel)


KERNELS = pytest.mark.parametrize("kernel", ["reference", "tiled"])


@KERNELS
def test_dropout_is_reproducible_with_a_seeded_generator(inputs, kernel):
    q, k, v = inputs

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return qkv.attention(q, k, v, dropout_p=0.3, generator=g, kernel=kernel)

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)


@KERNELS
def test_dropout_statistics(kernel):
    q, k, _ = make_qkv((4, 4, 4, 64, 64, 16, 16), torch.float64)
    p = 0.3
    weights = qkv.attention(q, k, k, return_weights=True).weights.detach()
    dropped = _dropped_weights(q.detach(), k.detach(), p, seed=0, kernel=kernel)
    zero_fraction = (dropped == 0).double().mean().item()
    n = dropped.numel()
    assert abs(zero_fraction - p) < 4 * (p * (1 - p) / n) ** 0.5  # within 4 sigma
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], weights[kept] / (1 - p))  # inverted dropout
    # unbiased: the mean over many draws approaches the undropped weights
    draws = 200
    mean = sum(_dropped_weights(q.detach(), k.detach(), p, s, kernel) for s in range(draws))
    mean = mean / draws
    # each entry is w·Bernoulli(1-p)/(1-p): standard error w·sqrt(p/(1-p)/draws)
    z = (mean - weights) / (weights * (p / (1 - p) / draws) ** 0.5)
    assert z.abs().max() < 6 and abs(z.mean()) < 0.05 and 0.7 < z.std() < 1.3


@KERNELS
def test_dropout_gradients_follow_the_same_mask(kernel):
    q, k, v = make_qkv((1, 2, 2, 8, 8, 4, 4), torch.float64)
    dropped = _dropped_weights(q.detach(), k.detach(), 0.5, seed=3, kernel=kernel)
    g = torch.Generator().manual_seed(3)
    out = qkv.attention(q, k, v, dropout_p=0.5, generator=g, kernel=kernel)
    torch.testing.assert_close(out, dropped @ v.detach())
    dout = torch.randn_like(out)
    out.backward(dout)
    torch.testing.assert_close(v.grad, dropped.transpose(-2, -1) @ dout)


@pytest.mark.parametrize("Tk", [1, 15, 16, 63, 64, 65, 300])
def test_a_nan_query_stays_nan_on_every_kernel(Tk):
    """torch's CPU kernel hides a NaN query row for Tk <= 15 (torch 2.13); qkv must not.

    Beyond fused.POISON_BELOW_KEYS qkv relies on torch propagating NaN by itself: this
    test fails if a torch release moves its threshold past ours.
    """
    q, k, v = make_qkv((1, 2, 2, 4, Tk, 8, 8), torch.float32)
    q = q.detach().clone()
    q[0, 1, 2, 5] = float("nan")
    for kernel in ("fused", "tiled", "reference"):
        out = qkv.attention(q, k.detach(), v.detach(), kernel=kernel)
        assert torch.isnan(out[0, 1, 2]).all(), (kernel, Tk)
        assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, 1, :2]).all()
