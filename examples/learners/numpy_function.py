"""Scaled dot-product attention in NumPy with a numerically stable softmax.

qkv check examples/learners/numpy_function.py  ->  every check passes (exit 0)
"""

import numpy as np


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))  # each row's own maximum
    return e / e.sum(axis=axis, keepdims=True)


def self_attention(Q, K, V, mask=None):
    """Q (..., Lq, d), K (..., Lk, d), V (..., Lk, dv); mask True = may attend."""
    d = Q.shape[-1]
    scores = Q @ np.swapaxes(K, -1, -2) / np.sqrt(d)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
        full = mask.any(axis=-1, keepdims=True)  # rows with at least one visible key
        scores = np.where(full, scores, 0.0)
        return (softmax(scores) * full) @ V
    return softmax(scores) @ V
