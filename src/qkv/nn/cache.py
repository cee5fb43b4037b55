"""Key/value caches for incremental (token-by-token) decoding.

Letters: B batch rows (sources × beams), Hkv key/value heads, T cached positions,
C capacity (T <= C), D key head dim, Dv value head dim, L layers.

Why a cache. A decoder generating token t must attend from t to the keys and values of
tokens 0..t. Those of tokens 0..t-1 do not change (causal self-attention: a token's hidden
state never depends on later tokens), so recomputing them every step wastes work: without a
cache step t re-runs the whole prefix, O(t·E² + t²·E) per layer, O(n³·E) for n tokens. With
one, step t projects one token, O(E²), and attends over t cached keys, O(t·E): generating n
tokens costs O(n·E² + n²·E) per layer, and memory O(L·B·Hkv·n·(D + Dv)).

Layout. One `AttentionCache` per attention module holds two buffers, keys (B, Hkv, C, D) and
values (B, Hkv, C, Dv), of which positions [0, T) are filled. When an append does not fit, C
doubles (like a Python list: amortised O(1) copying per token); `capacity=` allocates the
final size up front so that nothing is ever copied. A cross-attention cache is filled once,
from the encoder output, and then only read: the encoder output does not change while the
decoder generates (Vaswani et al. 2017, §3.2.3).

Beam search reorders the batch rows after every step (`reorder`): row r of the next step
continues the hypothesis held in row index[r].

The cache is an inference tool: it writes into its buffers in place, so do not backpropagate
through a cached decoding.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AttentionCache", "KVCache", "LayerCache"]

_MIN_CAPACITY = 16  # first allocation when no capacity is given: avoids tiny reallocations


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_owner_type(owner) -> None:
    if not isinstance(owner, nn.Module):
        raise TypeError(
            f"owner must be the torch.nn.Module the cache belongs to; got {type(owner).__name__} "
            "(make caches with the module's new_cache())"
        )


class AttentionCache:
    """Keys and values of one attention module, grown step by step or filled once.

    Made by `MultiHeadAttention.new_cache`, which records the module as its owner: passing
    the cache to any other module raises ValueError.

    Args:
        owner: the attention module this cache belongs to.
        cross: False for self-attention (every call appends its keys and values), True for
            cross-attention (the first call stores the keys and values of the encoder
            output, later calls reuse them).
        capacity: positions to allocate on the first append (self-attention only); the
            buffers still double if decoding goes further.
    """

    def __init__(self, owner: nn.Module, *, cross: bool = False, capacity: int | None = None):
        _check_owner_type(owner)
        if not isinstance(cross, bool):
            raise TypeError(f"cross must be a bool; got {type(cross).__name__}")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)):
            raise TypeError(f"capacity must be an int or None; got {capacity!r}")
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1; got {capacity}")
        self._owner = weakref.ref(owner)
        self.cross = cross
        self.capacity_hint = capacity
        self._k: torch.Tensor | None = None  # (B, Hkv, C, D)
        self._v: torch.Tensor | None = None  # (B, Hkv, C, Dv)
        self.length = 0  # T: positions filled

    @property
    def owner(self) -> nn.Module | None:
        """The module this cache was made for (None once that module is gone)."""
        return self._owner()

    @property
    def filled(self) -> bool:
        """Whether any keys are stored (for a cross-attention cache: whether it is ready)."""
        return self._k is not None

    @property
    def capacity(self) -> int:
        """C: positions the buffers can hold before they must grow (0 before the first use)."""
        return 0 if self._k is None else self._k.shape[2]

    @property
    def batch_size(self) -> int | None:
        return None if self._k is None else self._k.shape[0]

    def keys(self) -> torch.Tensor:
        """(B, Hkv, T, D) view of the cached keys."""
        if self._k is None:
            raise ValueError("the cache is empty: no keys have been stored yet")
        return self._k[:, :, : self.length]

    def values(self) -> torch.Tensor:
        """(B, Hkv, T, Dv) view of the cached values."""
        if self._v is None:
            raise ValueError("the cache is empty: no values have been stored yet")
        return self._v[:, :, : self.length]

    def _check_compatible(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._k is None or self._v is None:
            return
        B, Hkv, _, D = self._k.shape
        Dv = self._v.shape[3]
        if (k.shape[0], k.shape[1], k.shape[3], v.shape[3]) != (B, Hkv, D, Dv):
            raise ValueError(
                f"cache holds keys (B, Hkv, T, D)={(B, Hkv, self.length, D)} and values with "
                f"Dv={Dv}; cannot append keys {_shape(k)} and values {_shape(v)} (was the "
                "cache made for another batch or model? make a new one per batch)"
            )
        if k.dtype != self._k.dtype or k.device != self._k.device:
            raise TypeError(
                f"cache holds {self._k.dtype} on {self._k.device}; got keys of "
                f"{k.dtype} on {k.device}"
            )

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k (B, Hkv, Tn, D) and v (B, Hkv, Tn, Dv); return all keys and values so far.

        Returns views (B, Hkv, T + Tn, D) and (B, Hkv, T + Tn, Dv) into the buffers.
        """
        if self.cross:
            raise ValueError("a cross-attention cache is filled once with `store`, not appended")
        self._check_compatible(k, v)
        Tn = k.shape[2]
        needed = self.length + Tn
        buf_k, buf_v = self._k, self._v
        if buf_k is None or buf_v is None or needed > buf_k.shape[2]:
            buf_k, buf_v = self._grow(k, v, needed)
        buf_k[:, :, self.length : needed] = k
        buf_v[:, :, self.length : needed] = v
        self.length = needed
        return self.keys(), self.values()

    def _grow(
        self, k: torch.Tensor, v: torch.Tensor, needed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reallocate to hold `needed` positions: the hint first, then doubling."""
        old = 0 if self._k is None else self._k.shape[2]
        capacity = max(needed, 2 * old if old else (self.capacity_hint or _MIN_CAPACITY))
        B, Hkv, _, D = k.shape
        new_k = k.new_empty(B, Hkv, capacity, D)  # (B, Hkv, C, D)
        new_v = v.new_empty(B, Hkv, capacity, v.shape[3])  # (B, Hkv, C, Dv)
        if self._k is not None and self._v is not None:
            new_k[:, :, : self.length] = self.keys()
            new_v[:, :, : self.length] = self.values()
        self._k, self._v = new_k, new_v
        return new_k, new_v

    def store(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention: keep k (B, Hkv, S, D) and v (B, Hkv, S, Dv) for every later step."""
        if not self.cross:
            raise ValueError("a self-attention cache grows with `append`; `store` is for cross")
        if self._k is not None:
            raise ValueError("this cross-attention cache is already filled")
        self._k, self._v, self.length = k.detach(), v.detach(), k.shape[2]
        return self._k, self._v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (B',): row r becomes old row index[r] (beam search)."""
        if self._k is None or self._v is None:
            return
        index = index.to(self._k.device)
        self._k = self._k.index_select(0, index)
        self._v = self._v.index_select(0, index)

    def __repr__(self) -> str:
        kind = "cross" if self.cross else "self"
        if self._k is None:
            return f"AttentionCache({kind}, empty)"
        B, Hkv, C, D = self._k.shape
        return f"AttentionCache({kind}, B={B}, Hkv={Hkv}, T={self.length}, C={C}, D={D})"


@dataclass(frozen=True)
class LayerCache:
    """The caches of one layer: its self-attention, and its cross-attention (decoders only)."""

    self_attn: AttentionCache
    cross_attn: AttentionCache | None = None


class KVCache:
    """The caches of a whole decoder stack, one `LayerCache` per layer.

    Made by a model's `new_cache()`; the model checks that a cache it is given is its own.
    `len(cache)` is the number of positions decoded so far (the position of the next token).
    """

    def __init__(self, owner: nn.Module, layers: list[LayerCache]) -> None:
        _check_owner_type(owner)
        layers = list(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, LayerCache):
                raise TypeError(f"layers[{i}] must be a LayerCache; got {type(layer).__name__}")
        self._owner = weakref.ref(owner)
        self.layers = layers

    @property
    def owner(self) -> nn.Module | None:
        return self._owner()

    def check_owner(self, module: nn.Module, num_layers: int) -> None:
        """Raise ValueError unless this cache was made by `module` for `num_layers` layers."""
        if self.owner is not module:
            raise ValueError(
                f"this KVCache was made by another model ({type(self.owner).__name__} at "
                f"{id(self.owner):#x}), not by this {type(module).__name__}; create one "
                "with this model's new_cache()"
            )
        if len(self.layers) != num_layers:
            raise ValueError(
                f"this KVCache has {len(self.layers)} layers but the model has {num_layers}"
            )

    def __len__(self) -> int:
        return self.layers[0].self_attn.length if self.layers else 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` in every layer (beam search: row r continues index[r]).

        Cross-attention caches are reordered too: beams of one source share their encoder
        output, so this only copies rows that are equal, but it keeps any `index` correct.
        """
        for layer in self.layers:
            layer.self_attn.reorder(index)
            if layer.cross_attn is not None:
                layer.cross_attn.reorder(index)

    def __repr__(self) -> str:
        return f"KVCache(layers={len(self.layers)}, length={len(self)})"
