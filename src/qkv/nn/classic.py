"""The attention of RNN encoder-decoders, before Transformers: additive and multiplicative.

Letters: B batch, Tq query steps (decoder states), Tk key steps (encoder states),
Dq/Dk/Dv query/key/value feature sizes, A the hidden size of the additive score.

In an RNN translator the encoder turns the source sentence into states h_1..h_Tk, and
before emitting each word the decoder state s asks "which source words matter now?": a
score e_j = score(s, h_j) per source word, weights α = softmax(e) and a context vector
c = Σ_j α_j h_j that is fed to the decoder with s. The score functions differ:

* `AdditiveAttention`, Bahdanau et al. 2015: ``vᵀ tanh(W_q s + W_k h)``, a one-hidden-
  layer network per (s, h) pair; s and h may have different sizes.
* `BilinearAttention`, Luong et al. 2015 "general": ``sᵀ W h``.
* `DotAttention`, Luong et al. 2015 "dot": ``sᵀ h``; divided by sqrt(D) it is the scaled
  dot product of the Transformer (Vaswani et al. 2017).

(Luong's third score, "concat", is the additive one.) Keys and values are both the encoder
states by default; pass `values` to attend over something else.

Every module returns ``AttentionContext(context (B, Tq, Dv), weights (B, Tq, Tk))`` and
runs its softmax through `qkv.attention`, so masks mean the same as everywhere in qkv:
`mask` is None, a bool tensor broadcastable to (B, Tq, Tk) where **True means "may
attend"** (padding of the encoder states: shape (B, 1, Tk)), or a `qkv.masks` mask such
as ``qkv.masks.padding(lengths)``. A query that may attend to nothing gets context 0,
weights 0 and zero gradients, never NaN.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..functional import attention
from ..masks import Mask

__all__ = ["AdditiveAttention", "AttentionContext", "BilinearAttention", "DotAttention"]


class AttentionContext(NamedTuple):
    """What the classic attention modules return; unpacks as ``context, weights``."""

    context: Tensor  # (B, Tq, Dv): Σ_j weights[b, i, j] · values[b, j]
    weights: Tensor  # (B, Tq, Tk): softmax over the allowed keys, 0 elsewhere


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive; got {value}")
    return int(value)


def _check_inputs(
    query, keys, values, mask, *, query_dim: int | None, key_dim: int | None
) -> tuple[Tensor, Tensor | Mask | None]:
    """Validate one call; return the values (keys if None) and the mask shaped for qkv.

    The bool mask comes back broadcastable to (B, 1, Tq, Tk): qkv.attention's head axis.
    """
    values = keys if values is None else values
    for name, t, layout in (
        ("query", query, "(B, Tq, Dq)"),
        ("keys", keys, "(B, Tk, Dk)"),
        ("values", values, "(B, Tk, Dv)"),
    ):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = f"dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point tensor {layout}; got {got}")
        if t.dim() != 3:
            hint = ""
            if name == "query" and t.dim() == 2:
                hint = " (a single decoder state (B, Dq): pass query.unsqueeze(1))"
            raise ValueError(f"{name} must have shape {layout}; got {tuple(t.shape)}{hint}")
    B, Tq, Dq = query.shape
    Tk, Dk = keys.shape[1], keys.shape[2]
    if keys.shape[0] != B or values.shape[0] != B:
        raise ValueError(
            f"query, keys and values must share the batch size B; got query "
            f"{tuple(query.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}"
        )
    if values.shape[1] != Tk:
        raise ValueError(
            f"keys and values must have the same length Tk; got keys {tuple(keys.shape)} and "
            f"values {tuple(values.shape)}"
        )
    if query_dim is not None and Dq != query_dim:
        raise ValueError(f"query must have Dq=query_dim={query_dim}; got {tuple(query.shape)}")
    if key_dim is not None and Dk != key_dim:
        raise ValueError(f"keys must have Dk=key_dim={key_dim}; got {tuple(keys.shape)}")
    if not (query.dtype == keys.dtype == values.dtype):
        raise TypeError(
            f"query, keys and values must share one dtype; got {query.dtype}, {keys.dtype}, "
            f"{values.dtype}"
        )

    if mask is None or isinstance(mask, Mask):
        return values, mask  # a qkv.masks mask is checked by qkv.attention
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"a {mask.dtype} tensor" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(
            f"mask must be None, a bool tensor (True = may attend) or a qkv.masks mask; got {got}"
        )
    if mask.dim() > 3 or any(
        m not in (1, n) for m, n in zip(mask.shape[::-1], (Tk, Tq, B), strict=False)
    ):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to (B, Tq, Tk)={(B, Tq, Tk)}"
        )
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)  # (B, 1, Tq, Tk): one "head"
    return values, mask


def _attend(q: Tensor, k: Tensor, values: Tensor, mask, *, scale: float, bias=None):
    """softmax(q kᵀ·scale + bias, masked) · values through qkv.attention, with one head.

    q (B, Tq, D), k (B, Tk, D), values (B, Tk, Dv), bias (B, Tq, Tk) or None.
    """
    out = attention(
        q.unsqueeze(1),  # (B, 1, Tq, D)
        k.unsqueeze(1),  # (B, 1, Tk, D)
        values.unsqueeze(1),  # (B, 1, Tk, Dv)
        mask=mask,
        bias=None if bias is None else bias.unsqueeze(1),  # (B, 1, Tq, Tk)
        scale=scale,
        return_weights=True,
    )
    context = out.output.squeeze(1)  # (B, Tq, Dv)
    weights = out.weights.squeeze(1)  # (B, Tq, Tk)
    return AttentionContext(context, weights)


class AdditiveAttention(nn.Module):
    """Bahdanau attention (Bahdanau, Cho & Bengio 2015, "Neural Machine Translation by
    Jointly Learning to Align and Translate", §3.1 and appendix A.1.2).

    ``score(s, h) = vᵀ tanh(W_q s + W_k h)``: query and key are projected to a common
    hidden size A, added, squashed and reduced to a number by v. It works for any Dq and
    Dk, and the tanh lets it score pairs a dot product cannot; the price is that it is not a
    matrix product: it builds a (B, Tq, Tk, A) tensor, so it is for RNN-sized problems, not
    long sequences. (W_k h does not depend on the query, so an RNN decoder that calls this
    once per step recomputes it; cache `key_proj(keys)` yourself if that matters.)

    Args:
        query_dim: Dq, the decoder state size.
        key_dim: Dk, the encoder state size.
        hidden_dim: A, the size of the hidden layer of the score.
        bias: add a learned bias inside the tanh (kept in `key_proj`); the paper has none.

    Shapes: ``forward(query (B, Tq, Dq), keys (B, Tk, Dk), values (B, Tk, Dv) = keys,
    *, mask=None) -> AttentionContext(context (B, Tq, Dv), weights (B, Tq, Tk))``.
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int, *, bias: bool = False):
        super().__init__()
        self.query_dim = _positive_int(query_dim, "query_dim")
        self.key_dim = _positive_int(key_dim, "key_dim")
        self.hidden_dim = _positive_int(hidden_dim, "hidden_dim")
        self.query_proj = nn.Linear(self.query_dim, self.hidden_dim, bias=False)  # W_q
        self.key_proj = nn.Linear(self.key_dim, self.hidden_dim, bias=bias)  # W_k (+ b)
        self.score_proj = nn.Linear(self.hidden_dim, 1, bias=False)  # vᵀ

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        *,
        mask: Tensor | Mask | None = None,
    ) -> AttentionContext:
        """Context (B, Tq, Dv) and weights (B, Tq, Tk) of each query over the keys."""
        values, mask = _check_inputs(
            query, keys, values, mask, query_dim=self.query_dim, key_dim=self.key_dim
        )
        # 1) project both sides to the hidden size A
        q = self.query_proj(query)  # (B, Tq, A)
        k = self.key_proj(keys)  # (B, Tk, A)
        # 2) score every (query, key) pair: e_ij = vᵀ tanh(W_q s_i + W_k h_j)
        hidden = torch.tanh(q[:, :, None, :] + k[:, None, :, :])  # (B, Tq, Tk, A)
        scores = self.score_proj(hidden).squeeze(-1)  # (B, Tq, Tk)
        # 3) masked softmax and weighted sum. The score is not a dot product, so it enters
        #    qkv.attention whole, as the additive bias, over a dot product that vanishes
        #    (q and k of width 1, all zeros): one masked softmax for all of qkv.
        B, Tq, Tk = scores.shape
        zeros_q = scores.new_zeros(B, Tq, 1)  # (B, Tq, 1)
        zeros_k = scores.new_zeros(B, Tk, 1)  # (B, Tk, 1)
        return _attend(zeros_q, zeros_k, values, mask, scale=1.0, bias=scores)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden_dim={self.hidden_dim}"


