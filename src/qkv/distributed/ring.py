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

Each step runs on the tile engine (kernels/engine.py): the rectangles of (local queries ×
the block in hand) are crops of the global mask, planned into tiles like any mask, so
every mask qkv has (windows, packed documents, padding, their combinations) works across
the ring, empty tiles are skipped, and float32 tiles run on the native kernel where the
engine would use it. Which blocks a rank needs follows from the mask alone (_steps.py):
steps no query of the rank can see are not computed, and the ring stops after the last
hop any rank needs (a window narrower than a shard: one hop, whatever W).

The backward pass (Liu et al. 2023, §3) passes k, v around the ring again, together with
the gradient accumulators dk, dv of the block in hand: each rank adds its contribution
and hands them on; after the last hop each accumulator goes back to the rank that owns
the block. Only the global output and log-sum-exp are needed to recompute a tile's
weights, so the memory per rank is O(S), and no rank holds more than two key/value blocks.

Bytes sent per rank per call, with h the hops the mask needs (W-1 for causal or no mask):
forward h·|kv|, backward h·|kv| + (h+1)·|dkv| (h = 0: nothing), with
|kv| = B·S·Hkv·(D+Dv)·itemsize (dkv in float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._types import AttentionOutput, Problem
from ..kernels import engine
from ..kernels.merge import merge, stat_dtype
from ..kernels.plan import TileConfig
from ..kernels.tiled import PLANS
from ..masks import Mask
from ._checks import RingSpec, check_inputs, group_ranks
from ._steps import step_rects

__all__ = ["RingStats", "ring_attention"]


@dataclass
class RingStats:
    """Counters that ring_attention adds to when one is passed (for benchmarks).

    bytes_sent: bytes this rank sent (forward and backward);
    bytes_received: bytes this rank received;
    messages: point-to-point sends;
    steps_computed / steps_skipped: ring steps (forward and backward) whose key block this
        rank's queries see / do not see (skipped steps compute nothing);
    wait_s: seconds blocked waiting for transfers: the communication the overlap did not
        hide (with overlap=False, all of it);
    compute_s: seconds spent in the attention tiles and merges.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    steps_computed: int = 0
    steps_skipped: int = 0
    wait_s: float = 0.0
    compute_s: float = 0.0


class _Ring:
    """Point-to-point transfers to the next rank and from the previous one."""

    def __init__(self, group, rank: int, world: int, ranks: list[int], stats: RingStats):
        self.group, self.rank, self.world, self.ranks = group, rank, world, ranks
        self.next, self.prev = ranks[(rank + 1) % world], ranks[(rank - 1) % world]
        self.stats = stats

    def global_rank(self, r: int) -> int:
        """The global rank of group rank r (point-to-point ops address global ranks)."""
        return self.ranks[r % self.world]

    def start(self, send, recv, tag: int, *, to: int | None = None, frm: int | None = None):
        """Start sending `send` (to the next rank, or `to`) and receiving into `recv` (from
        the previous rank, or `frm`); either may be None.

        Both go in one batch_isend_irecv: NCCL needs the pair grouped (two ranks that each
        post a send before their receive would otherwise wait on each other); gloo simply
        starts both.
        """
        ops = []
        if send is not None:
            dst = self.next if to is None else to
            ops.append(dist.P2POp(dist.isend, send, dst, group=self.group, tag=tag))
            self.stats.bytes_sent += send.numel() * send.element_size()
            self.stats.messages += 1
        if recv is not None:
            src = self.prev if frm is None else frm
            ops.append(dist.P2POp(dist.irecv, recv, src, group=self.group, tag=tag))
            self.stats.bytes_received += recv.numel() * recv.element_size()
        return list(dist.batch_isend_irecv(ops)) if ops else []

    def wait(self, works: list) -> None:
        """Wait for the transfers and empty the list: gloo's wait() on a finished send
        would wait for a second one, so each transfer must be waited for exactly once."""
        t0 = time.perf_counter()
        while works:
            works.pop().wait()
        self.stats.wait_s += time.perf_counter() - t0


_KV, _DKV, _OWN = 0, 1, 2  # message tags: key/value blocks, accumulators, finished ones


def _pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k (B, Hkv, S, D), v (B, Hkv, S, Dv) -> one flat token-major buffer, one message."""
    return torch.cat([k.transpose(1, 2).reshape(-1), v.transpose(1, 2).reshape(-1)])


def _unpack(flat: torch.Tensor, spec: RingSpec):
    """Flat buffer -> k (B, Hkv, S, D), v (B, Hkv, S, Dv) views of (B, S, Hkv, ·) storage."""
    B, S, Hkv = spec.B, spec.S, spec.Hkv
    nk = B * S * Hkv * spec.D
    k = flat[:nk].view(B, S, Hkv, spec.D)  # (B, S, Hkv, D)
    v = flat[nk:].view(B, S, Hkv, spec.Dv)  # (B, S, Hkv, Dv)
    return k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, S, ·)


