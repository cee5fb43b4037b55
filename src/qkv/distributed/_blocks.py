"""What one ring step computes: the tiles of (local queries × the key block in hand).

Letters: B batch, Hq query heads, Hkv key/value heads, G = Hq / Hkv, S shard length,
c = S / 2 (a zigzag chunk), q/k the rows/keys of one tile, D/Dv head dims.

At step s rank r holds the key/value block of rank src = (r - s) mod W. Which of its keys
the local queries may see follows from the global positions (layout.py) alone:

    causal=False                 one full S×S tile
    src == r (the diagonal)      one S×S causal tile (positions rise with the local index,
                                 so global causality is the local lower triangle)
    contiguous, src < r          one full tile: every key is earlier than every query
    contiguous, src > r          nothing: every key is later (the step is skipped)
    zigzag, src < r              all S queries × the early key chunk src (c keys): the late
                                 key chunk 2W-1-src lies after both query chunks
    zigzag, src > r              the late query chunk 2W-1-r (c rows) × all S keys: both key
                                 chunks lie before it and after the early query chunk r

so a zigzag off-diagonal step is always half a block, on every rank (Brandon et al. 2023).
Padding (global key lengths) is ANDed in as a per-key mask where a tile needs it.

Two engines, the same math:
- "fused": torch's fused CPU kernel (`_scaled_dot_product_flash_attention_for_cpu` and its
  backward) on token-major storage, for float32/bfloat16 on the CPU with D == Dv;
- "math": matmuls in float64 (float64 inputs) or float32, grouped heads without copying
  k and v — exact in float64, and it runs on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Tile", "plan_step", "tile_backward", "tile_forward"]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class Tile:
    """Rows [q0, q1) of the local queries against keys [k0, k1) of the block in hand."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool  # a diagonal tile: query i sees keys j <= i (local indices)
    allowed: torch.Tensor | None = None  # (B|1, 1, q|1, k) bool, True = may attend


