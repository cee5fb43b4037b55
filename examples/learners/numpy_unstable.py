"""Softmax as exp(s) / sum(exp(s)), no maximum subtracted (NumPy).

qkv check examples/learners/numpy_unstable.py  ->  unstable-softmax (exit 1)
"""

import numpy as np


def attention(Q, K, V):
    scores = np.matmul(Q, K.swapaxes(-1, -2)) / np.sqrt(K.shape[-1])
    e = np.exp(scores)
    weights = e / e.sum(axis=-1, keepdims=True)
    return weights @ V
