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

Two tile engines:
- "fused" calls torch's fused forward/backward (no dropout, and no gradient for a bias);
  where it is built, float32 forward jobs run on qkv's native kernel (native.py) instead,
  whose lse the fused backward takes like its own;
- "math" writes the tile out with matmuls: used for dropout (a per-tile generator, so the
  backward regenerates the same keep-mask) and for the gradient of a bias.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .._types import AttentionOutput, Problem
from ..masks._base import And, Not, Or
from ..masks._kinds import Band
from . import stacked, tiles
from .fused import POISON_BELOW_KEYS, poison
from .native import unit_stride
from .tiles import (
    BLOCK_K,
    BLOCK_Q,
    REFINE_ROWS,
    QueryBlock,
    Segment,
    compact_keys,
    group_jobs,
    plan_tiles,
    refine_jobs,
)

__all__ = ["BLOCK_K", "BLOCK_Q", "run", "unsupported"]


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def unsupported(p: Problem) -> str | None:
    if p.need_weights and p.needs_grad:
        return "weights recomputed from the log-sum-exp carry no gradient"
    return None


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


class _Inputs:
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


def _copies_inputs(p: Problem) -> bool:
    """Whether _Inputs copies k and v anyway (GQA expansion or head-dim padding)."""
    return p.group > 1 or p.Dv != p.D


def _zeros_token_major(B, H, T, D, *, like: torch.Tensor, dtype) -> torch.Tensor:
    """(B, H, T, D) zeros viewed over (B, T, H, D) storage."""
    return torch.zeros(B, T, H, D, dtype=dtype, device=like.device).transpose(1, 2)


def _segment_forward(x: _Inputs, p: Problem, bias, blk, seg, seed, engine):
    """(out (B, Hq, q, width) in stat dtype, lse (B, Hq, q)) of one segment."""
    q = x.q[:, :, blk.q0 : blk.q1]
    k, v = x.k[:, :, seg.k0 : seg.k1], x.v[:, :, seg.k0 : seg.k1]
    stat = _stat_dtype(q.dtype)
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


def _forward(x: _Inputs, p: Problem, bias, plan, seed, engine):
    stat = _stat_dtype(x.q.dtype)
    out = _zeros_token_major(p.B, p.Hq, p.Tq, x.width, like=x.q, dtype=stat)
    lse = x.q.new_full((p.B, p.Hq, p.Tq), float("-inf"), dtype=stat)
    for blk in plan:
        if not blk.segments:
            continue
        o_blk, l_blk = _segment_forward(x, p, bias, blk, blk.segments[0], seed, engine)
        for seg in blk.segments[1:]:
            o_s, l_s = _segment_forward(x, p, bias, blk, seg, seed, engine)
            o_blk, l_blk = stacked.merge(o_blk, l_blk, o_s, l_s)
        out[:, :, blk.q0 : blk.q1] = o_blk
        lse[:, :, blk.q0 : blk.q1] = l_blk
    return out, lse


def _segment_backward(x, p, bias, blk, seg, seed, engine, dout, out, lse, grads):
    """Accumulate dq, dk, dv (and dbias) of one segment into `grads`."""
    q = x.q[:, :, blk.q0 : blk.q1]
    k, v = x.k[:, :, seg.k0 : seg.k1], x.v[:, :, seg.k0 : seg.k1]
    do, o, l = (t[:, :, blk.q0 : blk.q1] for t in (dout, out, lse))
    bias_tile = _slice_bias(bias, blk.q0, blk.q1, seg.k0, seg.k1)
    add = _additive(seg, bias_tile, q.dtype)
    # Rows that see nothing anywhere have lse = -inf; +inf makes exp(S − lse) = 0 there.
    l_safe = torch.where(torch.isneginf(l), float("inf"), l)
    if engine == "fused":
        dq, dk, dv = _flash_backward(
            do, q, k, v, o, l_safe, 0.0, False, attn_mask=add, scale=p.scale
        )
        dbias = None
    else:
        stat = _stat_dtype(q.dtype)
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


# Plans of masks that hold no tensor (windows, causal, their combinations) depend only on
# the mask's pattern and the sizes, so the last few are kept: planning a 16,384-token
# window (tile kinds, segments, jobs, sub-blocks) took ~5 ms of a ~35 ms forward.
_PLAN_CACHE: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 32
_PLAN_LOCK = threading.Lock()