class BilinearAttention(nn.Module):
    """Luong's "general" attention (Luong, Pham & Manning 2015, "Effective Approaches to
    Attention-based Neural Machine Translation", §3.1, eq. 8).

    ``score(s, h) = sᵀ W h`` with W of shape (Dq, Dk): a learned similarity between
    states of possibly different sizes. Since sᵀ W h = (sᵀ W)·h it is dot-product
    attention after projecting the query, and runs as one unscaled `qkv.attention` call.

    Shapes: as `AdditiveAttention`; `weight` is W, (Dq, Dk).
    """

    def __init__(self, query_dim: int, key_dim: int) -> None:
        super().__init__()
        self.query_dim = _positive_int(query_dim, "query_dim")
        self.key_dim = _positive_int(key_dim, "key_dim")
        self.weight = nn.Parameter(torch.empty(self.query_dim, self.key_dim))  # (Dq, Dk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The scale of nn.Linear(Dq, Dk) (and of nn.Bilinear): U(±1/sqrt(Dq)).
        bound = 1.0 / math.sqrt(self.query_dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        *,
        mask: Tensor | Mask | None = None,
    ) -> AttentionContext:
        """Context (B, Tq, Dv) and weights (B, Tq, Tk) of each query over the keys."""
        values, mask = _check_inputs(
            query, keys, values, mask, query_dim=self.query_dim, key_dim=self.key_dim
        )
        q = query @ self.weight.to(query.dtype)  # (B, Tq, Dk): sᵀ W
        return _attend(q, keys, values, mask, scale=1.0)  # scores (sᵀ W)·h, unscaled as Luong

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}"


