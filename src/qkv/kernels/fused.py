"""The fused kernel: a direct call into torch's `scaled_dot_product_attention`.

Letters: B batch, Hq query heads, Hkv key/value heads, Tq/Tk lengths, D/Dv head dims.

torch's fused kernels are fast but their semantics differ from qkv's in places, so this
kernel is used only where they coincide (see `unsupported`):
- `is_causal=True` in torch is *top-left* aligned; qkv's causal is bottom-right. They agree
  when Tq == Tk, and for Tq == 1 bottom-right causal allows every key (no mask at all).
  Any other causal case is passed as a dense bool mask.
- torch cannot return the weights, and its dropout draws from the global generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._types import AttentionOutput, Problem
from . import native

# Up to this many (query, key) pairs a structured mask runs as a dense one on this kernel.
# Measured (2 cores, fp32, H=4, D=64; this kernel's time includes building the mask):
# windows of 64 and 256 keys and 4 causal documents are faster here at 512² (by 1.1-1.6×),
# about even at 768², and 1.5-2× faster tiled at 1024²; a 1024-key window (almost the whole
# matrix at that size) stays about even up to 1536².
# A single query against a long cache still gains from reading only the window's keys
# (bench "decode Tq=1, window", B=4, H=8, 8192 keys, a 1024-key window, 2 threads on a
# busy machine: 12-16 ms tiled against 22-36 ms here with the (1, 1, 1, Tk) mask; 1.5 ms
# against 9.4 ms on one thread), hence the bound on the keys as well.
SMALL_PROBLEM = 768 * 768
SMALL_PROBLEM_KEYS = 2048
# With float32 tiles on the native kernel the tiled kernel wins sooner: at 512² it took
# 0.77 / 0.90 / 0.98 of this kernel's time for windows of 64 and 256 keys and 4 causal
# documents, at 768² 0.42 / 0.54 / 1.04; at 256² it lost (1.3-2.2×).
SMALL_PROBLEM_NATIVE = 512 * 512

__all__ = ["native_built", "poison", "run", "unsupported"]


_loaded = False  # once loaded, the native kernel stays loaded for the process


def native_built() -> bool:
    """Whether the native kernel is loaded, without building it (a dispatch check must
    never start a compiler). Remembered once true: the check reads /proc/cpuinfo."""
    global _loaded
    if not _loaded:
        _loaded = native.unavailable(build=False) is None
    return _loaded


# torch's CPU flash kernel returns output 0 and lse 0 for a query row of NaN scores when
# there are few keys (up to 15 in torch 2.13) and no mask: a NaN input would silently turn
# into a zero output. Below this many keys qkv adds a NaN-carrying zero to such outputs
# (a pass over q: negligible next to attention, but measurable on the dense fast path,
# which with more keys propagates NaN by itself).
POISON_BELOW_KEYS = 64


def poison(q: torch.Tensor) -> torch.Tensor:
    """(B, H, Tq, 1) zeros, NaN where a query row holds NaN (or inf): see above."""
    return q.sum(-1, keepdim=True) * 0


def unsupported(p: Problem) -> str | None:
    """Why this kernel cannot run the problem, or None when it can."""
    if p.need_weights:
        return "torch's fused attention cannot return the weights"
    if p.need_lse:
        return "torch's fused attention does not return the log-sum-exp"
    if p.bias is not None:
        return "a float bias is handled by the tiled kernel"
    if p.dropout_p > 0.0:
        return "dropout must draw from qkv's generator to be reproducible"
    if p.mask is None or (p.is_causal and p.Tq in (1, p.Tk)) or p.mask.form == "dense":
        return None
    if p.mask.form == "key_padding":
        return None  # a (B, 1, 1, Tk) mask: torch broadcasts it, no Tq×Tk matrix
    pairs = p.Tq * p.Tk
    small = pairs <= SMALL_PROBLEM_NATIVE or (
        pairs <= SMALL_PROBLEM  # in between, it depends on native tiles (asked last: slow)
        and not (p.dtype == torch.float32 and p.device.type == "cpu" and native_built())
    )
    if small and p.Tk <= SMALL_PROBLEM_KEYS:
        return None  # a few tiles: skipping them saves less than tiling costs
    return "a structured mask over more than one tile: the tiled kernel skips empty tiles"


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> AttentionOutput:
    attn_mask, is_causal = None, False
    if p.is_causal and p.Tq == 1:
        pass  # bottom-right causal with a single query: every key is visible
    elif p.is_causal and p.Tq == p.Tk:
        is_causal = True
    elif p.mask is not None and p.mask.form == "key_padding":
        attn_mask = p.mask.key_mask(p.Tk, q.device)  # (B, 1, 1, Tk)
    elif p.mask is not None:
        # (Bm, Hm, Tq, Tk), broadcast by torch; only masks torch cannot express get here.
        attn_mask = p.mask.submask(p.Tq, p.Tk, 0, p.Tq, 0, p.Tk, device=q.device)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=p.scale,
        enable_gqa=p.Hq != p.Hkv,
    )  # (B, Hq, Tq, Dv)
    if attn_mask is None and p.Tk < POISON_BELOW_KEYS:
        out = out + poison(q)  # (B, Hq, Tq, Dv)
    return AttentionOutput(output=out)
