"""Functional dropout on the weights without training=: still on after eval().

qkv check examples/learners/torch_module_dropout.py  ->  dropout-in-eval (exit 1)
"""

import math

import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, mask=None):
        B, T, E = x.shape
        H, D = self.n_heads, E // self.n_heads
        q = self.wq(x).view(B, T, H, D).transpose(1, 2)
        k = self.wk(x).view(B, T, H, D).transpose(1, 2)
        v = self.wv(x).view(B, T, H, D).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D)
        if mask is not None:
            scores = scores.masked_fill(mask.unsqueeze(1) == 0, float("-inf"))
        w = F.softmax(scores, dim=-1).nan_to_num(0.0)
        w = F.dropout(w, p=0.1)  # training defaults to True
        return self.wo((w @ v).transpose(1, 2).reshape(B, T, E))
