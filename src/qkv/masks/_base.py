"""The mask algebra's base class and its combinators.

Letters: B batch, H heads, Tq query length, Tk key length, nq/nk number of query/key blocks.

One convention everywhere in qkv: **True means "may attend"**.

A mask is a *function of indices*, not a matrix: it can evaluate any rectangle of the
(Tq, Tk) grid on demand (`submask`) and classify every (query block × key block) tile as
empty, full or partial (`block_kinds`) without ever building the Tq×Tk matrix. The tiled
kernel skips empty tiles, runs full ones without a mask and gives partial ones a small
submask. `to_dense` builds the whole matrix only when asked.

Classification is always *sound*: a tile called EMPTY has no allowed pair and a tile called
FULL has no forbidden one. For the primitive masks it is also exact; for combinations it
may call a tile PARTIAL that turns out empty or full (e.g. two windows that do not overlap),
which costs time, never correctness.
"""

from __future__ import annotations

import torch

__all__ = ["EMPTY", "FULL", "PARTIAL", "And", "Mask", "Not", "Or"]

# Tile kinds, ordered so that AND is the minimum and OR the maximum of two kinds.
EMPTY, PARTIAL, FULL = 0, 1, 2


def _block_edges(T: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Start (inclusive) and end (exclusive) index of each block of `block` rows."""
    starts = torch.arange(0, T, block, device=device)
    ends = torch.clamp(starts + block, max=T)
    return starts, ends


def _require_mask(x, name: str):
    if not isinstance(x, Mask):
        hint = " (wrap a bool tensor with qkv.masks.from_dense)" if hasattr(x, "dtype") else ""
        raise TypeError(f"{name} must be qkv.masks Mask objects; got {type(x).__name__}{hint}")
    return x


class Mask:
    """Base class of every structured mask.

    Subclasses implement `submask`, `block_kinds`, `check` and `__repr__`; everything else
    (`to_dense`, `&`, `|`, `~`, `draw`) comes from here.
    """

    def submask(
        self, Tq: int, Tk: int, q0: int, q1: int, k0: int, k1: int, device=None
    ) -> torch.Tensor:
        """Allowed pairs for queries [q0, q1) and keys [k0, k1) of a (Tq, Tk) problem.

        Returns a bool tensor of shape (Bm, Hm, q1 - q0, k1 - k0) where Bm, Hm are 1 or the
        batch and head counts the mask was built for (it broadcasts to (B, H, ...)).
        """
        raise NotImplementedError

    def block_kinds(
        self, Tq: int, Tk: int, block_q: int, block_k: int, device=None
    ) -> torch.Tensor:
        """Classify every tile: int8 tensor (Bm, Hm, nq, nk) of EMPTY / PARTIAL / FULL."""
        raise NotImplementedError

    def check(self, B: int, H: int, Tq: int, Tk: int) -> None:
        """Raise ValueError (naming `mask`) if this mask cannot apply to (B, H, Tq, Tk)."""

    def tile_key(self, Tq: int, Tk: int, q0: int, q1: int, k0: int, k1: int):
        """A hashable key equal for tiles whose submasks are equal, or None if unknown.

        Lets a tile plan compute one submask per distinct pattern: every interior block of
        a sliding window has the same one.
        """
        return None

    @property
    def device(self) -> torch.device | None:
        """Device of the tensors the mask holds (None for masks that hold none)."""
        return None

    # ---- derived operations -------------------------------------------------------------

    def to_dense(self, B: int, H: int, Tq: int, Tk: int, device=None) -> torch.Tensor:
        """The whole bool matrix, shape (B, H, Tq, Tk) (an expanded view where possible)."""
        for name, size in (("B", B), ("H", H), ("Tq", Tq), ("Tk", Tk)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"to_dense: {name} must be an int >= 0; got {size!r}")
        self.check(B, H, Tq, Tk)
        dense = self.submask(Tq, Tk, 0, Tq, 0, Tk, device=device)  # (Bm, Hm, Tq, Tk)
        return dense.expand(B, H, Tq, Tk)

    def draw(self, Tq: int, Tk: int, *, b: int = 0, h: int = 0) -> str:
        """A small picture of the mask for batch `b`, head `h`: ■ may attend, · may not."""
        dense = self.submask(Tq, Tk, 0, Tq, 0, Tk)  # (Bm, Hm, Tq, Tk)
        grid = dense[min(b, dense.shape[0] - 1), min(h, dense.shape[1] - 1)]
        return "\n".join(" ".join("■" if x else "·" for x in row.tolist()) for row in grid)

    def __and__(self, other: Mask | None) -> Mask:
        if other is None:
            return self
        if not isinstance(other, Mask):
            return NotImplemented
        return And(self, other)

    def __rand__(self, other: Mask | None) -> Mask:
        return self if other is None else NotImplemented

    def __or__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return Or(self, other)

    def __invert__(self) -> Mask:
        return Not(self)


class _Combination(Mask):
    """AND / OR of several masks: elementwise on submasks, min / max on tile kinds."""

    symbol = "?"

    def __init__(self, *parts: Mask) -> None:
        if not parts:
            raise ValueError(f"{type(self).__name__} needs at least one mask in parts")
        for part in parts:
            _require_mask(part, "parts")
        flat: list[Mask] = []
        for part in parts:
            # (a & b) & c is stored as one flat AND so that repr stays readable.
            flat.extend(part.parts if type(part) is type(self) else [part])
        self.parts: tuple[Mask, ...] = tuple(flat)

    def _merge(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _merge_kinds(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def submask(self, Tq, Tk, q0, q1, k0, k1, device=None):
        out = self.parts[0].submask(Tq, Tk, q0, q1, k0, k1, device)
        for part in self.parts[1:]:
            out = self._merge(out, part.submask(Tq, Tk, q0, q1, k0, k1, device))
        return out

    def block_kinds(self, Tq, Tk, block_q, block_k, device=None):
        out = self.parts[0].block_kinds(Tq, Tk, block_q, block_k, device)
        for part in self.parts[1:]:
            out = self._merge_kinds(out, part.block_kinds(Tq, Tk, block_q, block_k, device))
        return out

    def check(self, B, H, Tq, Tk):
        for part in self.parts:
            part.check(B, H, Tq, Tk)

    def tile_key(self, Tq, Tk, q0, q1, k0, k1):
        keys = tuple(part.tile_key(Tq, Tk, q0, q1, k0, k1) for part in self.parts)
        return None if None in keys else (self.symbol, keys)

    @property
    def device(self):
        for part in self.parts:
            if part.device is not None:
                return part.device
        return None

    def __repr__(self) -> str:
        inner = []
        for part in self.parts:
            text = repr(part).split("\n")[0]
            inner.append(f"({text})" if isinstance(part, _Combination) else text)
        return f" {self.symbol} ".join(inner)


class And(_Combination):
    """Allowed where every part allows."""

    symbol = "&"

    def _merge(self, x, y):
        return x & y

    def _merge_kinds(self, x, y):
        return torch.minimum(x, y)


class Or(_Combination):
    """Allowed where any part allows."""

    symbol = "|"

    def _merge(self, x, y):
        return x | y

    def _merge_kinds(self, x, y):
        return torch.maximum(x, y)


class Not(Mask):
    """Allowed where the inner mask forbids."""

    def __init__(self, inner: Mask) -> None:
        self.inner = _require_mask(inner, "inner")

    def submask(self, Tq, Tk, q0, q1, k0, k1, device=None):
        return ~self.inner.submask(Tq, Tk, q0, q1, k0, k1, device)

    def block_kinds(self, Tq, Tk, block_q, block_k, device=None):
        return FULL - self.inner.block_kinds(Tq, Tk, block_q, block_k, device)

    def check(self, B, H, Tq, Tk):
        self.inner.check(B, H, Tq, Tk)

    def tile_key(self, Tq, Tk, q0, q1, k0, k1):
        key = self.inner.tile_key(Tq, Tk, q0, q1, k0, k1)
        return None if key is None else ("~", key)

    @property
    def device(self):
        return self.inner.device

    def __invert__(self) -> Mask:
        return self.inner

    def __repr__(self) -> str:
        return f"~({repr(self.inner).splitlines()[0]})"
