"""Single-head self-attention that multiplies by 1/sqrt(d_k) after the softmax.

qkv check examples/learners/torch_module_scale_after.py  ->  scale-after-softmax (exit 1)
"""

from math import sqrt

import torch
from torch import nn


class Self_Attention(nn.Module):
    def __init__(self, input_dim, dim_k, dim_v):
        super().__init__()
        self.q = nn.Linear(input_dim, dim_k)
        self.k = nn.Linear(input_dim, dim_k)
        self.v = nn.Linear(input_dim, dim_v)
        self._norm_fact = 1 / sqrt(dim_k)

    def forward(self, x):
        Q, K, V = self.q(x), self.k(x), self.v(x)  # (B, T, dim_k), (B, T, dim_k), (B, T, dim_v)
        atten = nn.Softmax(dim=-1)(torch.bmm(Q, K.permute(0, 2, 1))) * self._norm_fact
        return torch.bmm(atten, V)
