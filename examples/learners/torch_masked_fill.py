"""The -1e9 fill of the notes: a query whose keys are all masked attends to all of them.

qkv check examples/learners/torch_masked_fill.py  ->  masked-row-uniform (exit 1)
"""

import math

import torch


def attention(q, k, v, mask=None):
    """q (N, Lq, d), k/v (N, Lk, d); mask (N, Lq, Lk) with 1 = may attend."""
    scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(mask == 0, -1e9)
    weights = torch.softmax(scores, dim=-1)
    return torch.bmm(weights, v), weights
