"""The flex kernel: structured masks on a CUDA device, through torch's compiled FlexAttention.

Letters: B batch, Hq query heads, Hkv key/value heads, Tq/Tk lengths, D/Dv head dims.

On the CPU the tiled kernel runs a structured mask (window, documents, their
combinations) tile by tile on torch's fused CPU kernel; torch has no such fused kernel on
CUDA, but its FlexAttention compiles one for any `mask_mod` with a `BlockMask` that skips
empty tiles, and every qkv mask exports both (`Mask.to_block_mask`). So on a CUDA device
the dispatch sends structured masks over more than a tile here, and to the tiled kernel
where FlexAttention is missing (`unsupported` says why).

Block masks of tensor-free masks (windows, causal, their combinations) are kept by value
(`Mask.cache_key`, sizes, device); others are built on every call, or once by whoever
holds a `TilePlan`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .._types import AttentionOutput, Problem

__all__ = ["run", "unsupported"]

BLOCK_SIZE = 128  # FlexAttention's own default tile
_compiled = None
_lock = threading.Lock()
_block_masks: OrderedDict = OrderedDict()
_KEEP = 16


def on_gpu(p: Problem) -> bool:
    """Whether the problem lives on a CUDA device (the flex kernel's only home)."""
    return p.device.type == "cuda"


def _missing() -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as err:
        return f"torch has no FlexAttention here ({err})"
    return None


def unsupported(p: Problem) -> str | None:
    """Why this kernel cannot run the problem, or None when it can."""
    if not on_gpu(p):
        return "CUDA only: on the CPU the tiled kernel runs structured masks"
    if p.need_weights:
        return "FlexAttention cannot return the weights"
    if p.bias is not None:
        return "a float bias runs on the tiled kernel"
    if p.dropout_p > 0.0:
        return "dropout runs on the tiled kernel"
    if p.mask is None or p.is_causal or p.mask.form in ("key_padding", "dense"):
        return "torch's fused kernel takes this mask as it is"
    if p.Tq == 0 or p.Tk == 0:
        return "empty problem"
    return _missing()


def _flex():
    """flex_attention compiled once (static shapes: a new size compiles anew)."""
    global _compiled
    with _lock:
        if _compiled is None:
            from torch.nn.attention.flex_attention import flex_attention

            _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def block_mask(p: Problem, device):
    """The problem's mask as a BlockMask, kept for tensor-free masks."""
    value = p.mask.cache_key()
    key = None if value is None else (value, p.B, p.Hq, p.Tq, p.Tk, str(device))
    if key is not None:
        with _lock:
            hit = _block_masks.get(key)
        if hit is not None:
            return hit
    bm = p.mask.to_block_mask(p.B, p.Hq, p.Tq, p.Tk, block_size=BLOCK_SIZE, device=device)
    if key is not None:
        with _lock:
            _block_masks[key] = bm
            while len(_block_masks) > _KEEP:
                _block_masks.popitem(last=False)
    return bm


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> AttentionOutput:
    from torch.nn.attention.flex_attention import AuxRequest

    bm = block_mask(p, q.device)
    aux = AuxRequest(lse=True) if p.need_lse else None
    res = _flex()(q, k, v, block_mask=bm, scale=p.scale, enable_gqa=p.Hq != p.Hkv, return_aux=aux)
    out, lse = (res[0], res[1].lse) if p.need_lse else (res, None)  # (B, Hq, Tq, Dv), (B, Hq, Tq)
    if lse is not None:
        # FlexAttention gives lse -inf on rows that see nothing already; keep qkv's dtype
        lse = lse.float() if q.dtype != torch.float64 else lse.double()
    return AttentionOutput(output=out, lse=lse)