def _cached(key, build):
    """build() once per key (None: no caching). The planners themselves and the module
    tunables are part of every key, so a replaced planner never reads another's plans."""
    if key is None:
        return build()
    key = (key, plan_tiles, group_jobs, compact_keys, refine_jobs, tiles._MAX_MASKED_FULL,
           tiles.SPAN_MULTIPLE, tiles._REFINE_SAVING, tiles._JOB_TOKENS)  # fmt: skip
    with _PLAN_LOCK:
        hit = _PLAN_CACHE.get(key)
        if hit is not None:
            _PLAN_CACHE.move_to_end(key)
            return hit
    hit = build()  # outside the lock: two threads may both build; both plans are right
    with _PLAN_LOCK:
        _PLAN_CACHE[key] = hit
        while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    return hit


def _identified(mask) -> bool:
    """Whether `tile_key` over the whole problem identifies the mask itself: windows,
    causal, and their combinations. Other masks' keys only compare tiles of one mask
    (padding's leaves out the lengths), so their plans are not cached."""
    if isinstance(mask, Band):
        return True
    if isinstance(mask, Not):
        return _identified(mask.inner)
    if isinstance(mask, (And, Or)):
        return all(_identified(part) for part in mask.parts)
    return False


def _pattern(p: Problem, device) -> tuple | None:
    """A key for the plan of p's mask on this device, or None when it cannot be cached."""
    mask = p.mask
    if mask is None:
        return ("dense", p.Tq, p.Tk, str(device))
    if not _identified(mask):
        return None
    pattern = mask.tile_key(p.Tq, p.Tk, 0, p.Tq, 0, p.Tk)
    return None if pattern is None else (pattern, p.Tq, p.Tk, str(device))


def _stacked(engine: str, bias) -> bool:
    """Whether the batched job executor applies (fused engine, no bias to slice)."""
    return engine == "fused" and bias is None


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, p, plan, seed, engine, refine_rows, pattern):
        keys = None
        if _stacked(engine, bias):

            def build():
                jobs = group_jobs(plan, p.Hq)
                keys = None
                if _copies_inputs(p):  # copy only the keys the jobs read
                    keys, jobs = compact_keys(jobs, p.Tk, device=k.device)
                # the forward runs narrow sub-blocks; the backward keeps whole blocks,
                # since torch's fused backward gives every (overlapping) key window its
                # own zero-filled dk/dv buffer, which narrow blocks multiply
                Tk = p.Tk if keys is None else len(keys)
                return jobs, keys, refine_jobs(jobs, Tk, refine_rows)

            key = None
            if pattern is not None:
                key = ("jobs", pattern, p.Hq, _copies_inputs(p), refine_rows)
            jobs, keys, fine = _cached(key, build)
            x = _Inputs(q, k, v, p, keys, token_major=False)
            shape = (p.B, p.Tq, p.Hq, x.width)
            out, lse = stacked.forward(x, fine, p.scale, shape, _stat_dtype(q.dtype))
            out, lse = out.transpose(1, 2), lse.transpose(1, 2)  # (B, Hq, Tq, ·)
        else:
            jobs = None
            x = _Inputs(q, k, v, p)
            out, lse = _forward(x, p, bias, plan, seed, engine)
        out = out[..., : p.Dv].to(q.dtype)  # (B, Hq, Tq, Dv)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.p, ctx.plan, ctx.jobs, ctx.seed, ctx.engine = p, plan, jobs, seed, engine
        ctx.keys = keys
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        p, engine = ctx.p, ctx.engine
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        if bias_grad:
            engine = "math"  # the fused backward returns no gradient for the mask
        use_jobs = _stacked(engine, bias) and ctx.jobs is not None
        x = _Inputs(q, k, v, p, ctx.keys if use_jobs else None, token_major=not use_jobs)
        dout, out = dout.to(x.q.dtype), out.to(x.q.dtype)  # float16 runs as float32
        pad = x.width - p.Dv
        if pad:
            dout, out = (torch.nn.functional.pad(t, (0, pad)) for t in (dout, out))
        stat = _stat_dtype(q.dtype)  # accumulate in float32+ whatever the input dtype
        grads = {
            "q": _zeros_token_major(p.B, p.Hq, p.Tq, x.width, like=q, dtype=stat),
            "k": _zeros_token_major(p.B, p.Hq, x.k.shape[2], x.width, like=q, dtype=stat),
            "v": _zeros_token_major(p.B, p.Hq, x.k.shape[2], x.width, like=q, dtype=stat),
        }
        if use_jobs:
            # rows that see nothing: lse +inf makes the recomputed weights exp(S − lse) 0
            lse_safe = torch.where(torch.isneginf(lse), float("inf"), lse)
            tm = {name: g.transpose(1, 2) for name, g in grads.items()}  # (B, T, H, W)
            dout, out = unit_stride(dout), unit_stride(out)
            stacked.backward(x, ctx.jobs, p.scale, dout, out, lse_safe, tm)
        else:
            if bias_grad:
                shape4 = (1,) * (4 - bias.dim()) + tuple(bias.shape)
                grads["bias"] = torch.zeros(shape4, dtype=stat, device=q.device)
            dout, out = _token_major(dout).transpose(1, 2), _token_major(out).transpose(1, 2)
            for blk in ctx.plan:
                for seg in blk.segments:
                    _segment_backward(x, p, bias, blk, seg, ctx.seed, engine, dout, out, lse, grads)
        if use_jobs and ctx.keys is not None:  # back from the compacted keys to all Tk
            for name in ("k", "v"):
                full = torch.zeros(p.B, p.Hq, p.Tk, x.width, dtype=stat, device=q.device)
                grads[name] = full.index_copy_(2, ctx.keys, grads[name])
        group = p.group
        dq = grads["q"][..., : p.D].to(q.dtype)
        # kv heads were shared by `group` query heads: their gradients add up
        dk, dv = grads["k"][..., : p.D], grads["v"][..., : p.Dv]
        if group > 1:
            dk, dv = (t.unflatten(1, (p.Hkv, group)).sum(2) for t in (dk, dv))
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
        dbias = grads["bias"].reshape(bias.shape).to(bias.dtype) if bias_grad else None
        return dq, dk, dv, dbias, None, None, None, None, None, None


