"""What ring attention computes and sends at each step, from the global mask's tile kinds.

Letters: W world size, r this rank, T = W·S the global length, S shard length,
c the length of one chunk (S for the contiguous layout, S / 2 for zigzag).

At step s rank r holds the key/value block of rank src = (r - s) mod W. The mask is over
*global* positions and the same on every rank, so every rank can work out the same
schedule without talking:

- a rank's shard is one chunk (contiguous) or two (zigzag) of c positions; the (query
  chunk × key chunk) rectangles of a step are crops of the global mask (`Mask.crop`),
  each planned into tiles by the tile engine like any other mask;
- one call of `region_kinds` with c × c tiles says which chunk pairs hold any allowed
  pair (`Schedule.needed[r][src]`): a step whose rectangles are all empty is skipped;
- a key block only has to travel as far as the farthest rank that needs it: the ring
  runs `hops` = max over (r, src) of the distance (r - src) mod W of a needed pair, and
  stops there. A causal window narrower than a shard needs one hop on a contiguous ring,
  whatever W: the other W - 2 steps are neither computed nor sent nor waited for.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..masks import EMPTY, Mask
from .layout import chunk_ranges

__all__ = ["Rect", "Schedule", "schedule", "step_rects"]


@dataclass(frozen=True)
class Rect:
    """Local queries [q0, q1) × keys [k0, k1) of the block in hand; `mask` the global
    mask cropped to them (None: all allowed)."""

    q0: int
    q1: int
    k0: int
    k1: int
    mask: Mask | None


def _chunks(rank: int, W: int, T: int, layout: str) -> list[tuple[int, int, int]]:
    """(local start, global start, length) of each chunk of rank's shard."""
    out, local = [], 0
    for a, b in chunk_ranges(rank, W, T, layout=layout):
        out.append((local, a, b - a))
        local += b - a
    return out


@dataclass(frozen=True)
class Schedule:
    """needed[r][src]: rank r's queries see some key of src's block; hops: ring steps
    after the first (0: every rank needs only its own block)."""

    needed: tuple[tuple[bool, ...], ...]
    hops: int


def schedule(mask: Mask | None, W: int, T: int, layout: str, device=None) -> Schedule:
    """The ring's schedule for `mask` over (T, T) global positions (the same on every rank)."""
    if mask is None:
        needed = tuple(tuple(True for _ in range(W)) for _ in range(W))
        return Schedule(needed, W - 1)
    c = T // W if layout == "contiguous" else T // (2 * W)
    kinds = mask.region_kinds(T, T, 0, T, 0, T, c, c, device)  # (Bm, Hm, n, n)
    live = (kinds != EMPTY).flatten(0, 1).any(0).cpu()  # (n, n): some pair allowed
    owner = [[g // c for _, g, _ in _chunks(r, W, T, layout)] for r in range(W)]
    needed = tuple(
        tuple(any(bool(live[i, j]) for i in owner[r] for j in owner[src]) for src in range(W))
        for r in range(W)
    )
    hops = max(((r - src) % W for r in range(W) for src in range(W) if needed[r][src]), default=0)
    return Schedule(needed, hops)


def step_rects(mask: Mask | None, rank: int, src: int, W: int, T: int, layout: str) -> list[Rect]:
    """The rectangles of rank's queries × src's keys, cropped from the global mask."""
    rects = []
    for qa, gq, lq in _chunks(rank, W, T, layout):
        for ka, gk, lk in _chunks(src, W, T, layout):
            crop = None if mask is None else mask.crop(T, T, gq, gq + lq, gk, gk + lk)
            rects.append(Rect(qa, qa + lq, ka, ka + lk, crop))
    return rects
