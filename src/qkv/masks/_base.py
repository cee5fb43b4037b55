"""The mask algebra's base class and its combinators.

Letters: B batch, H heads, Tq query length, Tk key length, nq/nk number of query/key blocks.

One convention everywhere in qkv: **True means "may attend"**.

A mask is a *function of indices*, not a matrix: it can evaluate any rectangle of the
(Tq, Tk) grid on demand (`submask`) and classify every (query block × key block) tile as
empty, full or partial (`block_kinds`) without ever building the Tq×Tk matrix. The tiled
kernel skips empty tiles, runs full ones without a mask and gives partial ones a small
submask. `to_dense` builds the whole matrix only when asked.

Kernels learn what they need from a mask through one small interface, never its class:
`block_kinds` / `region_kinds` (tile kinds, also of an offset rectangle such as a ring
step's), `submask` (the allowed pairs of a range), `form` ("causal", "key_padding",
"dense" or None: which masks torch's own kernels take directly), `key_lengths`, and
`cache_key` (a value equal for equal tensor-free masks: their tile plans are cheap to
cache). `crop` views a rectangle of a larger problem as a mask of its own (ring attention
runs each step on the crop of the global mask), and `mask_mod` / `to_block_mask` export
the mask to torch's FlexAttention.

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


def _block_edges(start: int, end: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Start (inclusive) and end (exclusive) index of each block of `block` rows of
    [start, end), the blocks counted from `start`."""
    starts = torch.arange(start, end, block, device=device)
    ends = torch.clamp(starts + block, max=end)
    return starts, ends


