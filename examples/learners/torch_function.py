"""Scaled dot-product attention as a torch function, the way the notes write it.

qkv check examples/learners/torch_function.py  ->  every check passes (exit 0)
"""

import math

import torch


def attention(q, k, v, mask=None):
    """q (..., Lq, d), k (..., Lk, d), v (..., Lk, dv); mask True = may attend."""
    d = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (..., Lq, Lk)
    if mask is not None:
        scores = scores.masked_fill(mask == 0, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = weights.nan_to_num(0.0)  # a query with no visible key attends to nothing
    return weights @ v, weights
