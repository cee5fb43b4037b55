"""qkv: attention done right — readable, provably correct, fast, memory-efficient.

import torch, qkv
q = torch.randn(2, 8, 128, 64)           # (B, Hq, Tq, D)
k = v = torch.randn(2, 2, 128, 64)       # (B, Hkv, Tk, D): grouped-query, 4 q-heads per kv
out = qkv.attention(q, k, v, causal=True)                 # (2, 8, 128, 64)
out, w, lse = qkv.attention(q, k, v, mask=qkv.masks.window(16), return_weights=True)
"""

from . import distributed, interop, masks, nn
from . import numpy as numpy  # the float64 NumPy reference: qkv.numpy.attention_forward
from ._types import AttentionOutput
from .check import CheckReport, check
from .functional import attention, attention_weights, explain
from .kernels import KernelChoice
from .nn import MultiHeadAttention

__all__ = [
    "AttentionOutput",
    "CheckReport",
    "KernelChoice",
    "MultiHeadAttention",
    "attention",
    "attention_weights",
    "check",
    "distributed",
    "explain",
    "interop",
    "masks",
    "nn",
    "numpy",
]
__version__ = "0.1.0"