def kinds_from_dense(t: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """Tile kinds (Bm, Hm, nq|1, nk|1) of a (Bm, Hm, Tq|1, Tk|1) bool tensor; broadcast
    axes stay size 1."""
    Bm, Hm, Tq, Tk = t.shape
    nq = 1 if Tq == 1 else -(-Tq // bq)
    nk = 1 if Tk == 1 else -(-Tk // bk)
    pad_q = 0 if Tq == 1 else nq * bq - Tq
    pad_k = 0 if Tk == 1 else nk * bk - Tk

    def reduce(fn, fill: bool) -> torch.Tensor:
        x = t
        if pad_q or pad_k:  # padding takes the neutral value of the reduction
            x = torch.full((Bm, Hm, Tq + pad_q, Tk + pad_k), fill, device=t.device)
            x[:, :, :Tq, :Tk] = t
        tiles = x.view(Bm, Hm, nq, x.shape[2] // nq, nk, x.shape[3] // nk)
        return fn(fn(tiles, dim=5), dim=3)  # (Bm, Hm, nq, nk)

    return tile_kinds(reduce(torch.any, False), reduce(torch.all, True))


def tile_kinds(any_: torch.Tensor, all_: torch.Tensor) -> torch.Tensor:
    """EMPTY where nothing is allowed, FULL where everything is, PARTIAL otherwise."""
    kinds = torch.full(any_.shape, PARTIAL, dtype=torch.int8, device=any_.device)
    kinds[~any_] = EMPTY
    kinds[all_] = FULL
    return kinds


def _require_mask(x, name: str):
    if not isinstance(x, Mask):
        hint = " (wrap a bool tensor with qkv.masks.from_dense)" if hasattr(x, "dtype") else ""
        raise TypeError(f"{name} must be qkv.masks Mask objects; got {type(x).__name__}{hint}")
    return x


class Mask:
    """Base class of every structured mask.

    Subclasses implement `submask`, `region_kinds` (or `block_kinds`), `check` and
    `__repr__`, and where they can `tile_key`, `cache_key`, `form` and `mask_mod`;
    everything else (`to_dense`, `&`, `|`, `~`, `draw`, `crop`, `plan`, `to_block_mask`)
    comes from here.
    """

    #: "causal" (exactly bottom-right causal), "key_padding" (key j of row b allowed when
    #: j < key_lengths[b]), "dense" (a bool tensor), or None: the forms torch's own
    #: kernels take directly.
    form: str | None = None

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
        return self.region_kinds(Tq, Tk, 0, Tq, 0, Tk, block_q, block_k, device)

    def region_kinds(
        self, Tq: int, Tk: int, q0: int, q1: int, k0: int, k1: int, block_q: int, block_k: int,
        device=None,
    ) -> torch.Tensor:  # fmt: skip
        """Kinds (Bm, Hm, nq, nk) of the tiles of the rectangle [q0, q1) × [k0, k1) of a
        (Tq, Tk) problem, cut into blocks from (q0, k0).

        This generic form evaluates the rectangle's submask (exact, O(area)); the
        primitive masks classify from their structure instead.
        """
        whole = (q0, q1, k0, k1) == (0, Tq, 0, Tk)
        if whole and type(self).block_kinds is not Mask.block_kinds:
            return self.block_kinds(Tq, Tk, block_q, block_k, device)
        sub = self.submask(Tq, Tk, q0, q1, k0, k1, device)  # (Bm, Hm, q, k)
        nq, nk = -(-(q1 - q0) // block_q), -(-(k1 - k0) // block_k)
        return kinds_from_dense(sub, block_q, block_k).expand(-1, -1, nq, nk)

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

    @property
    def key_lengths(self) -> torch.Tensor | None:
        """(B,) key lengths when `form` is "key_padding", else None."""
        return None

    def key_mask(self, Tk: int, device=None) -> torch.Tensor | None:
        """(B, 1, 1, Tk) bool, True for real keys, when `form` is "key_padding" (else None)."""
        lengths = self.key_lengths
        if lengths is None:
            return None
        lengths = lengths.to(device)
        return (torch.arange(Tk, device=lengths.device) < lengths[:, None])[:, None, None]

    def cache_key(self):
        """A hashable value equal for masks that allow the same pairs at every size, or None.

        Masks that hold no tensor (causal, windows, their combinations) have one: their
        tile plans depend only on this value and the sizes, so they are cheap to cache.
        """
        return None

    def mask_mod(self, Tq: int, Tk: int, device=None):
        """FlexAttention's `mask_mod(b, h, q_idx, kv_idx) -> bool` for a (Tq, Tk) problem.

        This generic form indexes the dense matrix; the primitive masks compute from the
        indices.
        """
        from ._flex import dense_mod

        return dense_mod(self.submask(Tq, Tk, 0, Tq, 0, Tk, device))

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

    def crop(self, Tq: int, Tk: int, q0: int, q1: int, k0: int, k1: int) -> Mask:
        """The rectangle [q0, q1) × [k0, k1) of a (Tq, Tk) problem as a mask of its own,
        for a (q1 - q0, k1 - k0) problem (query i is global query q0 + i, key j is k0 + j)."""
        from ._crop import Crop

        return Crop(self, Tq, Tk, q0, q1, k0, k1)

    def plan(self, Tq: int, Tk: int, config=None, *, device=None):
        """The mask's tile plan for (Tq, Tk): a `qkv.kernels.TilePlan`.

        A value: build it once and pass it as `mask=` to `qkv.attention` on every layer
        and call of that size; `print(plan)` shows which tiles are skipped, run without
        a mask and run with one. `config` is a `qkv.kernels.TileConfig` (tile sizes).
        """
        from ..kernels.plan import TilePlan

        return TilePlan(self, Tq, Tk, config, device=device)

    def to_block_mask(
        self, B: int, H: int, Tq: int, Tk: int, *, block_size: int = 128, device=None
    ):
        """The same mask as a torch FlexAttention `BlockMask`, for
        `flex_attention(q, k, v, block_mask=...)` with q (B, H, Tq, D), k (B, H, Tk, D).

        `device` defaults to the mask's own (the CPU for masks that hold no tensor).
        """
        from ._flex import block_mask

        return block_mask(self, B, H, Tq, Tk, block_size=block_size, device=device)

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

    def region_kinds(self, Tq, Tk, q0, q1, k0, k1, block_q, block_k, device=None):
        region = (Tq, Tk, q0, q1, k0, k1, block_q, block_k, device)
        out = self.parts[0].region_kinds(*region)
        for part in self.parts[1:]:
            out = self._merge_kinds(out, part.region_kinds(*region))
        return out

    def cache_key(self):
        keys = tuple(part.cache_key() for part in self.parts)
        return None if None in keys else (self.symbol, keys)

    def mask_mod(self, Tq, Tk, device=None):
        mods = [part.mask_mod(Tq, Tk, device) for part in self.parts]
        merge = self._merge

        def mod(b, h, q_idx, kv_idx):
            out = mods[0](b, h, q_idx, kv_idx)
            for m in mods[1:]:
                out = merge(out, m(b, h, q_idx, kv_idx))
            return out

        return mod

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

    def region_kinds(self, Tq, Tk, q0, q1, k0, k1, block_q, block_k, device=None):
        return FULL - self.inner.region_kinds(Tq, Tk, q0, q1, k0, k1, block_q, block_k, device)

    def cache_key(self):
        key = self.inner.cache_key()
        return None if key is None else ("~", key)

    def mask_mod(self, Tq, Tk, device=None):
        inner = self.inner.mask_mod(Tq, Tk, device)
        return lambda b, h, q_idx, kv_idx: ~inner(b, h, q_idx, kv_idx)

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
