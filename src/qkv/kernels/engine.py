"""The tile engine: a plan's tiles run forward and backward, merged by log-sum-exp.

Letters: B batch, Hq query heads, Hkv key/value heads, Tq/Tk lengths, D/Dv head dims,
W head width (max(D, Dv)), q/k the sizes of one tile.

One engine for every caller: the tiled kernel (tiled.py), ring attention (each visiting
key/value block runs the tiles of its crop of the global mask, distributed/ring.py) and
decoding against a long cache (a one-row plan reading only the keys it needs). It takes
a `TilePlan` and runs it on one of two executors:

- "fused": torch's fused CPU kernel (`_scaled_dot_product_flash_attention_for_cpu` and its
  backward) on batched jobs of equal tiles (stacked.py); where it is built, float32
  forward jobs run on qkv's native kernel instead, whose lse the fused backward takes
  like its own;
- "math": each tile written out with matmuls, in float64 for float64 inputs and float32
  otherwise: for dropout (a per-tile generator, so the backward regenerates the same
  keep-mask), for the gradient of a bias, and on devices without the fused CPU kernel.

The backward needs only the global output and log-sum-exp: for a tile P = exp(S − lse)
and dS = P ⊙ (dP − rowsum(dO ⊙ O)), so it runs tile by tile too (FlashAttention, Dao et
al. 2022). Statistics, merges and empty rows follow merge.py.
"""

from __future__ import annotations

import torch

from .._types import Problem
from . import stacked
from .fused import POISON_BELOW_KEYS, poison
from .merge import backward_lse, merge, stat_dtype
from .native import unit_stride
from .plan import TilePlan
from .tiles import QueryBlock, Segment

__all__ = ["Inputs", "backward", "choose", "forward"]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def choose(p: Problem, *, bias_grad: bool = False) -> str:
    """The executor for a problem: "fused" on the CPU without dropout or a bias gradient,
    "math" otherwise.

    The bias gradient is recomputed as exp(S − lse) by the math executor: an lse from the
    fused kernel (which scales inside its product) differs from it by |S|·eps, which large
    scores turned into 1e-5 errors in float32 gradients.
    """
    if p.device.type != "cpu" or p.dropout_p > 0 or bias_grad:
        return "math"
    return "fused"


def _slice_bias(bias: torch.Tensor | None, q0, q1, k0, k1) -> torch.Tensor | None:
    """The part of a broadcastable (.., Tq|1, Tk|1) bias that covers one tile."""
    if bias is None:
        return None
    b = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    b = b[:, :, q0:q1] if b.shape[2] != 1 else b
    return b[:, :, :, k0:k1] if b.shape[3] != 1 else b


def _additive(seg: Segment, bias_tile, dtype) -> torch.Tensor | None:
    """Float mask for the fused kernel: bias plus -inf where the segment forbids."""
    add = None if bias_tile is None else bias_tile.to(dtype)
    if seg.mask is not None:
        forbid = torch.zeros(seg.mask.shape, dtype=dtype, device=seg.mask.device)
        forbid.masked_fill_(~seg.mask, float("-inf"))
        add = forbid if add is None else add + forbid
    return add


def _row_has_keys(add: torch.Tensor | None) -> torch.Tensor | None:
    """(Bm, Hm, q) bool: rows of the tile with an allowed key; None when all have one.

    The fused kernel reports lse = 0 (not -inf) for a row whose mask is all -inf, so such
    rows are found from the additive mask itself (a bias of -inf can empty a row too).
    """
    if add is None:
        return None
    rows = torch.isfinite(add).any(-1)
    return None if bool(rows.all()) else rows


def _tile_seed(seed: int, blk: QueryBlock, seg: Segment) -> int:
    return (seed * 1_000_003 + blk.q0 * 65_537 + seg.k0) % (2**63 - 1)


