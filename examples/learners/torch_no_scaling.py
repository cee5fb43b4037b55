"""Attention without the 1/sqrt(d) (a torch function, heads already split).

qkv check examples/learners/torch_no_scaling.py  ->  no-scaling (exit 1)
"""

import torch
import torch.nn.functional as F


def scaled_dot_product_attention(query, key, value):
    """query (N, H, Lq, d), key/value (N, H, Lk, d)."""
    scores = torch.matmul(query, key.transpose(2, 3))  # (N, H, Lq, Lk): not divided by sqrt(d)
    weights = F.softmax(scores, dim=-1)
    return torch.matmul(weights, value)
