"""The tiled kernel: torch's fused attention run tile by tile, merged by log-sum-exp.

Letters: B batch, Hq query heads, Hkv key/value heads, Tq/Tk lengths, D/Dv head dims,
q/k the sizes of one tile.

torch's fused CPU kernel (`_scaled_dot_product_flash_attention_for_cpu`) runs at about
matrix-multiply speed and returns each row's log-sum-exp, but it only knows dense masks:
given a sliding window as a T×T mask it still does all T² work. Here the mask's tile plan
(`tiles.plan_tiles`) decides what to compute: empty tiles are skipped, full runs of tiles
go to the fused kernel without a mask, partial ones with a small additive mask, and the
partial results of a query block are merged exactly through their log-sum-exp
(FlashAttention, Dao et al. 2022; the same merge as in ring attention, Liu et al. 2023).
Masked blocks are cut further into sub-blocks of REFINE_ROWS queries that read only the
keys their rows may see (`tiles.refine_jobs`), so a band of w keys costs about w + 32
keys per row rather than w + BLOCK_Q; equal segments of many blocks run as one fused
call over overlapping views of the keys (stacked.py).

The backward pass needs only the global output and log-sum-exp: for a tile,
P = exp(S − lse) and dS = P ⊙ (dP − rowsum(dO ⊙ O)), so the fused backward runs tile by
tile too. Memory is O(T): q, k, v, the output and the lse are all that is saved.

The tiles run on the tile engine (engine.py) with a plan from the mask (plan.py): plans
of tensor-free masks are kept in `PLANS`, a `PlanCache` keyed by value; a `TilePlan`
passed as the mask runs as it stands.
"""

from __future__ import annotations

import dataclasses

import torch

from .._types import AttentionOutput, Problem
from . import engine
from .engine import Inputs, _additive, _slice_bias
from .merge import backward_lse, stat_dtype
from .plan import PlanCache, TileConfig

__all__ = ["PLANS", "run", "unsupported"]

# The plans of tensor-free masks (causal, windows, their combinations) by value.
PLANS = PlanCache(size=32)


def unsupported(p: Problem) -> str | None:
    if p.need_weights and p.needs_grad:
        return "weights recomputed from the log-sum-exp carry no gradient"
    return None


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, p, plan, seed, executor):
        out, lse = engine.forward(q, k, v, p, plan, engine=executor, bias=bias, seed=seed)
        out = out.to(q.dtype)  # (B, Hq, Tq, Dv)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.p, ctx.plan, ctx.seed, ctx.executor = p, plan, seed, executor
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = engine.backward(
            q, k, v, out, lse, dout, ctx.p, ctx.plan, engine=ctx.executor, bias=bias,
            bias_grad=bias_grad, seed=ctx.seed,
        )  # fmt: skip
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, None, None, None, None


def _weights(x: Inputs, p: Problem, bias, plan, lse) -> torch.Tensor:
    """(B, Hq, Tq, Tk) weights recomputed tile by tile as exp(S − lse)."""
    stat = stat_dtype(x.q.dtype)
    w = x.q.new_zeros(p.B, p.Hq, p.Tq, p.Tk)
    for blk in plan.blocks:
        l_blk = lse[:, :, blk.q0 : blk.q1, None]  # (B, Hq, q, 1)
        l_safe = backward_lse(l_blk)
        qs = x.q[:, :, blk.q0 : blk.q1].to(stat)
        for seg in blk.segments:
            ks = x.k[:, :, seg.k0 : seg.k1].to(stat)
            s = (qs @ ks.transpose(-2, -1)) * p.scale  # (B, Hq, q, k)
            add = _additive(seg, _slice_bias(bias, blk.q0, blk.q1, seg.k0, seg.k1), stat)
            if add is not None:
                s = s + add
            w[:, :, blk.q0 : blk.q1, seg.k0 : seg.k1] = torch.exp(s - l_safe).to(w.dtype)
    return w


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: Problem,
    *,
    config: TileConfig | None = None,
    **sizes: int,
) -> AttentionOutput:
    """The tiled kernel; `config` (or keyword overrides of its fields, e.g. block_q=16)
    sets the tile sizes."""
    config = TileConfig() if config is None else config
    if sizes:
        config = dataclasses.replace(config, **sizes)
    plan = PLANS.get(p.mask, p.Tq, p.Tk, config, q.device)
    executor = engine.choose(
        p, bias_grad=p.bias is not None and p.bias.requires_grad and torch.is_grad_enabled()
    )
    seed = 0
    if p.dropout_p > 0:
        seed = int(torch.randint(0, 2**62, (), generator=p.generator, device=q.device))
    bias = p.bias
    if p.dropout_p >= 1.0:  # everything dropped; keep the graph for zero gradients
        zero = (q.sum() + k.sum() + v.sum()) * 0
        out = zero + q.new_zeros(p.B, p.Hq, p.Tq, p.Dv)
        nodrop = dataclasses.replace(p, dropout_p=0.0)
        _, lse = _Tiled.apply(
            q.detach(), k.detach(), v.detach(), None, nodrop, plan, 0, engine.choose(nodrop)
        )
    else:
        out, lse = _Tiled.apply(q, k, v, bias, p, plan, seed, executor)
    weights = None
    if p.need_weights:
        with torch.no_grad():
            weights = _weights(Inputs(q, k, v, p), p, bias, plan, lse).to(q.dtype)
    return AttentionOutput(output=out, weights=weights, lse=lse if p.need_lse else None)
