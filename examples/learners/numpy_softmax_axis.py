"""The softmax taken over the queries (axis -2) instead of the keys (NumPy).

qkv check examples/learners/numpy_softmax_axis.py  ->  softmax-axis (exit 1)
"""

import numpy as np


def attention(q, k, v):
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])  # (..., Lq, Lk)
    e = np.exp(scores - scores.max(axis=-2, keepdims=True))
    weights = e / e.sum(axis=-2, keepdims=True)  # normalised over the queries
    return weights @ v, weights
