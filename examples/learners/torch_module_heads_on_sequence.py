"""Multi-head self-attention whose heads are cut along the sequence axis.

qkv check examples/learners/torch_module_heads_on_sequence.py  ->  heads-split-on-sequence (exit 1)
"""

import math

import torch
from torch import nn


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.fc = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        B, T, E = x.shape
        H = self.num_heads
        q = self.query(x).reshape(B, H, T // H, E)  # each head gets T/H positions
        k = self.key(x).reshape(B, H, T // H, E)
        v = self.value(x).reshape(B, H, T // H, E)
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(E // H), dim=-1)
        return self.fc((w @ v).reshape(B, T, E))