def plan_step(
    rank: int,
    src: int,
    S: int,
    *,
    layout: str,
    causal: bool,
    key_pos: torch.Tensor,
    lengths: torch.Tensor | None,
) -> list[Tile]:
    """The tiles rank computes against src's keys (global positions key_pos (S,))."""
    if not causal:
        tiles = [Tile(0, S, 0, S, False)]
    elif src == rank:
        tiles = [Tile(0, S, 0, S, True)]
    elif layout == "contiguous":
        tiles = [Tile(0, S, 0, S, False)] if src < rank else []
    elif src < rank:
        tiles = [Tile(0, S, 0, S // 2, False)]
    else:
        tiles = [Tile(S // 2, S, 0, S, False)]
    if lengths is None:
        return tiles
    return [t for t in (_with_padding(t, key_pos, lengths) for t in tiles) if t is not None]


def _with_padding(tile: Tile, key_pos: torch.Tensor, lengths: torch.Tensor) -> Tile | None:
    """The tile with its padding mask, None when every key is padding in every batch row."""
    pos = key_pos[tile.k0 : tile.k1]  # (k,)
    if int(pos.min()) >= int(lengths.max()):
        return None
    if int(pos.max()) < int(lengths.min()):
        return tile  # every key is real in every batch row: no mask needed
    allowed = (pos[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, k)
    if tile.causal:
        q = tile.q1 - tile.q0
        tri = torch.ones(q, tile.k1 - tile.k0, dtype=torch.bool, device=pos.device).tril()
        allowed = allowed & tri  # (B, 1, q, k)
    return Tile(tile.q0, tile.q1, tile.k0, tile.k1, tile.causal, allowed)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and accumulators: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def choose_engine(q: torch.Tensor, D: int, Dv: int) -> str:
    fused = q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and Dv == D
    return "fused" if fused else "math"


def _allowed(tile: Tile, device) -> torch.Tensor | None:
    """(B|1, 1, q|1, k) bool mask of the tile, None when every pair is allowed."""
    if tile.allowed is not None:
        return tile.allowed
    if tile.causal:
        q, k = tile.q1 - tile.q0, tile.k1 - tile.k0
        return torch.ones(q, k, dtype=torch.bool, device=device).tril()[None, None]
    return None


def _additive(allowed: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if allowed is None:
        return None
    add = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return add.masked_fill_(~allowed, float("-inf"))


def _fused_mask(tile: Tile, dtype) -> tuple[torch.Tensor | None, bool]:
    """(additive mask, is_causal) for the fused kernel: its own causal mode when it can."""
    if tile.causal and tile.allowed is None:
        return None, True
    return _additive(tile.allowed, dtype), False


def _group(x: torch.Tensor, G: int) -> torch.Tensor:
    """(B, Hq, n, d) -> (B, Hkv, G, n, d): query head h reads kv head h // G."""
    return x.unflatten(1, (x.shape[1] // G, G))


def tile_forward(engine, q, k, v, tile: Tile, scale: float, G: int):
    """(out (B, Hq, q, Dv), lse (B, Hq, q)) in the stat dtype; -inf lse on empty rows.

    q (B, Hq, S, D) local queries; k (B, H, S, D), v (B, H, S, Dv) the block in hand, with
    H = Hq (heads already expanded) for the fused engine and H = Hkv for the math one.
    """
    stat = stat_dtype(q.dtype)
    qt = q[:, :, tile.q0 : tile.q1]
    kt, vt = k[:, :, tile.k0 : tile.k1], v[:, :, tile.k0 : tile.k1]
    if engine == "fused":
        add, is_causal = _fused_mask(tile, q.dtype)
        out, lse = _flash(qt, kt, vt, 0.0, is_causal, attn_mask=add, scale=scale)
        out, lse = out.to(stat), lse.to(stat)
    else:
        q5 = _group(qt, G).to(stat)  # (B, Hkv, G, q, D)
        s = (q5 @ kt.to(stat)[:, :, None].transpose(-2, -1)) * scale  # (B, Hkv, G, q, k)
        add = _additive(_allowed(tile, q.device), stat)
        if add is not None:
            s = s + add[:, :, None]  # (B|1, 1, 1, q|1, k) over the grouped heads
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no key
        e = torch.exp(s - m)  # (B, Hkv, G, q, k)
        total = e.sum(-1, keepdim=True)
        lse = (m + torch.log(total)).squeeze(-1).flatten(1, 2)  # (B, Hq, q), -inf if empty
        probs = e / torch.where(total > 0, total, torch.ones_like(total))
        out = (probs @ vt.to(stat)[:, :, None]).flatten(1, 2)  # (B, Hq, q, Dv)
    if tile.allowed is not None:
        # the fused kernel reports lse = 0, not -inf, for a row whose mask is all -inf
        rows = tile.allowed.any(-1)  # (B|1, 1, q|1)
        if not bool(rows.all()):
            lse = torch.where(rows, lse, float("-inf"))
    return out, lse


def merge(out, lse, out_t, lse_t):
    """Combine two partial results over disjoint keys; rows empty in both stay 0 / -inf.

    lse = logaddexp(lse1, lse2), out = out1·exp(lse1 - lse) + out2·exp(lse2 - lse).
    """
    new = torch.logaddexp(lse, lse_t)  # (B, Hq, q)
    live = torch.isfinite(new)
    w_old = torch.where(live, torch.exp(lse - new), 0.0)[..., None]
    w_new = torch.where(live, torch.exp(lse_t - new), 0.0)[..., None]
    return out * w_old + out_t * w_new, new


def tile_backward(engine, q, k, v, dout, out, lse, delta, tile: Tile, scale: float, G: int):
    """(dq (B, Hq, q, D), dk (B, Hkv, k, D), dv (B, Hkv, k, Dv)) of one tile, stat dtype.

    dout, out (B, Hq, S, Dv) and lse (B, Hq, S) are the *global* ones: the weights of the
    tile are exp(S - lse), so no other block is needed. lse must be +inf (not -inf) on
    rows that see nothing anywhere, so that their weights come out 0. delta (B, Hq, S) is
    rowsum(dout ⊙ out) in the stat dtype (used by the math engine).
    """
    stat = stat_dtype(q.dtype)
    rows = slice(tile.q0, tile.q1)
    qt, dot, ot, lt = q[:, :, rows], dout[:, :, rows], out[:, :, rows], lse[:, :, rows]
    kt, vt = k[:, :, tile.k0 : tile.k1], v[:, :, tile.k0 : tile.k1]
    if engine == "fused":
        add, is_causal = _fused_mask(tile, q.dtype)
        dq, dk, dv = _flash_backward(
            dot, qt, kt, vt, ot, lt, 0.0, is_causal, attn_mask=add, scale=scale
        )
        # kv heads were expanded for the kernel: sum the G query heads that share one
        dk = _group(dk.to(stat), G).sum(2)  # (B, Hkv, k, D)
        dv = _group(dv.to(stat), G).sum(2)  # (B, Hkv, k, Dv)
        return dq.to(stat), dk, dv
    q5, do5 = _group(qt, G).to(stat), _group(dot, G).to(stat)  # (B, Hkv, G, q, ·)
    k5, v5 = kt.to(stat)[:, :, None], vt.to(stat)[:, :, None]  # (B, Hkv, 1, k, ·)
    s = (q5 @ k5.transpose(-2, -1)) * scale  # (B, Hkv, G, q, k)
    add = _additive(_allowed(tile, q.device), stat)
    if add is not None:
        s = s + add[:, :, None]
    probs = torch.exp(s - _group(lt, G)[..., None])  # (B, Hkv, G, q, k): the global weights
    dprobs = do5 @ v5.transpose(-2, -1)  # (B, Hkv, G, q, k)
    # softmax Jacobian: dS = P ⊙ (dP − rowsum(dO ⊙ O))
    ds = probs * (dprobs - _group(delta[:, :, rows], G)[..., None])
    dq = (ds @ k5).flatten(1, 2) * scale  # (B, Hq, q, D)
    dk = (ds.transpose(-2, -1) @ q5).sum(2) * scale  # (B, Hkv, k, D)
    dv = (probs.transpose(-2, -1) @ do5).sum(2)  # (B, Hkv, k, Dv)
    return dq, dk, dv
