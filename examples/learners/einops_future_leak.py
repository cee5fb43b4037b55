"""Causal self-attention (einops, fused qkv) whose mask is off by one: it sees the next token.

qkv check examples/learners/einops_future_leak.py  ->  future-leak (exit 1)
"""

import math

import torch
from einops import rearrange
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, causal=True):
        q, k, v = rearrange(
            self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_heads
        )
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if causal:
            T = x.shape[1]
            future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=2)  # should be 1
            scores = scores.masked_fill(future, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))
