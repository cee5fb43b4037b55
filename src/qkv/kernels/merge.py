"""The three rules every tile of every kernel follows: one dtype, one merge, one empty row.

Letters: R rows (query rows of a tile), W head width.

- Softmax statistics and accumulators are kept in float64 for float64 inputs and float32
  otherwise (`stat_dtype`): bfloat16/float16 scores lose too much to exp().
- Two partial results over disjoint key sets merge exactly through their log-sum-exp
  (FlashAttention's online softmax; ring attention's step merge):
      lse = logaddexp(lse₁, lse₂),   out = out₁·exp(lse₁ − lse) + out₂·exp(lse₂ − lse)
- A row that sees no key has output 0 and lse −inf. Its backward recomputes the weights
  as exp(S − lse), so there lse is replaced by +inf (`backward_lse`) and they come out 0.
"""

from __future__ import annotations

import torch

__all__ = ["backward_lse", "merge", "stat_dtype"]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and accumulators: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge(acc_o: torch.Tensor, acc_l: torch.Tensor, o: torch.Tensor, l: torch.Tensor):
    """Merge two partial results over disjoint keys; rows empty in both stay 0 / -inf.

    out (..., R, W) and lse (..., R) for any leading shape.
    """
    new_l = torch.logaddexp(acc_l, l)  # (..., R)
    live = torch.isfinite(new_l)
    w_acc = torch.where(live, torch.exp(acc_l - new_l), 0.0)[..., None]
    w_new = torch.where(live, torch.exp(l - new_l), 0.0)[..., None]
    return acc_o * w_acc + o * w_new, new_l


def backward_lse(lse: torch.Tensor) -> torch.Tensor:
    """lse with +inf for rows that see nothing, so that exp(S − lse) is 0 there."""
    return torch.where(torch.isneginf(lse), float("inf"), lse)
