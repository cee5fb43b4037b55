"""Ring attention: exact attention over a sequence sharded across the ranks of a group.

Letters: W world size, r this rank, B batch, Hq query heads, Hkv key/value heads,
G = Hq / Hkv, S shard length (T = W·S), D/Dv head dims.

Ring Attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers for
Near-Infinite Context") keeps each rank's queries in place and passes the key/value blocks
around a ring: at step s rank r holds the block of rank (r - s) mod W, starts sending it
to rank r+1 (and receiving the next one from r-1) *before* computing on it, so the
transfer hides behind the block's attention whenever compute takes longer than the send.
The W partial results of a query row are over disjoint keys and merge exactly through
their log-sum-exp (as in FlashAttention's online softmax).

The backward pass (Liu et al. 2023, §3) passes k, v around the ring again, together with
the gradient accumulators dk, dv of the block in hand: each rank adds its contribution
and hands them on; after W hops each accumulator is back on the rank that owns the block.
Only the global output and log-sum-exp are needed to recompute a tile's weights, so the
memory per rank is O(S), and no rank ever holds more than two key/value blocks.

Bytes sent per rank per call: forward (W-1)·|kv|, backward (W-1)·|kv| + W·|dkv|, with
|kv| = B·S·Hkv·(D+Dv)·itemsize (dkv in float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._types import AttentionOutput
from ._blocks import merge, plan_step, stat_dtype, tile_backward, tile_forward
from ._checks import RingSpec, check_inputs, group_ranks
from .layout import positions

__all__ = ["RingStats", "ring_attention"]


@dataclass
class RingStats:
    """Counters that ring_attention adds to when one is passed (for benchmarks).

    bytes_sent: bytes this rank sent (forward and backward);
    messages: point-to-point sends;
    wait_s: seconds blocked waiting for transfers: the communication the overlap did not
        hide (with overlap=False, all of it);
    compute_s: seconds spent in the attention tiles and merges.
    """

    bytes_sent: int = 0
    messages: int = 0
    wait_s: float = 0.0
    compute_s: float = 0.0


class _Ring:
    """Point-to-point transfers to the next rank and from the previous one."""

    def __init__(self, group, rank: int, world: int, nxt: int, prev: int, stats: RingStats):
        self.group, self.rank, self.world = group, rank, world
        self.next, self.prev, self.stats = nxt, prev, stats

    def start(self, send: torch.Tensor, recv: torch.Tensor, tag: int) -> list:
        """Start sending `send` to the next rank and receiving into `recv` from the previous.

        Both go in one batch_isend_irecv: NCCL needs the pair grouped (two ranks that each
        post a send before their receive would otherwise wait on each other); gloo simply
        starts both.
        """
        ops = [
            dist.P2POp(dist.isend, send, self.next, group=self.group, tag=tag),
            dist.P2POp(dist.irecv, recv, self.prev, group=self.group, tag=tag),
        ]
        works = list(dist.batch_isend_irecv(ops))
        self.stats.bytes_sent += send.numel() * send.element_size()
        self.stats.messages += 1
        return works

    def wait(self, works: list) -> None:
        """Wait for the transfers and empty the list: gloo's wait() on a finished send
        would wait for a second one, so each transfer must be waited for exactly once."""
        t0 = time.perf_counter()
        while works:
            works.pop().wait()
        self.stats.wait_s += time.perf_counter() - t0


_KV, _DKV = 0, 1  # message tags: key/value blocks, gradient accumulators


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> the same values over (B, S, H, D) storage (the fused kernel's layout)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k (B, Hkv, S, D), v (B, Hkv, S, Dv) -> one flat token-major buffer, one message."""
    return torch.cat([k.transpose(1, 2).reshape(-1), v.transpose(1, 2).reshape(-1)])


