"""transformers' mask descriptions turned into structured qkv masks.

Letters: B batch, Tq/Tk query/key lengths, L the length of a 2-D (B, L) mask tensor.

transformers describes a mask by an index function `mask_function(b, h, q_idx, kv_idx)` of
*absolute* positions, composed from a few factories in `transformers.masking_utils`
(`causal_mask_function`, `sliding_window_overlay(w)`, `and_masks(...)`, ...), and passes it
with the 2-D padding mask and the offsets of queries and keys: query i stands at position
q_offset + i, key j at kv_offset + j. The factories return closures; each is recognised by
its code object, taken from the installed transformers (a factory that is renamed or
rewritten is simply not recognised), and its parameters are read from its closure cells.
Anything unrecognised raises `Unrecognised`; the caller then falls back on the dense mask
transformers' own code builds, and `agrees` checks a few rows of every translation against
the index function itself.

Band-shaped pieces (causal, sliding windows) are kept as an interval of j - i, so that a
window ANDed with causal becomes one `qkv.masks.window` whatever the cache offsets.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch

from ... import masks
from ...masks import Mask

__all__ = [
    "Grid",
    "Piece",
    "Unrecognised",
    "agrees",
    "band_mask",
    "is_causal",
    "key_mask",
    "to_mask",
    "translate",
]


class Unrecognised(Exception):
    """The mask function is not one this module knows how to keep structured."""


@dataclass(frozen=True)
class Grid:
    """Where the (Tq, Tk) problem sits in the sequence: query i at q_offset + i, key j at
    kv_offset + j."""

    B: int
    Tq: int
    Tk: int
    q_offset: int
    kv_offset: int
    device: torch.device

    @property
    def shift(self) -> int:
        """d with kv_pos - q_pos = (j - i) - d: a key at the query's own position has j - i = d."""
        return self.q_offset - self.kv_offset

    def q_pos(self) -> torch.Tensor:
        return torch.arange(self.Tq, device=self.device) + self.q_offset  # (Tq,)

    def kv_pos(self) -> torch.Tensor:
        return torch.arange(self.Tk, device=self.device) + self.kv_offset  # (Tk,)


@dataclass(frozen=True)
class Piece:
    """lo <= j - i <= hi (None: unbounded) AND `mask` (None: everything)."""

    lo: int | None = None
    hi: int | None = None
    mask: Mask | None = None

    @property
    def is_band(self) -> bool:
        return self.mask is None

    def __and__(self, other: Piece) -> Piece:
        lo = _pick(max, self.lo, other.lo)
        hi = _pick(min, self.hi, other.hi)
        return Piece(lo, hi, masks.combine(self.mask, other.mask))


ALL = Piece()


