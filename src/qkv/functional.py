"""`qkv.attention`: the one functional entry for scaled dot-product attention.

Letters: B batch, Hq query heads, Hkv key/value heads, Tq/Tk lengths, D/Dv head dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from ._types import AttentionOutput
from ._validate import build_problem, quick_sdpa
from .masks import Mask

__all__ = ["attention", "attention_weights", "explain"]


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
            one kernel to force: "reference", "fused", "tiled", "native" or "flex".

    Returns:
        The output (B, Hq, Tq, Dv) in the input dtype; with `return_weights` or
        `return_lse`, an `AttentionOutput(output, weights, lse)` whose fields not asked
        for are None.

    A query row that may attend to nothing (every key masked) gets output 0, weights 0,
    lse -inf and zero gradients, never NaN.
    """
    if (
        bias is None
        and return_weights is False
        and return_lse is False
        and type(kernel) is str
        and kernel == "auto"
        and (dropout_p == 0 if type(dropout_p) in (float, int) else False)
    ):
        # the common cases (no mask, causal, key padding) straight to torch's kernel, as the
        # dispatch below would choose, without its cost (see _validate.quick_sdpa)
        quick = quick_sdpa(q, k, v, mask, causal, scale)
        if quick is not None:
            attn_mask, is_causal, scale, gqa = quick
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
            )  # (B, Hq, Tq, Dv)
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
    """Which kernel `qkv.attention(q, k, v, **options)` would run, and why; runs nothing,
    and builds or compiles nothing (a native kernel not built yet is named as the one
    that would run: the call builds it)."""
    kernel = options.pop("kernel", "auto")
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"explain got unexpected options {sorted(unknown)}")
    return kernels.select(build_problem(q, k, v, **options), kernel, build=False)


_OPTIONS = {
    "mask",
    "bias",
    "causal",
    "scale",
    "dropout_p",
    "generator",
    "return_weights",
    "return_lse",
}


def _index(x, name: str, size: int) -> torch.Tensor:
    """heads= / rows= as a LongTensor of valid indices (None: all)."""
    if x is None:
        return torch.arange(size)
    if isinstance(x, slice):
        return torch.arange(size)[x]
    if isinstance(x, int) and not isinstance(x, bool):
        x = [x]
    if isinstance(x, (list, tuple)) and not x:
        return torch.zeros(0, dtype=torch.long)
    if not isinstance(x, (list, tuple, torch.Tensor)):
        raise TypeError(f"{name} must be an int, a slice or a 1-D sequence of ints; got {x!r}")
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"{name} must be an int, a slice or a 1-D sequence of ints; got {x!r}"
        ) from err
    if t.dtype == torch.bool or t.is_floating_point() or t.dim() != 1:
        raise TypeError(f"{name} must be an int, a slice or a 1-D sequence of ints; got {x!r}")
    if t.numel() and (int(t.min()) < -size or int(t.max()) >= size):
        raise ValueError(f"{name} must index into {size}; got {t.tolist()[:8]}")
    return t.long() % size if t.numel() else t.long()


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    heads=None,
    rows=None,
    mask: torch.Tensor | Mask | None = None,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """The softmax weights of only some heads and query rows: (B, len(heads), len(rows), Tk).

    For looking inside a long sequence without the (B, H, Tq, Tk) matrix: the scores are
    computed for the chosen rows alone, with the same masks, bias, scale and alignment as
    `qkv.attention(q, k, v, ...)` on the whole sequence (rows that see nothing give 0).

        w = qkv.attention_weights(q, k, heads=[0, 3], rows=slice(-4, None), causal=True)
    """
    p = build_problem(q, k, k, mask=mask, bias=bias, causal=causal, scale=scale)
    h_idx = _index(heads, "heads", p.Hq).to(q.device)
    r_idx = _index(rows, "rows", p.Tq).to(q.device)
    q_sel = q.index_select(1, h_idx).index_select(2, r_idx)  # (B, h, r, D)
    k_sel = k.index_select(1, h_idx // p.group)  # (B, h, Tk, D): each head's kv head
    allowed = None
    if p.mask is not None:
        # each chosen row keeps its own position (bottom-right alignment uses Tq, Tk)
        parts = [p.mask.submask(p.Tq, p.Tk, i, i + 1, 0, p.Tk, q.device) for i in r_idx.tolist()]
        allowed = torch.cat(parts, dim=2) if parts else None  # (Bm, Hm, r, Tk)
        if allowed is not None and allowed.shape[1] != 1:
            allowed = allowed.index_select(1, h_idx)
    sub_bias = None
    if p.bias is not None:
        b4 = p.bias.reshape((1,) * (4 - p.bias.dim()) + tuple(p.bias.shape))
        b4 = b4.index_select(1, h_idx) if b4.shape[1] != 1 else b4
        sub_bias = b4.index_select(2, r_idx) if b4.shape[2] != 1 else b4
    sub = build_problem(
        q_sel, k_sel, k_sel, mask=allowed, bias=sub_bias, scale=p.scale, return_weights=True
    )
    return kernels.KERNELS["reference"].run(q_sel, k_sel, k_sel, sub).weights
