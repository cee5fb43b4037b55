"""`qkv.attention`: the one functional entry for scaled dot-product attention.

Letters: B batch, Hq query heads, Hkv key/value heads, Tq/Tk lengths, D/Dv head dims.
"""

from __future__ import annotations

import torch

from . import kernels
from ._types import AttentionOutput
from ._validate import build_problem
from .masks import Mask

__all__ = ["attention", "explain"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | Mask | None = None,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    return_lse: bool = False,
    generator: torch.Generator | None = None,
    kernel: str = "auto",
) -> torch.Tensor | AttentionOutput:
    """softmax(q kᵀ · scale + bias, masked) · v, with one mask convention and safe empty rows.

    Args:
        q: (B, Hq, Tq, D) queries.
        k: (B, Hkv, Tk, D) keys; Hq must be a multiple of Hkv (grouped-query attention:
            query head h uses key/value head h // (Hq // Hkv)).
        v: (B, Hkv, Tk, Dv) values.
        mask: None, a bool tensor broadcastable to (B, Hq, Tq, Tk) where **True means
            "may attend"**, or a `qkv.masks` mask (causal, window, padding, document, ...).
        bias: float tensor broadcastable to (B, Hq, Tq, Tk), added to the scaled scores
            (ALiBi, relative positions); differentiable.
        causal: bottom-right aligned causal mask, ANDed with `mask`. Query i sees keys
            j <= i + Tk - Tq; with Tq=2, Tk=4::

                ■ ■ ■ ·
                ■ ■ ■ ■

            which is what decoding against a KV cache needs (the usual lower triangle
            when Tq == Tk).
        scale: multiplies the scores before the softmax; defaults to 1/sqrt(D).
        dropout_p: probability of zeroing each weight (kept ones are scaled by 1/(1-p)).
        return_weights: also return the (B, Hq, Tq, Tk) softmax weights (before dropout).
        return_lse: also return the (B, Hq, Tq) log-sum-exp of the scores (float32+).
        generator: torch.Generator for dropout, for reproducible runs.
        kernel: "auto" (fastest that supports the call; see `qkv.explain`) or the name of
            one kernel to force ("reference", "fused").

    Returns:
        The output (B, Hq, Tq, Dv) in the input dtype; with `return_weights` or
        `return_lse`, an `AttentionOutput(output, weights, lse)` whose fields not asked
        for are None.

    A query row that may attend to nothing (every key masked) gets output 0, weights 0,
    lse -inf and zero gradients, never NaN.
    """
    problem = build_problem(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        causal=causal,
        scale=scale,
        dropout_p=dropout_p,
        generator=generator,
        return_weights=return_weights,
        return_lse=return_lse,
    )
    choice = kernels.select(problem, kernel)
    result = kernels.KERNELS[choice.name].run(q, k, v, problem)
    if return_weights or return_lse:
        return result
    return result.output


def explain(q, k, v, **options) -> kernels.KernelChoice:
    """Which kernel `qkv.attention(q, k, v, **options)` would run, and why; runs nothing."""
    kernel = options.pop("kernel", "auto")
    defaults = dict(
        mask=None,
        bias=None,
        causal=False,
        scale=None,
        dropout_p=0.0,
        generator=None,
        return_weights=False,
        return_lse=False,
    )
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"explain got unexpected options {sorted(unknown)}")
    problem = build_problem(q, k, v, **{**defaults, **options})
    return kernels.select(problem, kernel)
