"""One mask algebra for all of qkv: True means "may attend".

Masks are functions of (batch, head, query, key) indices with combinators, so that the
tiled kernel can skip tiles they empty without ever building a Tq×Tk matrix::

    import qkv
    m = qkv.masks.causal() & qkv.masks.padding([5, 3])
    m.to_dense(B=2, H=1, Tq=5, Tk=5)        # (2, 1, 5, 5) bool, only when asked
    print(m.draw(4, 6))                     # bottom-right aligned causal, batch 0:
    # ■ ■ ■ · · ·
    # ■ ■ ■ ■ · ·
    # ■ ■ ■ ■ ■ ·
    # ■ ■ ■ ■ ■ ■

Causal and window masks are **bottom-right aligned**: query i stands at key position
i + Tk - Tq, which is what decoding with a KV cache needs (equal to the usual top-left
triangle when Tq == Tk).
"""

from __future__ import annotations

import numbers

import torch

from ._base import EMPTY, FULL, PARTIAL, And, Mask, Not, Or
from ._kinds import Band, Dense, Document, Padding

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "And",
    "Mask",
    "Not",
    "Or",
    "causal",
    "combine",
    "document",
    "from_dense",
    "padding",
    "window",
]


def causal() -> Mask:
    """Query i sees key j when j <= i + Tk - Tq (bottom-right aligned)."""
    return Band(None, 0, "causal()")


def _non_negative_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"window: {name} must be an int; got {type(x).__name__} {x!r}")
    if x < 0:
        raise ValueError(f"window: {name} must be >= 0; got {x}")
    return int(x)


def window(before: int, after: int = 0) -> Mask:
    """Sliding window: query i sees keys i' - before <= j <= i' + after, i' = i + Tk - Tq.

    `window(w - 1)` is causal attention to the last w keys (Mistral-style); `window(r, r)`
    a symmetric local window (Longformer-style).
    """
    before = _non_negative_int(before, "before")
    after = _non_negative_int(after, "after")
    return Band(before, after, f"window(before={before}, after={after})")


def padding(lengths) -> Mask:
    """Key j of batch element b is real when j < lengths[b]; 0 <= lengths[b] <= Tk."""
    return Padding(lengths)


def document(ids, kv_ids=None) -> Mask:
    """Same document only: ids (B, Tq) and kv_ids (B, Tk) (defaults to ids) are labels."""
    return Document(ids, kv_ids)


def from_dense(tensor: torch.Tensor) -> Mask:
    """Wrap a bool tensor broadcastable to (B, H, Tq, Tk), True = may attend."""
    return Dense(tensor)


def combine(*masks: Mask | None) -> Mask | None:
    """AND of the masks that are not None (None when all are)."""
    present = [m for m in masks if m is not None]
    for m in present:
        if not isinstance(m, Mask):
            hint = " (wrap a bool tensor with from_dense)" if hasattr(m, "dtype") else ""
            raise TypeError(
                f"combine: masks must be Mask objects or None; got {type(m).__name__}{hint}"
            )
    if not present:
        return None
    return present[0] if len(present) == 1 else And(*present)