class DotAttention(nn.Module):
    """Luong's "dot" attention (Luong et al. 2015, §3.1): ``score(s, h) = sᵀ h``.

    No parameters; query and keys must have the same size D. With ``scaled=True`` the
    score is divided by sqrt(D), which is the Transformer's scaled dot product (Vaswani et
    al. 2017, §3.2.1: without it, large D gives large scores and a saturated softmax).

    Shapes: as `AdditiveAttention`, with Dq = Dk.
    """

    def __init__(self, *, scaled: bool = False) -> None:
        super().__init__()
        if not isinstance(scaled, bool):
            raise TypeError(f"scaled must be a bool; got {type(scaled).__name__} {scaled!r}")
        self.scaled = scaled

    def forward(
        self,
        query: Tensor,
        keys: Tensor,
        values: Tensor | None = None,
        *,
        mask: Tensor | Mask | None = None,
    ) -> AttentionContext:
        """Context (B, Tq, Dv) and weights (B, Tq, Tk) of each query over the keys."""
        values, mask = _check_inputs(query, keys, values, mask, query_dim=None, key_dim=None)
        if query.shape[-1] != keys.shape[-1]:
            raise ValueError(
                f"DotAttention needs query and keys of the same size D; got query "
                f"{tuple(query.shape)} and keys {tuple(keys.shape)} (use BilinearAttention "
                "or AdditiveAttention for different sizes)"
            )
        scale = 1.0 / math.sqrt(query.shape[-1]) if self.scaled else 1.0
        return _attend(query, keys, values, mask, scale=scale)

    def extra_repr(self) -> str:
        return f"scaled={self.scaled}"
