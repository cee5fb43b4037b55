"""qkv masks as torch FlexAttention masks: `mask_mod` functions and `BlockMask`s.

Letters: B batch, H heads, Tq/Tk lengths.

FlexAttention (torch.nn.attention.flex_attention) takes a mask as a function of indices,
`mask_mod(b, h, q_idx, kv_idx) -> bool`, with the same convention as qkv (True = may
attend), and a `BlockMask` that records which (block × block) tiles hold any allowed pair,
so that a user who moves to a GPU keeps qkv's masks:

    bm = (qkv.masks.causal() & qkv.masks.padding(lengths)).to_block_mask(B, H, T, T)
    out = flex_attention(q, k, v, block_mask=bm)   # == qkv.attention(q, k, v, mask=...)

Each primitive mask writes its own `mask_mod` from indices (bottom-right alignment
included); combinations combine them.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["block_mask", "dense_mod"]


def dense_mod(t: torch.Tensor):
    """mask_mod of a (Bm, Hm, Tq|1, Tk|1) bool tensor; size-1 axes broadcast."""
    top = [n - 1 for n in t.shape]  # clamped: a kernel may evaluate a block's padded end

    def mod(b, h, q_idx, kv_idx):
        idx = [x.clamp(0, m) for x, m in zip((b, h, q_idx, kv_idx), top, strict=True)]
        return t[idx[0], idx[1], idx[2], idx[3]]

    return mod


def _size(x, name: str, low: int) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < low:
        raise ValueError(f"to_block_mask: {name} must be an int >= {low}; got {x!r}")
    return int(x)


def block_mask(mask, B: int, H: int, Tq: int, Tk: int, *, block_size: int = 128, device=None):
    """`mask` as a FlexAttention BlockMask for q (B, H, Tq, ·) and k (B, H, Tk, ·)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as err:  # torch without FlexAttention
        raise RuntimeError(f"to_block_mask needs torch's FlexAttention: {err}") from None
    B, H = _size(B, "B", 1), _size(H, "H", 1)
    Tq, Tk = _size(Tq, "Tq", 1), _size(Tk, "Tk", 1)
    block_size = _size(block_size, "block_size", 1)
    mask.check(B, H, Tq, Tk)
    if device is None:
        device = mask.device if mask.device is not None else torch.device("cpu")
    mod = mask.mask_mod(Tq, Tk, device)
    return create_block_mask(mod, B, H, Tq, Tk, device=device, BLOCK_SIZE=block_size)
