"""A plain class (no nn.Module) called like a function, from an interview answer.

qkv check examples/learners/plain_class.py  ->  every check passes (exit 0)
"""

import torch
import torch.nn.functional as F


class ScaledDotProductAttention:
    def __init__(self, d_k):
        self.d_k = d_k

    def __call__(self, Q, K, V):
        scores = torch.matmul(Q, K.transpose(-2, -1)) / torch.sqrt(torch.tensor(self.d_k))
        attention_weights = F.softmax(scores, dim=-1)
        return torch.matmul(attention_weights, V), attention_weights
