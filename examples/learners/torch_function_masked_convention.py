"""Attention whose mask marks the hidden positions (1 = masked), like torch's key_padding_mask.

qkv check examples/learners/torch_function_masked_convention.py  ->  every check passes (exit 0);
the report says it found the convention 1/True = masked
"""

import math

import torch


def attention(q, k, v, attn_mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))  # True = hidden
    weights = torch.softmax(scores, dim=-1)
    return torch.where(torch.isnan(weights), 0.0, weights) @ v
