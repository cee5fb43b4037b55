"""A rectangle of a larger problem's mask, as a mask of its own.

Letters: Tq/Tk the lengths of the larger problem, q/k those of the rectangle.

Ring attention runs each step on the tiles of (this rank's queries × the key block in
hand); with a mask over global positions, that is the rectangle of the global mask at
those positions. `Crop` presents it to the tile engine as an ordinary (q, k) mask: its
submasks, tile kinds and tile keys are the larger mask's at shifted indices, so the
primitive masks classify its tiles from their structure (never a dense matrix).
"""

from __future__ import annotations

from ._base import Mask, _require_mask

__all__ = ["Crop"]


class Crop(Mask):
    """The rectangle [q0, q1) × [k0, k1) of a mask over a (Tq, Tk) problem, as a mask over
    a (q1 - q0, k1 - k0) problem: local query i is global query q0 + i, local key j is
    global key k0 + j (what one step of ring attention sees of the global mask)."""

    def __init__(self, inner: Mask, Tq: int, Tk: int, q0: int, q1: int, k0: int, k1: int):
        self.inner = _require_mask(inner, "inner")
        if not (0 <= q0 <= q1 <= Tq and 0 <= k0 <= k1 <= Tk):
            raise ValueError(
                f"crop: the rectangle [{q0}, {q1}) × [{k0}, {k1}) must lie in (Tq, Tk)={(Tq, Tk)}"
            )
        self.Tq, self.Tk, self.q0, self.q1, self.k0, self.k1 = Tq, Tk, q0, q1, k0, k1

    def _sizes(self, Tq: int, Tk: int) -> None:
        if (Tq, Tk) != (self.q1 - self.q0, self.k1 - self.k0):
            raise ValueError(
                f"mask: this crop is a {(self.q1 - self.q0, self.k1 - self.k0)} problem; "
                f"got (Tq, Tk)={(Tq, Tk)}"
            )

    def submask(self, Tq, Tk, q0, q1, k0, k1, device=None):
        self._sizes(Tq, Tk)
        a, c = self.q0, self.k0
        return self.inner.submask(self.Tq, self.Tk, a + q0, a + q1, c + k0, c + k1, device)

    def region_kinds(self, Tq, Tk, q0, q1, k0, k1, block_q, block_k, device=None):
        self._sizes(Tq, Tk)
        a, c = self.q0, self.k0
        return self.inner.region_kinds(
            self.Tq, self.Tk, a + q0, a + q1, c + k0, c + k1, block_q, block_k, device
        )

    def check(self, B, H, Tq, Tk):
        self._sizes(Tq, Tk)
        self.inner.check(B, H, self.Tq, self.Tk)

    def tile_key(self, Tq, Tk, q0, q1, k0, k1):
        a, c = self.q0, self.k0
        return self.inner.tile_key(self.Tq, self.Tk, a + q0, a + q1, c + k0, c + k1)

    def cache_key(self):
        key = self.inner.cache_key()
        if key is None:
            return None
        return ("crop", key, self.Tq, self.Tk, self.q0, self.q1, self.k0, self.k1)

    def mask_mod(self, Tq, Tk, device=None):
        self._sizes(Tq, Tk)
        inner = self.inner.mask_mod(self.Tq, self.Tk, device)
        a, c = self.q0, self.k0
        return lambda b, h, q_idx, kv_idx: inner(b, h, q_idx + a, kv_idx + c)

    @property
    def device(self):
        return self.inner.device

    def __repr__(self) -> str:
        inner = repr(self.inner).splitlines()[0]
        return f"({inner})[{self.q0}:{self.q1}, {self.k0}:{self.k1}] of {self.Tq}×{self.Tk}"