def _pick(choose, a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else choose(a, b)


def band_mask(lo: int | None, hi: int | None, grid: Grid) -> Mask | None:
    """lo <= j - i <= hi on this grid as public qkv masks (None: every pair allowed).

    qkv's masks are bottom-right aligned: `window(before, after)` allows j - i in
    [s - before, s + after] with s = Tk - Tq, and `causal()` is j - i <= s.
    """
    Tq, Tk, s = grid.Tq, grid.Tk, grid.Tk - grid.Tq
    lo = None if lo is not None and lo <= -(Tq - 1) else lo  # covers every row's first key
    hi = None if hi is not None and hi >= Tk - 1 else hi
    if lo is None and hi is None:
        return None
    if (lo is not None and (lo > Tk - 1 or (hi is not None and lo > hi))) or (
        hi is not None and hi < -(Tq - 1)
    ):
        return masks.padding(torch.zeros(grid.B, dtype=torch.long, device=grid.device))
    if lo is not None and hi is not None and lo <= s <= hi:
        return masks.window(s - lo, hi - s)
    big = Tq + Tk  # further than any pair of the grid

    def at_most(h: int) -> Mask:  # j - i <= h
        if h == s:
            return masks.causal()
        if h > s:
            return masks.window(big, h - s)
        return ~masks.window(s - h - 1, big)

    parts = []
    if hi is not None:
        parts.append(at_most(hi))
    if lo is not None:
        parts.append(~at_most(lo - 1))
    return masks.combine(*parts)


def is_causal(piece: Piece, grid: Grid) -> bool:
    """Whether the piece is exactly qkv's bottom-right causal mask on this grid."""
    lo_free = piece.lo is None or piece.lo <= -(grid.Tq - 1)
    return piece.mask is None and lo_free and piece.hi == grid.Tk - grid.Tq < grid.Tk - 1


def to_mask(piece: Piece, grid: Grid) -> Mask | None:
    return masks.combine(band_mask(piece.lo, piece.hi, grid), piece.mask)


def key_mask(keep: torch.Tensor, grid: Grid) -> Mask | None:
    """Keys kept per sequence, keep (B, Tk) bool, as a mask without a (Tq, Tk) tensor.

    A run of real keys [start, end) per row (left or right padding, or both) becomes
    `~padding(start) & padding(end)`; any other pattern a document mask whose query ids
    are 1 and key ids are keep (a key is seen when its id equals the query's).
    """
    if bool(keep.all()):
        return None
    B, Tk = keep.shape
    count = keep.sum(1)  # (B,)
    present = count > 0
    start = torch.where(present, keep.long().argmax(1), 0)  # first real key
    end = torch.where(present, Tk - keep.flip(1).long().argmax(1), 0)  # one past the last
    if bool((count == end - start).all()):
        parts = []
        if bool((start > 0).any()):
            parts.append(~masks.padding(start))
        if bool((end < Tk).any()):
            parts.append(masks.padding(end))
        return masks.combine(*parts)
    ones = torch.ones(B, grid.Tq, dtype=torch.long, device=keep.device)
    return masks.document(ones, keep.long())


def _masking_utils():
    return importlib.import_module("transformers.masking_utils")


@functools.cache
def _factory_codes() -> dict:
    """Code object of each closure factory in the installed transformers -> its name here."""
    mu = _masking_utils()
    ids = torch.zeros(1, 1, dtype=torch.long)
    makers = {
        "and": lambda: mu.and_masks(mu.causal_mask_function),
        "or": lambda: mu.or_masks(mu.causal_mask_function),
        "window": lambda: mu.sliding_window_overlay(1),
        "window_bidirectional": lambda: mu.sliding_window_bidirectional_overlay(1),
        "chunked": lambda: mu.chunked_overlay(1, ids[0]),
        "padding": lambda: mu.padding_mask_function(ids.bool()),
        "packed": lambda: mu.packed_sequence_mask_function(ids),
        "remap": lambda: mu.remap_positions_for_packed_sequence(mu.causal_mask_function, ids),
        "blockwise": lambda: mu.blockwise_overlay(ids),
    }
    codes = {}
    for name, make in makers.items():
        try:
            codes[make().__code__] = name
        except (AttributeError, TypeError):  # not in this version of transformers
            continue
    return codes


def _cells(fn, *names: str) -> list:
    """The closure variables `names` of fn, or Unrecognised if fn lacks one."""
    code, closure = fn.__code__, fn.__closure__ or ()
    found = dict(zip(code.co_freevars, (c.cell_contents for c in closure), strict=False))
    missing = [n for n in names if n not in found]
    if missing:
        raise Unrecognised(f"{fn.__qualname__} has no closure variable {missing[0]!r}")
    return [found[n] for n in names]


def _ids_at(ids, positions: torch.Tensor, name: str) -> torch.Tensor:
    """ids[:, positions] for a (B, L) tensor, checked to cover the positions."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise Unrecognised(f"{name} is not a (B, L) tensor")
    if positions.numel() and int(positions.max()) >= ids.shape[1]:
        raise Unrecognised(f"{name} is shorter than the positions it must cover")
    return ids[:, positions.to(ids.device)]


def _packed_ids(fn, grid: Grid) -> torch.Tensor:
    """The (B, T) document ids of a packed-sequence mask function (see translate)."""
    ids = _cells(fn, "packed_sequence_mask")[0]
    if grid.q_offset or grid.kv_offset or grid.Tq != grid.Tk:
        raise Unrecognised("packed sequences with a cache")
    return ids


def translate(fn, grid: Grid, same_doc: torch.Tensor | None = None, bands_only=False) -> Piece:
    """The mask `fn` describes on `grid` (padding from the 2-D mask is added by the caller).

    `same_doc` (B, T): inside an AND with a packed-sequence mask of these document ids, a
    piece only needs to be right on pairs of the same document; there, positions remapped
    per document differ from the raw ones by a constant, so bands keep their meaning.
    """
    mu = _masking_utils()
    if fn is getattr(mu, "causal_mask_function", None):
        return Piece(hi=grid.shift)  # kv_pos <= q_pos
    if fn is getattr(mu, "bidirectional_mask_function", None):
        return ALL
    kind = _factory_codes().get(getattr(fn, "__code__", None))
    if kind is None:
        raise Unrecognised(f"mask function {getattr(fn, '__qualname__', fn)!r}")
    if kind == "window":  # kv_pos > q_pos - w
        (w,) = _cells(fn, "sliding_window")
        return Piece(lo=grid.shift - int(w) + 1)
    if kind == "window_bidirectional":  # |q_pos - kv_pos| <= w
        (w,) = _cells(fn, "sliding_window")
        return Piece(lo=grid.shift - int(w), hi=grid.shift + int(w))
    if kind in ("and", "or"):
        parts = _cells(fn, "mask_functions")[0]
        if kind == "and":
            for part in parts:
                if _factory_codes().get(getattr(part, "__code__", None)) == "packed":
                    same_doc = _packed_ids(part, grid)
        pieces = [translate(part, grid, same_doc, bands_only) for part in parts]
        return _all_of(pieces) if kind == "and" else _any_of(pieces, grid)
    if kind == "remap":
        inner, positions = _cells(fn, "mask_function", "position_ids")
        if same_doc is None or not _documents_of(positions, same_doc):
            raise Unrecognised("positions remapped outside a packed-sequence mask")
        return translate(inner, grid, same_doc, bands_only=True)
    if bands_only:
        raise Unrecognised(f"{kind} mask on remapped positions")
    q_pos, kv_pos = grid.q_pos(), grid.kv_pos()
    if kind == "padding":
        (padding_mask,) = _cells(fn, "padding_mask")
        return Piece(mask=key_mask(_ids_at(padding_mask, kv_pos, "padding_mask").bool(), grid))
    if kind == "packed":
        (ids,) = _cells(fn, "packed_sequence_mask")
        qi, ki = _ids_at(ids, q_pos, "packed ids"), _ids_at(ids, kv_pos, "packed ids")
        return Piece(mask=masks.document(qi, ki))
    if kind == "blockwise":  # same block, and a block id >= 0
        (ids,) = _cells(fn, "block_sequence_ids")
        qi, ki = _ids_at(ids, q_pos, "block ids"), _ids_at(ids, kv_pos, "block ids")
        qi, ki = torch.where(qi >= 0, qi, -1), torch.where(ki >= 0, ki, -2)
        return Piece(mask=masks.document(qi, ki))
    if kind == "chunked":  # (pos - left_padding[b]) // chunk equal for query and key
        chunk, left = _cells(fn, "chunk_size", "left_padding")
        left = torch.as_tensor(left, device=grid.device).reshape(-1, 1)  # (B | 1, 1)
        qi = torch.div(q_pos[None] - left, int(chunk), rounding_mode="floor")
        ki = torch.div(kv_pos[None] - left, int(chunk), rounding_mode="floor")
        qi, ki = qi.expand(grid.B, -1), ki.expand(grid.B, -1)  # (B, Tq), (B, Tk)
        return Piece(mask=masks.document(qi, ki))
    raise Unrecognised(kind)


def _documents_of(positions: torch.Tensor, ids) -> bool:
    """Whether ids are the documents transformers finds in positions (a new one wherever
    positions do not step by 1), so that positions step by 1 inside every document."""
    if not isinstance(positions, torch.Tensor) or not isinstance(ids, torch.Tensor):
        return False
    positions = positions.expand(ids.shape[0], -1) if positions.shape[0] == 1 else positions
    if positions.shape != ids.shape:
        return False
    step = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)  # (B, T)
    starts = (step != 1).cumsum(-1)
    # the same partition whatever the labels: a label changes exactly where a document starts
    new_label = torch.diff(ids, prepend=ids[:, :1], dim=-1) != 0
    return bool(torch.equal(new_label, torch.diff(starts, prepend=starts[:, :1], dim=-1) != 0))


def _all_of(pieces: list[Piece]) -> Piece:
    out = ALL
    for piece in pieces:
        out = out & piece
    return out


def _any_of(pieces: list[Piece], grid: Grid) -> Piece:
    if any(p == ALL for p in pieces):
        return ALL
    out = pieces[0]
    for piece in pieces[1:]:
        if out.is_band and piece.is_band and _touch(out, piece):
            lo = None if None in (out.lo, piece.lo) else min(out.lo, piece.lo)
            hi = None if None in (out.hi, piece.hi) else max(out.hi, piece.hi)
            out = Piece(lo, hi)
            continue
        a, b = to_mask(out, grid), to_mask(piece, grid)
        if a is None or b is None:
            return ALL
        out = Piece(mask=a | b)
    return out


def _touch(a: Piece, b: Piece) -> bool:
    """Whether two intervals overlap or are adjacent (their union is one interval)."""
    return not (
        (a.hi is not None and b.lo is not None and b.lo > a.hi + 1)
        or (b.hi is not None and a.lo is not None and a.lo > b.hi + 1)
    )


def probe_rows(Tq: int) -> torch.Tensor:
    """A few query rows spread over the grid, both ends included."""
    picks = [0, 1, Tq // 3, Tq // 2, (2 * Tq) // 3, Tq - 2, Tq - 1]
    return torch.tensor(sorted({min(max(r, 0), Tq - 1) for r in picks}), dtype=torch.long)


def agrees(fn, keep: torch.Tensor | None, grid: Grid, mask: Mask | None) -> bool:
    """Whether `mask` equals fn AND keep (B, Tk) on a few query rows and every key.

    A check of this module's reading of transformers' factories, O(Tk) per forward: a
    version whose `sliding_window_overlay` meant something else would fail it.
    """
    if grid.Tq == 0 or grid.Tk == 0:
        return True
    rows = probe_rows(grid.Tq).to(grid.device)
    b = torch.arange(grid.B, device=grid.device)[:, None, None, None]
    h = torch.zeros(1, dtype=torch.long, device=grid.device)[None, :, None, None]
    q = grid.q_pos()[rows][None, None, :, None]
    k = grid.kv_pos()[None, None, None, :]
    try:
        with torch.no_grad():
            want = torch.as_tensor(fn(b, h, q, k)).bool().to(grid.device)
    except (IndexError, RuntimeError, TypeError, ValueError):
        return False
    want = want.expand(grid.B, 1, len(rows), grid.Tk)
    if keep is not None:
        want = want & keep[:, None, None, :]
    if mask is None:
        return bool(want.all())
    got = [mask.submask(grid.Tq, grid.Tk, r, r + 1, 0, grid.Tk, grid.device) for r in rows.tolist()]
    got = torch.cat(got, 2)  # (Bm, 1, rows, Tk)
    return bool(torch.equal(got.expand_as(want), want))