class _Step:
    """The tiles rank computes against src's block: (rectangle, problem, plan) triples
    planned once in the forward and reused by the backward."""

    def __init__(self, ring: _Ring, spec: RingSpec, src: int, q: torch.Tensor) -> None:
        T = ring.world * spec.S
        self.parts = []
        for rect in step_rects(spec.mask, ring.rank, src, ring.world, T, spec.layout):
            lq, lk = rect.q1 - rect.q0, rect.k1 - rect.k0
            p = Problem(
                B=spec.B, Hq=spec.Hq, Hkv=spec.Hkv, Tq=lq, Tk=lk, D=spec.D, Dv=spec.Dv,
                mask=rect.mask, is_causal=False, bias=None, scale=spec.scale, dropout_p=0.0,
                generator=None, need_weights=False, need_lse=True, dtype=q.dtype,
                device=q.device, needs_grad=False, direct=spec.direct,
            )  # fmt: skip
            plan = PLANS.get(rect.mask, lq, lk, spec.config, q.device)
            if any(blk.segments for blk in plan.blocks):
                self.parts.append((rect, p, plan))


def _hand_on(ring: _Ring, spec: RingSpec, step: int, cur, nxt) -> tuple[int, list]:
    """The rank whose block is in hand at `step`, and the transfers that hand it on to
    the next rank (and bring the next block in), started before computing with it so that
    they overlap the compute (none after the last hop)."""
    works = ring.start(cur, nxt, _KV) if step < spec.schedule.hops else []
    if not spec.overlap:
        ring.wait(works)
    return (ring.rank - step) % ring.world, works


def _forward(q, k, v, ring: _Ring, spec: RingSpec):
    """out (B, Hq, S, Dv) and lse (B, Hq, S) in the stat dtype; lse -inf on empty rows,
    and the steps planned (for the backward)."""
    stat = stat_dtype(q.dtype)
    hops = spec.schedule.hops
    out = q.new_zeros(spec.B, spec.S, spec.Hq, spec.Dv, dtype=stat).transpose(1, 2)
    lse = q.new_full((spec.B, spec.Hq, spec.S), float("-inf"), dtype=stat)
    cur = _pack(k.detach(), v.detach())  # the block in hand: this rank's own first
    nxt = torch.empty_like(cur) if hops > 0 else None
    steps: dict[int, _Step] = {}
    for step in range(hops + 1):
        src, works = _hand_on(ring, spec, step, cur, nxt)
        t0 = time.perf_counter()
        if spec.schedule.needed[ring.rank][src]:
            ring.stats.steps_computed += 1
            steps[src] = _Step(ring, spec, src, q)
            kb, vb = _unpack(cur, spec)
            for rect, p, plan in steps[src].parts:
                rows = slice(rect.q0, rect.q1)
                qt, kt, vt = q[:, :, rows], kb[:, :, rect.k0 : rect.k1], vb[:, :, rect.k0 : rect.k1]
                o_t, l_t = engine.forward(qt, kt, vt, p, plan, engine=spec.engine)
                out[:, :, rows], lse[:, :, rows] = merge(out[:, :, rows], lse[:, :, rows], o_t, l_t)
        else:
            ring.stats.steps_skipped += 1
        ring.stats.compute_s += time.perf_counter() - t0
        ring.wait(works)
        cur, nxt = nxt, cur
    return out, lse, steps


