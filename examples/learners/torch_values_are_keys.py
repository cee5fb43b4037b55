"""Weights applied to the keys instead of the values (a slip no named pitfall covers).

qkv check examples/learners/torch_values_are_keys.py  ->  wrong-output (exit 1)
"""

import math


def attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    weights = scores.softmax(dim=-1)
    return weights @ k