def _keep(shape, p: Problem, seed: int, blk, seg, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(_tile_seed(seed, blk, seg))
    return torch.rand(shape, generator=g, device=device) >= p.dropout_p


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> contiguous (B, T, H, D) (no copy when it is already laid out so).

    torch's fused CPU kernel works in (B, T, H, D) order; a slice x[:, :, t0:t1] of such
    storage is one contiguous block, whereas slicing (B, H, T, D) storage makes the kernel
    copy far more than the slice (measured: 50× slower per tile). Tensors that come from
    a projection viewed as (B, T, H, D) and transposed are already laid out this way.
    """
    return x.transpose(1, 2).contiguous()


class Inputs:
    """q, k, v prepared for the fused kernel: kv heads expanded, one head dim, float16 as
    float32.

    (B, H, T, W) tensors. With `token_major` they sit in (B, T, H, W) storage, which the
    per-tile loop needs; the batched jobs read windows of any layout, so they take the
    inputs as they come (no copy unless GQA or a head-dim padding makes one anyway).
    """

    def __init__(self, q, k, v, p: Problem, keys: torch.Tensor | None = None, token_major=True):
        if keys is not None:  # only the keys the plan reads (see tiles.compact_keys)
            k, v = k.index_select(2, keys), v.index_select(2, keys)
        if q.dtype == torch.float16:
            # torch's fused CPU kernel runs float16 no faster than float32 (measured: causal
            # T=2048, fwd+bwd, 100 ms either way) and rounds every tile's partial gradient
            # to float16, so errors grew with the number of tiles a key sits in
            q, k, v = q.float(), k.float(), v.float()
        group, Tk = p.group, k.shape[2]
        # (B, Hkv, Tk, D) -> (B, Hq, Tk, D): query head h reads kv head h // group
        if group > 1:
            k = k[:, :, None].expand(p.B, p.Hkv, group, Tk, p.D).flatten(1, 2)
            v = v[:, :, None].expand(p.B, p.Hkv, group, Tk, p.Dv).flatten(1, 2)
        # the fused kernel wants one head size: zero-pad the smaller side (no effect on
        # scores q·k, nor on the output columns we keep)
        width = max(p.D, p.Dv)
        if width > p.D:
            q, k = (torch.nn.functional.pad(t, (0, width - p.D)) for t in (q, k))
        if p.Dv < width:
            v = torch.nn.functional.pad(v, (0, width - p.Dv))
        if token_major:
            q, k, v = (_token_major(t).transpose(1, 2) for t in (q, k, v))
        self.q, self.k, self.v = (unit_stride(t) for t in (q, k, v))  # (B, H, T, W)
        self.width = width


def copies_inputs(p: Problem) -> bool:
    """Whether Inputs copies k and v anyway (GQA expansion or head-dim padding)."""
    return p.group > 1 or p.Dv != p.D


def _zeros_token_major(B, H, T, D, *, like: torch.Tensor, dtype) -> torch.Tensor:
    """(B, H, T, D) zeros viewed over (B, T, H, D) storage."""
    return torch.zeros(B, T, H, D, dtype=dtype, device=like.device).transpose(1, 2)


def _segment_forward(x: Inputs, p: Problem, bias, blk, seg, seed, engine):
    """(out (B, Hq, q, width) in stat dtype, lse (B, Hq, q)) of one segment."""
    q = x.q[:, :, blk.q0 : blk.q1]
    k, v = x.k[:, :, seg.k0 : seg.k1], x.v[:, :, seg.k0 : seg.k1]
    stat = stat_dtype(q.dtype)
    add = _additive(seg, _slice_bias(bias, blk.q0, blk.q1, seg.k0, seg.k1), q.dtype)
    if engine == "fused":
        out, lse = _flash(q, k, v, 0.0, False, attn_mask=add, scale=p.scale)
        if add is None and k.shape[2] < POISON_BELOW_KEYS:  # see fused.poison
            nan = poison(q)
            out, lse = out + nan, lse + nan[..., 0]
        out, lse = out.to(stat), lse.to(stat)
    else:
        s = (q.to(stat) @ k.to(stat).transpose(-2, -1)) * p.scale  # (B, Hq, q, k)
        if add is not None:
            s = s + add.to(stat)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)  # (B, Hq, q, k)
        total = e.sum(-1, keepdim=True)
        lse = (m + torch.log(total)).squeeze(-1)  # -inf on empty rows
        probs = e / torch.where(total > 0, total, torch.ones_like(total))
        if p.dropout_p > 0:
            keep = _keep(probs.shape, p, seed, blk, seg, q.device)
            probs = probs * keep / (1.0 - p.dropout_p)
        out = probs @ v.to(stat)
    rows = _row_has_keys(add)
    if rows is not None:
        lse = torch.where(rows, lse, float("-inf"))
    return out, lse


def _segment_backward(x, p, bias, blk, seg, seed, engine, dout, out, lse, grads):
    """Accumulate dq, dk, dv (and dbias) of one segment into `grads`."""
    q = x.q[:, :, blk.q0 : blk.q1]
    k, v = x.k[:, :, seg.k0 : seg.k1], x.v[:, :, seg.k0 : seg.k1]
    do, o, l = (t[:, :, blk.q0 : blk.q1] for t in (dout, out, lse))
    bias_tile = _slice_bias(bias, blk.q0, blk.q1, seg.k0, seg.k1)
    add = _additive(seg, bias_tile, q.dtype)
    l_safe = backward_lse(l)  # rows that see nothing anywhere: exp(S − lse) = 0
    if engine == "fused":
        dq, dk, dv = _flash_backward(
            do, q, k, v, o, l_safe, 0.0, False, attn_mask=add, scale=p.scale
        )
        dbias = None
    else:
        stat = stat_dtype(q.dtype)
        qs, ks, vs, dos = (t.to(stat) for t in (q, k, v, do))
        s = (qs @ ks.transpose(-2, -1)) * p.scale  # (B, Hq, q, k)
        if add is not None:
            s = s + add.to(stat)
        probs = torch.exp(s - l_safe[..., None])  # (B, Hq, q, k), the global weights
        dprobs = dos @ vs.transpose(-2, -1)  # (B, Hq, q, k)
        if p.dropout_p > 0:
            keep = _keep(probs.shape, p, seed, blk, seg, q.device) / (1.0 - p.dropout_p)
            dv = (probs * keep).transpose(-2, -1) @ dos
            dprobs = dprobs * keep
        else:
            dv = probs.transpose(-2, -1) @ dos
        # softmax Jacobian: dS = P ⊙ (dP − rowsum(dO ⊙ O)); rowsum(dP ⊙ P) = dO · O
        delta = (dos * o.to(stat)).sum(-1, keepdim=True)  # (B, Hq, q, 1)
        ds = probs * (dprobs - delta)  # (B, Hq, q, k)
        dq = (ds @ ks) * p.scale
        dk = (ds.transpose(-2, -1) @ qs) * p.scale
        dbias = ds if bias_tile is not None and bias.requires_grad else None
    grads["q"][:, :, blk.q0 : blk.q1] += dq
    grads["k"][:, :, seg.k0 : seg.k1] += dk
    grads["v"][:, :, seg.k0 : seg.k1] += dv
    if dbias is not None:
        _accumulate_bias(grads, bias, dbias, blk, seg)


def _accumulate_bias(grads, bias, dbias, blk, seg):
    """Sum a tile's dS over the bias's broadcast dims into its gradient."""
    gb = grads["bias"]  # (Bb, Hb, Tq|1, Tk|1), the bias shape padded to 4 dims
    for dim in (0, 1):
        if gb.shape[dim] == 1:
            dbias = dbias.sum(dim, keepdim=True)
    rows = slice(blk.q0, blk.q1) if gb.shape[2] != 1 else slice(None)
    cols = slice(seg.k0, seg.k1) if gb.shape[3] != 1 else slice(None)
    if gb.shape[2] == 1:
        dbias = dbias.sum(2, keepdim=True)
    if gb.shape[3] == 1:
        dbias = dbias.sum(3, keepdim=True)
    gb[:, :, rows, cols] += dbias.to(gb.dtype)


def _stacked(engine: str, bias) -> bool:
    """Whether the batched job executor applies (fused engine, no bias to slice)."""
    return engine == "fused" and bias is None


def _forward_segments(x: Inputs, p: Problem, bias, plan: TilePlan, seed, engine):
    stat = stat_dtype(x.q.dtype)
    out = _zeros_token_major(p.B, p.Hq, p.Tq, x.width, like=x.q, dtype=stat)
    lse = x.q.new_full((p.B, p.Hq, p.Tq), float("-inf"), dtype=stat)
    for blk in plan.blocks:
        if not blk.segments:
            continue
        o_blk, l_blk = _segment_forward(x, p, bias, blk, blk.segments[0], seed, engine)
        for seg in blk.segments[1:]:
            o_s, l_s = _segment_forward(x, p, bias, blk, seg, seed, engine)
            o_blk, l_blk = merge(o_blk, l_blk, o_s, l_s)
        out[:, :, blk.q0 : blk.q1] = o_blk
        lse[:, :, blk.q0 : blk.q1] = l_blk
    return out, lse


def forward(q, k, v, p: Problem, plan: TilePlan, *, engine: str, bias=None, seed: int = 0):
    """out (B, Hq, Tq, Dv) and lse (B, Hq, Tq) in the stat dtype; 0 / -inf on empty rows.

    q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv); `p` gives the sizes, scale
    and dropout, `plan` the tiles (for p's Tq and Tk).
    """
    if _stacked(engine, bias):
        jobs = plan.jobs(p.Hq, copies_inputs(p), q.device)
        x = Inputs(q, k, v, p, jobs.keys, token_major=False)
        shape = (p.B, p.Tq, p.Hq, x.width)
        out, lse = stacked.forward(x, jobs, p.scale, shape, stat_dtype(q.dtype))
        out, lse = out.transpose(1, 2), lse.transpose(1, 2)  # (B, Hq, Tq, ·)
    else:
        x = Inputs(q, k, v, p)
        out, lse = _forward_segments(x, p, bias, plan, seed, engine)
    return out[..., : p.Dv], lse


def backward(q, k, v, out, lse, dout, p: Problem, plan: TilePlan, *, engine: str, bias=None,
             bias_grad: bool = False, seed: int = 0):  # fmt: skip
    """dq (B, Hq, Tq, D), dk (B, Hkv, Tk, D), dv (B, Hkv, Tk, Dv) in the stat dtype, and
    dbias (the bias's shape and dtype) when bias_grad.

    out (B, Hq, Tq, Dv) and lse (B, Hq, Tq) are the *global* ones (over every key of the
    rows, not only this plan's), so that a plan covering part of the keys (a ring step)
    gives exactly its share of the gradients.
    """
    if bias_grad:
        engine = "math"  # the fused backward returns no gradient for the mask
    use_jobs = _stacked(engine, bias)
    jobs = plan.jobs(p.Hq, copies_inputs(p), q.device) if use_jobs else None
    x = Inputs(q, k, v, p, jobs.keys if use_jobs else None, token_major=not use_jobs)
    dout, out = dout.to(x.q.dtype), out.to(x.q.dtype)  # float16 runs as float32
    pad = x.width - p.Dv
    if pad:
        dout, out = (torch.nn.functional.pad(t, (0, pad)) for t in (dout, out))
    stat = stat_dtype(q.dtype)  # accumulate in float32+ whatever the input dtype
    grads = {
        "q": _zeros_token_major(p.B, p.Hq, p.Tq, x.width, like=q, dtype=stat),
        "k": _zeros_token_major(p.B, p.Hq, x.k.shape[2], x.width, like=q, dtype=stat),
        "v": _zeros_token_major(p.B, p.Hq, x.k.shape[2], x.width, like=q, dtype=stat),
    }
    if use_jobs:
        tm = {name: g.transpose(1, 2) for name, g in grads.items()}  # (B, T, H, W)
        dout, out = unit_stride(dout), unit_stride(out)
        stacked.backward(x, jobs.coarse, p.scale, dout, out, backward_lse(lse), tm)
    else:
        if bias_grad:
            shape4 = (1,) * (4 - bias.dim()) + tuple(bias.shape)
            grads["bias"] = torch.zeros(shape4, dtype=stat, device=q.device)
        dout, out = _token_major(dout).transpose(1, 2), _token_major(out).transpose(1, 2)
        for blk in plan.blocks:
            for seg in blk.segments:
                _segment_backward(x, p, bias, blk, seg, seed, engine, dout, out, lse, grads)
    if use_jobs and jobs.keys is not None:  # back from the compacted keys to all Tk
        for name in ("k", "v"):
            full = torch.zeros(p.B, p.Hq, p.Tk, x.width, dtype=stat, device=q.device)
            grads[name] = full.index_copy_(2, jobs.keys, grads[name])
    dq = grads["q"][..., : p.D]
    # kv heads were shared by `group` query heads: their gradients add up
    dk, dv = grads["k"][..., : p.D], grads["v"][..., : p.Dv]
    if p.group > 1:
        dk, dv = (t.unflatten(1, (p.Hkv, p.group)).sum(2) for t in (dk, dv))
    dbias = grads["bias"].reshape(bias.shape).to(bias.dtype) if bias_grad else None
    return dq, dk, dv, dbias
