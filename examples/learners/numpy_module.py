"""Multi-head self-attention in NumPy with its own weight matrices (x @ W).

qkv check examples/learners/numpy_module.py  ->  every check passes (exit 0)
"""

import numpy as np


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class MultiHeadSelfAttention:
    def __init__(self, d_model, num_heads, seed=0):
        rng = np.random.default_rng(seed)
        self.h = num_heads
        self.W_q, self.W_k, self.W_v, self.W_o = (
            rng.normal(0, d_model**-0.5, (d_model, d_model)) for _ in range(4)
        )

    def __call__(self, x):
        """x (B, T, E) -> (B, T, E)."""
        B, T, E = x.shape
        D = E // self.h

        def heads(t):  # (B, T, E) -> (B, H, T, D)
            return t.reshape(B, T, self.h, D).transpose(0, 2, 1, 3)

        q, k, v = heads(x @ self.W_q), heads(x @ self.W_k), heads(x @ self.W_v)
        w = softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(D))  # (B, H, T, T)
        out = (w @ v).transpose(0, 2, 1, 3).reshape(B, T, E)
        return out @ self.W_o
