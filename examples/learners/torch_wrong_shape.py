"""The weights multiplied from the wrong side: a (..., Lk, d) "output".

qkv check examples/learners/torch_wrong_shape.py  ->  shape (exit 1)
"""

import math

import torch


def attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., Lq, Lk)
    weights = torch.softmax(scores, dim=-1)
    return weights.transpose(-2, -1) @ q  # (..., Lk, d)