def _weights(x: _Inputs, p: Problem, bias, plan, lse) -> torch.Tensor:
    """(B, Hq, Tq, Tk) weights recomputed tile by tile as exp(S − lse)."""
    stat = _stat_dtype(x.q.dtype)
    w = x.q.new_zeros(p.B, p.Hq, p.Tq, p.Tk)
    for blk in plan:
        l_blk = lse[:, :, blk.q0 : blk.q1, None]  # (B, Hq, q, 1)
        l_safe = torch.where(torch.isneginf(l_blk), float("inf"), l_blk)
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
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    refine_rows: int = REFINE_ROWS,
) -> AttentionOutput:
    pattern = _pattern(p, q.device)
    if pattern is not None:
        pattern = (*pattern, block_q, block_k)
    plan = _cached(
        None if pattern is None else ("plan", pattern),
        lambda: plan_tiles(p.mask, p.Tq, p.Tk, block_q, block_k, device=q.device),
    )
    # torch's fused CPU kernel returns the lse; elsewhere the math engine keeps the same
    # tiling (correct on any device, without the fused speed)
    engine = "fused" if q.device.type == "cpu" and p.dropout_p == 0 else "math"
    if p.bias is not None and p.bias.requires_grad and torch.is_grad_enabled():
        # the bias gradient is recomputed by the math engine as exp(S − lse): an lse from
        # the fused kernel (which scales inside its product) differs from it by |S|·eps,
        # which large scores turned into 1e-5 errors in float32 gradients
        engine = "math"
    seed = 0
    if p.dropout_p > 0:
        seed = int(torch.randint(0, 2**62, (), generator=p.generator, device=q.device))
    bias = p.bias
    if p.dropout_p >= 1.0:  # everything dropped; keep the graph for zero gradients
        zero = (q.sum() + k.sum() + v.sum()) * 0
        out = zero + q.new_zeros(p.B, p.Hq, p.Tq, p.Dv)
        _, lse = _Tiled.apply(
            q.detach(), k.detach(), v.detach(), None, p, plan, 0, "fused", refine_rows, pattern
        )
    else:
        out, lse = _Tiled.apply(q, k, v, bias, p, plan, seed, engine, refine_rows, pattern)
    weights = None
    if p.need_weights:
        with torch.no_grad():
            weights = _weights(_Inputs(q, k, v, p), p, bias, plan, lse).to(q.dtype)
    return AttentionOutput(output=out, weights=weights, lse=lse if p.need_lse else None)