def _unpack(flat: torch.Tensor, spec: RingSpec, expand: bool = False):
    """Flat buffer -> k (B, H, S, D), v (B, H, S, Dv) views of (B, S, H, ·) storage.

    H = Hkv, or Hq with expand=True: the fused kernel wants one kv head per query head,
    so each kv head is copied G times (a copy of S·Hq·D values per step, against the
    S²·Hq·D multiply-adds of the step).
    """
    B, S, Hkv = spec.B, spec.S, spec.Hkv
    nk = B * S * Hkv * spec.D
    k = flat[:nk].view(B, S, Hkv, spec.D)  # (B, S, Hkv, D)
    v = flat[nk:].view(B, S, Hkv, spec.Dv)  # (B, S, Hkv, Dv)
    G = spec.group_size
    if expand and G > 1:
        k = k[:, :, :, None].expand(B, S, Hkv, G, spec.D).reshape(B, S, spec.Hq, spec.D)
        v = v[:, :, :, None].expand(B, S, Hkv, G, spec.Dv).reshape(B, S, spec.Hq, spec.Dv)
    return k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, ·)


def _tiles(ring: _Ring, spec: RingSpec, src: int, device):
    key_pos = positions(src, ring.world, ring.world * spec.S, layout=spec.layout, device=device)
    return plan_step(
        ring.rank,
        src,
        spec.S,
        layout=spec.layout,
        causal=spec.causal,
        key_pos=key_pos,
        lengths=spec.lengths,
    )


def _forward(q, k, v, ring: _Ring, spec: RingSpec):
    """out (B, Hq, S, Dv) and lse (B, Hq, S) in the stat dtype; lse -inf on empty rows."""
    stat = stat_dtype(q.dtype)
    fused = spec.engine == "fused"
    W, G = ring.world, spec.group_size
    qx = _token_major(q) if fused else q  # (B, Hq, S, D)
    out = q.new_zeros(spec.B, spec.S, spec.Hq, spec.Dv, dtype=stat).transpose(1, 2)
    lse = q.new_full((spec.B, spec.Hq, spec.S), float("-inf"), dtype=stat)
    cur = _pack(k.detach(), v.detach())  # the block in hand: this rank's own first
    nxt = torch.empty_like(cur) if W > 1 else None
    for step in range(W):
        src = (ring.rank - step) % W
        # hand the block on before computing with it: the send overlaps the compute
        works = ring.start(cur, nxt, _KV) if step < W - 1 else []
        if not spec.overlap:
            ring.wait(works)
        t0 = time.perf_counter()
        tiles = _tiles(ring, spec, src, q.device)
        if tiles:
            kb, vb = _unpack(cur, spec, expand=fused)
            for t in tiles:
                o_t, l_t = tile_forward(spec.engine, qx, kb, vb, t, spec.scale, G)
                rows = slice(t.q0, t.q1)
                out[:, :, rows], lse[:, :, rows] = merge(out[:, :, rows], lse[:, :, rows], o_t, l_t)
        ring.stats.compute_s += time.perf_counter() - t0
        ring.wait(works)
        cur, nxt = nxt, cur
    return out, lse


