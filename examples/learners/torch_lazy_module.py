"""Single-head self-attention with nn.LazyLinear: sizes learnt at the first call.

qkv check examples/learners/torch_lazy_module.py  ->  every check passes (exit 0)
"""

import math

import torch
from torch import nn


class LazySelfAttention(nn.Module):
    def __init__(self, hidden_dim):
        super().__init__()
        self.query = nn.LazyLinear(hidden_dim)
        self.key = nn.LazyLinear(hidden_dim)
        self.value = nn.LazyLinear(hidden_dim)

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return torch.softmax(scores, dim=-1) @ v
