"""Self-attention whose keys and values go through the query's layer.

qkv check examples/learners/torch_module_shared_projection.py  ->  shared-projection (exit 1)
"""

import math

import torch
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.h = num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x):
        B, T, E = x.shape
        q, k, v = self.q_proj(x), self.q_proj(x), self.q_proj(x)  # k_proj, v_proj never used
        q, k, v = (t.view(B, T, self.h, E // self.h).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(E // self.h), dim=-1)
        return self.out_proj((w @ v).transpose(1, 2).reshape(B, T, E))
