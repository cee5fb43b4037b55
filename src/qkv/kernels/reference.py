"""The reference kernel: attention written out, the scores materialised.

Letters: B batch, Hq query heads, Hkv key/value heads, Tq/Tk lengths, D/Dv head dims.

This is the torch oracle every faster kernel is proven equal to, so it favours clarity:
it builds the (B, Hq, Tq, Tk) score matrix, and lets autograd differentiate it.

Fully masked rows. A row that may attend to nothing has every score at -inf; the naive
softmax gives 0/0 = NaN there, and the `masked_fill(mask == 0, -1e9)` trick silently gives
uniform weights instead. Here such a row gets weights 0, output 0, lse -inf and zero
gradients: the row maximum is replaced by 0 where it is -inf, so exp(-inf - 0) = 0 and the
normaliser is 0, which we divide by 1 instead.
"""

from __future__ import annotations

import torch

from .._types import AttentionOutput, Problem
from .merge import stat_dtype

__all__ = ["run"]


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * group, T, D): query head h uses key/value head h // group."""
    if group == 1:
        return x
    B, Hkv, T, D = x.shape
    return x[:, :, None].expand(B, Hkv, group, T, D).reshape(B, Hkv * group, T, D)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> AttentionOutput:
    dtype = stat_dtype(q.dtype)  # softmax statistics in float32 at least
    qf = q.to(dtype)  # (B, Hq, Tq, D)
    kf = repeat_kv(k.to(dtype), p.group)  # (B, Hq, Tk, D)
    vf = repeat_kv(v.to(dtype), p.group)  # (B, Hq, Tk, Dv)

    # 1) scores, scaled *before* the softmax
    scores = (qf @ kf.transpose(-2, -1)) * p.scale  # (B, Hq, Tq, Tk)
    if p.bias is not None:
        scores = scores + p.bias.to(dtype)  # additive, differentiable
    if p.mask is not None:
        allowed = p.mask.submask(p.Tq, p.Tk, 0, p.Tq, 0, p.Tk, device=q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))  # (B, Hq, Tq, Tk)

    # 2) a softmax that is stable per row (each row's own max) and safe on empty rows.
    #    Detaching the max is exact: softmax does not depend on the shift.
    if p.Tk == 0:  # no keys at all: every row is empty
        row_max = scores.new_zeros(*scores.shape[:-1], 1)
    else:
        row_max = scores.amax(dim=-1, keepdim=True).detach()  # (B, Hq, Tq, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.exp(scores - row_max)  # (B, Hq, Tq, Tk), 0 where forbidden
    total = exp.sum(dim=-1, keepdim=True)  # (B, Hq, Tq, 1)
    nonempty = total > 0
    weights = exp / torch.where(nonempty, total, torch.ones_like(total))

    # 3) dropout on the weights (inverted dropout: kept entries scaled by 1/(1-p))
    dropped = weights
    if p.dropout_p > 0.0:
        if p.dropout_p >= 1.0:
            dropped = torch.zeros_like(weights)
        else:
            keep = (
                torch.rand(weights.shape, generator=p.generator, device=weights.device, dtype=dtype)
                >= p.dropout_p
            )
            dropped = weights * keep / (1.0 - p.dropout_p)

    # 4) weighted sum of the values
    out = (dropped @ vf).to(q.dtype)  # (B, Hq, Tq, Dv)

    lse = None
    if p.need_lse:
        safe_total = torch.where(nonempty, total, torch.ones_like(total))
        lse = torch.where(nonempty, row_max + torch.log(safe_total), float("-inf"))
        lse = lse.squeeze(-1)  # (B, Hq, Tq)
    return AttentionOutput(
        output=out,
        weights=weights.to(q.dtype) if p.need_weights else None,
        lse=lse,
    )
