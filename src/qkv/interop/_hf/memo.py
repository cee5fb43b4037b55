"""A mask that remembers what it computed, so every layer of one forward reuses it.

transformers builds the mask once per forward and hands the same object to every layer.
The tiled kernel plans from `block_kinds` (every tile's kind) and one `submask` per
distinct partial tile; for masks without tensors (causal, windows) it keeps those plans
itself, but for padding and documents it plans on every call. Wrapping such a mask in
`Remembered` makes the second and later layers read the tile kinds and submasks from here:
a 32-layer model evaluates its padding or document mask once per forward, not 32 times.
The object lives as long as the forward's mask does (nothing global is kept).
"""

from __future__ import annotations

import torch

from ...masks import Mask

__all__ = ["Remembered"]


def _key(*args) -> tuple:
    return tuple(str(a) if isinstance(a, torch.device) else a for a in args)


class Remembered(Mask):
    """The same mask as `inner`; tile kinds, submasks and tile keys computed once each."""

    def __init__(self, inner: Mask) -> None:
        if not isinstance(inner, Mask):
            raise TypeError(f"inner must be a qkv.masks Mask; got {type(inner).__name__}")
        self.inner = inner
        self._kinds: dict = {}
        self._subs: dict = {}
        self._keys: dict = {}

    def submask(self, Tq, Tk, q0, q1, k0, k1, device=None):
        key = _key(Tq, Tk, q0, q1, k0, k1, device)
        if key not in self._subs:
            self._subs[key] = self.inner.submask(Tq, Tk, q0, q1, k0, k1, device)
        return self._subs[key]

    def block_kinds(self, Tq, Tk, block_q, block_k, device=None):
        key = _key(Tq, Tk, block_q, block_k, device)
        if key not in self._kinds:
            self._kinds[key] = self.inner.block_kinds(Tq, Tk, block_q, block_k, device)
        return self._kinds[key]

    def tile_key(self, Tq, Tk, q0, q1, k0, k1):
        key = (Tq, Tk, q0, q1, k0, k1)
        if key not in self._keys:
            self._keys[key] = self.inner.tile_key(Tq, Tk, q0, q1, k0, k1)
        return self._keys[key]

    def check(self, B, H, Tq, Tk):
        self.inner.check(B, H, Tq, Tk)

    @property
    def device(self):
        return self.inner.device

    def __repr__(self) -> str:
        return repr(self.inner)