def _backward(dout, q, k, v, out, lse, ring: _Ring, spec: RingSpec):
    """dq (B, Hq, S, D), dk (B, Hkv, S, D), dv (B, Hkv, S, Dv) in the stat dtype."""
    stat = stat_dtype(q.dtype)
    fused = spec.engine == "fused"
    W, G = ring.world, spec.group_size
    if fused:
        q, dout, out = (_token_major(t) for t in (q, dout.to(q.dtype), out))
        delta = None
    else:
        delta = (dout.to(stat) * out.to(stat)).sum(-1)  # (B, Hq, S) = rowsum(dO ⊙ O)
    # rows that see nothing anywhere: +inf makes their recomputed weights exp(S - lse) = 0
    lse = torch.where(torch.isneginf(lse), float("inf"), lse)
    dq = q.new_zeros(spec.B, spec.S, spec.Hq, spec.D, dtype=stat).transpose(1, 2)
    kv_cur = _pack(k, v)
    kv_nxt = torch.empty_like(kv_cur) if W > 1 else None
    n_dkv = spec.B * spec.S * spec.Hkv * (spec.D + spec.Dv)
    dkv_in = q.new_empty(n_dkv, dtype=stat) if W > 1 else None
    dkv_works: list = []
    for step in range(W):
        src = (ring.rank - step) % W
        kv_works = ring.start(kv_cur, kv_nxt, _KV) if step < W - 1 else []
        if not spec.overlap:
            ring.wait(kv_works)
        t0 = time.perf_counter()
        dkv = q.new_zeros(n_dkv, dtype=stat)  # this rank's share of src's dk, dv
        tiles = _tiles(ring, spec, src, q.device)
        if tiles:
            kb, vb = _unpack(kv_cur, spec, expand=fused)
            dk, dv = _unpack(dkv, spec)  # (B, Hkv, S, ·) views of the accumulator
            for t in tiles:
                dq_t, dk_t, dv_t = tile_backward(
                    spec.engine, q, kb, vb, dout, out, lse, delta, t, spec.scale, G
                )
                dq[:, :, t.q0 : t.q1] += dq_t
                dk[:, :, t.k0 : t.k1] += dk_t
                dv[:, :, t.k0 : t.k1] += dv_t
        ring.stats.compute_s += time.perf_counter() - t0
        if W > 1:
            if step > 0:  # what the ranks before this one added for src's block
                ring.wait(dkv_works)
                dkv += dkv_in
            # hand the accumulator on; the one for the next block comes in meanwhile
            dkv_works = ring.start(dkv, dkv_in, _DKV)
            if not spec.overlap:
                ring.wait(dkv_works)
        ring.wait(kv_works)
        kv_cur, kv_nxt = kv_nxt, kv_cur
    if W > 1:
        # after W hops the accumulator that arrives is this rank's own block, complete
        ring.wait(dkv_works)
        dkv = dkv_in
    dk, dv = _unpack(dkv, spec)
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring, spec: RingSpec):
        out, lse = _forward(q, k, v, ring, spec)
        out = out.to(q.dtype).contiguous()  # (B, Hq, S, Dv)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.spec = ring, spec
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, ctx.ring, ctx.spec)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    group: dist.ProcessGroup | None = None,
    padding=None,
    layout: str = "contiguous",
    scale: float | None = None,
    return_lse: bool = False,
    overlap: bool = True,
    stats: RingStats | None = None,
) -> torch.Tensor | AttentionOutput:
    """Attention over a sequence sharded along dim -2 across the ranks of `group`.

    Every rank of the group must call it (and the backward) with shards of one shape;
    the result equals `qkv.attention` on the full sequence, sharded the same way.

    Args:
        q: (B, Hq, S, D) this rank's queries; the global length is T = W·S.
        k: (B, Hkv, S, D) this rank's keys; Hq must be a multiple of Hkv (grouped-query).
        v: (B, Hkv, S, Dv) this rank's values.
        causal: query at global position i sees keys at global positions j <= i.
        group: the process group of the ring (None: the default group).
        padding: None, global key lengths (B,) as ints, a 1-D int tensor or
            `qkv.masks.padding(lengths)`: key j (global) of batch row b is real when
            j < lengths[b]. The same on every rank.
        layout: how the sequence is sharded (see `qkv.distributed.shard`):
            "contiguous": rank r holds positions [r·S, (r+1)·S);
            "zigzag": the sequence is cut into 2W chunks and rank r holds chunks r and
            2W-1-r, which balances causal work (T must be divisible by 2W).
        scale: multiplies the scores; defaults to 1/sqrt(D).
        return_lse: also return the (B, Hq, S) log-sum-exp (float32+, no gradient).
        overlap: start each transfer before computing on the block in hand (default);
            False waits for every transfer first (for measuring what the overlap hides).
        stats: a `RingStats` to add bytes sent and time spent to.

    Returns:
        The output (B, Hq, S, Dv) for this rank's queries, in the input dtype; with
        return_lse an `AttentionOutput(output, None, lse)`.

    A query row that sees no key (all padding) gets output 0, lse -inf and zero gradients.
    """
    rank, world, nxt, prev = group_ranks(group)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool; got {type(return_lse).__name__}")
    if stats is not None and not isinstance(stats, RingStats):
        raise TypeError(f"stats must be a qkv.distributed.RingStats; got {type(stats).__name__}")
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    spec = check_inputs(
        q,
        k,
        v,
        group=group,
        world=world,
        device=device,
        causal=causal,
        padding=padding,
        layout=layout,
        scale=scale,
        overlap=overlap,
    )
    ring = _Ring(group, rank, world, nxt, prev, stats if stats is not None else RingStats())
    out, lse = _RingAttention.apply(q, k, v, ring, spec)
    return AttentionOutput(output=out, lse=lse) if return_lse else out