def _backward(dout, q, k, v, out, lse, steps, ring: _Ring, spec: RingSpec):
    """dq (B, Hq, S, D), dk (B, Hkv, S, D), dv (B, Hkv, S, Dv) in the stat dtype."""
    stat = stat_dtype(q.dtype)
    hops = spec.schedule.hops
    dq = q.new_zeros(spec.B, spec.S, spec.Hq, spec.D, dtype=stat).transpose(1, 2)
    kv_cur = _pack(k, v)
    kv_nxt = torch.empty_like(kv_cur) if hops > 0 else None
    n_dkv = spec.B * spec.S * spec.Hkv * (spec.D + spec.Dv)
    dkv_in = q.new_empty(n_dkv, dtype=stat) if hops > 0 else None
    # this rank's own accumulator comes back from the rank that adds the last share
    own = q.new_empty(n_dkv, dtype=stat) if hops > 0 else None
    own_works = ring.start(None, own, _OWN, frm=ring.global_rank(ring.rank + hops)) if hops else []
    dkv_works: list = []
    home: list = []  # (accumulator, transfers): finished shares on their way to the owner
    for step in range(hops + 1):
        src, kv_works = _hand_on(ring, spec, step, kv_cur, kv_nxt)
        t0 = time.perf_counter()
        dkv = q.new_zeros(n_dkv, dtype=stat)  # this rank's share of src's dk, dv
        if src in steps:
            ring.stats.steps_computed += 1
            kb, vb = _unpack(kv_cur, spec)
            dk, dv = _unpack(dkv, spec)  # (B, Hkv, S, ·) views of the accumulator
            for rect, p, plan in steps[src].parts:
                rows, keys = slice(rect.q0, rect.q1), slice(rect.k0, rect.k1)
                dq_t, dk_t, dv_t, _ = engine.backward(
                    q[:, :, rows], kb[:, :, keys], vb[:, :, keys], out[:, :, rows],
                    lse[:, :, rows], dout[:, :, rows], p, plan, engine=spec.engine,
                )  # fmt: skip
                dq[:, :, rows] += dq_t
                dk[:, :, keys] += dk_t
                dv[:, :, keys] += dv_t
        else:
            ring.stats.steps_skipped += 1
        ring.stats.compute_s += time.perf_counter() - t0
        if step > 0:  # what the ranks before this one added for src's block
            ring.wait(dkv_works)
            dkv += dkv_in
        if step < hops:  # hand the accumulator on; the next block's comes in meanwhile
            dkv_works = ring.start(dkv, dkv_in, _DKV)
            if not spec.overlap:
                ring.wait(dkv_works)
        elif hops > 0:  # the last share of src's block: home to its owner
            home.append((dkv, ring.start(dkv, None, _OWN, to=ring.global_rank(src))))
        else:
            own = dkv
        ring.wait(kv_works)
        kv_cur, kv_nxt = kv_nxt, kv_cur
    ring.wait(own_works)
    for _, works in home:
        ring.wait(works)
    dk, dv = _unpack(own, spec)
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring, spec: RingSpec):
        out, lse, steps = _forward(q, k, v, ring, spec)
        out = out.to(q.dtype).contiguous()  # (B, Hq, S, Dv)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.spec, ctx.steps = ring, spec, steps
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, ctx.steps, ctx.ring, ctx.spec)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Mask | None = None,
    causal: bool = False,
    group: dist.ProcessGroup | None = None,
    padding=None,
    layout: str = "contiguous",
    scale: float | None = None,
    return_lse: bool = False,
    overlap: bool = True,
    stats: RingStats | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor | AttentionOutput:
    """Attention over a sequence sharded along dim -2 across the ranks of `group`.

    Every rank of the group must call it (and the backward) with shards of one shape;
    the result equals `qkv.attention` on the full sequence, sharded the same way.

    Args:
        q: (B, Hq, S, D) this rank's queries; the global length is T = W·S.
        k: (B, Hkv, S, D) this rank's keys; Hq must be a multiple of Hkv (grouped-query).
        v: (B, Hkv, S, Dv) this rank's values.
        mask: any `qkv.masks` mask over *global* positions of a (T, T) problem, the same
            object on every rank: windows, packed documents (ids (B, T) of the whole
            sequence), padding, their combinations; ANDed with causal and padding.
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
        config: the tile sizes of each step's tiles (a `qkv.kernels.TileConfig`).

    Returns:
        The output (B, Hq, S, Dv) for this rank's queries, in the input dtype; with
        return_lse an `AttentionOutput(output, None, lse)`.

    A query row that sees no key (all padding) gets output 0, lse -inf and zero gradients.
    Steps whose keys no query of this rank may see are skipped, and the ring stops after
    the farthest hop any rank needs (see docs/ring.md).
    """
    rank, world, ranks = group_ranks(group)
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
        mask=mask,
        causal=causal,
        padding=padding,
        layout=layout,
        scale=scale,
        overlap=overlap,
        config=config,
    )
    ring = _Ring(group, rank, world, ranks, stats if stats is not None else RingStats())
    out, lse = _RingAttention.apply(q, k, v, ring, spec)
    return AttentionOutput(output=out, lse=lse) if return_lse else out
