"""Transformer layers and stacks (Vaswani et al. 2017), batch-first, on qkv attention.

Letters: B batch, S source length, T target length, E model width, F feed-forward width,
V vocabulary size, L layers.

    TransformerEncoderLayer   x -> x + SelfAttn(x) -> x + FFN(x)            (B, S, E)
    TransformerDecoderLayer   x -> x + CausalSelfAttn(x) -> x + CrossAttn(x, memory)
                                -> x + FFN(x)                                (B, T, E)
    TransformerEncoder / TransformerDecoder: L copies of a layer, optional final norm.

Two placements of LayerNorm. Post-norm (`norm_first=False`, the paper's) normalises after
each residual addition, x = norm(x + sublayer(x)); pre-norm (`norm_first=True`) normalises
the sublayer's input, x = x + sublayer(norm(x)), which keeps an identity path through the
whole stack and trains without warm-up (Xiong et al. 2020) but needs a final norm after the
last layer. Parameter names and the order of dropouts follow `torch.nn.TransformerEncoder-
Layer`/`TransformerDecoderLayer`, and the tests prove the layers equal torch's.

Masks follow qkv's convention, True = may attend: `mask` (encoder) and `self_mask`
(decoder) as `MultiHeadAttention` takes them, usually a (B, S) or (B, T) padding mask;
`memory_mask` for the decoder's cross-attention, usually the source padding mask (B, S).
"""

from __future__ import annotations

import copy
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import Mask
from .attention import MultiHeadAttention
from .cache import KVCache, LayerCache
from .positional import ALiBi, RotaryEmbedding

__all__ = [
    "FeedForward",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]

MaskLike = torch.Tensor | Mask | None

# Exact GELU (the erf form, Hendrycks & Gimpel 2016), as BERT and torch's "gelu" use it.
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class FeedForward(nn.Module):
    """Position-wise feed-forward network, linear2(dropout(act(linear1(x)))) (§3.3).

    Shapes: (B, T, E) -> (B, T, F) -> (B, T, E); the same weights at every position.
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        embed_dim = _check_size(embed_dim, "embed_dim")
        ffn_dim = _check_size(ffn_dim, "ffn_dim")
        if not isinstance(activation, str) or activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}; got {activation!r}"
            )
        dropout = _check_dropout(dropout)
        self.activation = activation
        self.linear1 = nn.Linear(embed_dim, ffn_dim, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, embed_dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = _ACTIVATIONS[self.activation](self.linear1(x))  # (B, T, F)
        return self.linear2(self.dropout(hidden))  # (B, T, E)


def _check_size(size: int, name: str) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(size).__name__} {size!r}")
    if size < 1:
        raise ValueError(f"{name} must be >= 1; got {size}")
    return int(size)


def _check_dropout(dropout: float, name: str = "dropout") -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"{name} must be a float; got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name} must lie in [0, 1); got {dropout}")
    return float(dropout)


def _attn_dropout(dropout: float, attn_dropout: float | None) -> float:
    """The attention-weight dropout: `attn_dropout` if given, else the layer's `dropout`."""
    return dropout if attn_dropout is None else _check_dropout(attn_dropout, "attn_dropout")


def _check_input(x, name: str, letters: str, layer: nn.Module) -> None:
    """`x` must be a (B, T, E) tensor of the layer's width E and parameter dtype."""
    E = layer.self_attn.embed_dim
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {letters}; got {type(x).__name__}")
    if x.dim() == 2:
        raise ValueError(
            f"{name} must be batched {letters}; got shape {tuple(x.shape)}. The layers take "
            f"batch-first input only: add a batch dimension with {name}.unsqueeze(0)"
        )
    if x.dim() != 3 or x.shape[-1] != E:
        raise ValueError(
            f"{name} must have shape {letters} with E = embed_dim = {E}; got {tuple(x.shape)}"
        )
    weight = layer.self_attn.q_proj.weight
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name} is {x.dtype} but the parameters are {weight.dtype}; convert one with "
            ".to(dtype)"
        )


class TransformerEncoderLayer(nn.Module):
    """Self-attention then feed-forward, each wrapped in a residual and a LayerNorm.

    Run with `causal=True` it is also the block of a decoder-only language model (GPT,
    Radford et al. 2018): there is no encoder to cross-attend to, so causal self-attention
    and the feed-forward network are the whole block.

    Args:
        embed_dim: E.  num_heads: H.
        ffn_dim: F, the hidden width of the feed-forward network (the paper's d_ff).
        dropout: on each sublayer's output, inside the feed-forward network, and (unless
            `attn_dropout` is given) on the attention weights, like torch's layer.
        activation: "relu" (the paper) or "gelu" (exact, BERT).
        norm_first: pre-norm (True) or post-norm (False, the paper and torch's default).
        layer_norm_eps: epsilon of the LayerNorms.
        bias: biases in the projections, feed-forward network and LayerNorms.
        num_kv_heads, score, rotary, alibi: passed to `MultiHeadAttention`.
        attn_dropout: dropout on the attention weights, if different from `dropout`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        num_kv_heads: int | None = None,
        score: str = "dot",
        rotary: RotaryEmbedding | None = None,
        alibi: ALiBi | None = None,
        attn_dropout: float | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dropout = _check_dropout(dropout)
        factory = {"device": device, "dtype": dtype}
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            embed_dim, num_heads, num_kv_heads=num_kv_heads, bias=bias,
            dropout=_attn_dropout(dropout, attn_dropout), score=score,
            rotary=rotary, alibi=alibi, **factory,
        )  # fmt: skip
        self.ffn = FeedForward(
            embed_dim, ffn_dim, activation=activation, dropout=dropout, bias=bias, **factory
        )
        self.norm1 = nn.LayerNorm(embed_dim, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(embed_dim, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: MaskLike = None,
        causal: bool = False,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x (B, S, E) -> (B, S, E). `cache` (with `causal=True`) for incremental decoding."""
        _check_input(x, "x", "(B, S, E)", self)
        self_cache = None if cache is None else cache.self_attn

        def attend(h: torch.Tensor) -> torch.Tensor:
            return self.dropout1(self.self_attn(h, mask=mask, causal=causal, cache=self_cache))

        # 1) self-attention sublayer, 2) feed-forward sublayer; each with a residual
        if self.norm_first:
            x = x + attend(self.norm1(x))  # (B, S, E)
            return x + self.dropout2(self.ffn(self.norm2(x)))  # (B, S, E)
        x = self.norm1(x + attend(x))  # (B, S, E)
        return self.norm2(x + self.dropout2(self.ffn(x)))  # (B, S, E)


class TransformerDecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, then feed-forward.

    A decoder is more than a stack of encoder layers (a pitfall of the seed notes): its
    self-attention is causal, so position t cannot see the targets it must predict, and it
    cross-attends to every position of the encoder output (the "memory"), §3.2.3.

    Arguments as for `TransformerEncoderLayer`; `rotary`/`alibi` apply to the
    self-attention only (cross-attention relates two different sequences).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        num_kv_heads: int | None = None,
        score: str = "dot",
        rotary: RotaryEmbedding | None = None,
        alibi: ALiBi | None = None,
        attn_dropout: float | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dropout = _check_dropout(dropout)
        factory = {"device": device, "dtype": dtype}
        attn_p = _attn_dropout(dropout, attn_dropout)
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            embed_dim, num_heads, num_kv_heads=num_kv_heads, bias=bias, dropout=attn_p,
            score=score, rotary=rotary, alibi=alibi, **factory,
        )  # fmt: skip
        self.cross_attn = MultiHeadAttention(
            embed_dim, num_heads, num_kv_heads=num_kv_heads, bias=bias, dropout=attn_p,
            score=score, **factory,
        )  # fmt: skip
        self.ffn = FeedForward(
            embed_dim, ffn_dim, activation=activation, dropout=dropout, bias=bias, **factory
        )
        self.norm1 = nn.LayerNorm(embed_dim, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(embed_dim, eps=layer_norm_eps, bias=bias, **factory)
        self.norm3 = nn.LayerNorm(embed_dim, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        *,
        memory_mask: MaskLike = None,
        self_mask: MaskLike = None,
        causal: bool = True,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, E), memory (B, S, E) -> (B, T, E).

        With a `cache`, x holds only the new positions; `memory` may be None once the
        cross-attention cache has been filled by the first call.
        """
        self_cache = None if cache is None else cache.self_attn
        cross_cache = None if cache is None else cache.cross_attn
        _check_input(x, "x", "(B, T, E)", self)
        if memory is None:
            if cross_cache is None or not cross_cache.filled:
                # Without memory the cross-attention would attend to x itself: a "decoder"
                # with no cross-attention at all (a pitfall of the seed notes).
                raise ValueError(
                    "memory must be the encoder output (B, S, E); memory=None is only allowed "
                    "with a cache whose cross-attention was filled by an earlier call"
                )
        else:
            _check_input(memory, "memory", "(B, S, E)", self)
            if memory.shape[0] != x.shape[0]:
                raise ValueError(
                    f"x (B, T, E) and memory (B, S, E) must have the same batch size B; got "
                    f"x {tuple(x.shape)} and memory {tuple(memory.shape)}"
                )

        def self_block(h: torch.Tensor) -> torch.Tensor:
            h = self.self_attn(h, mask=self_mask, causal=causal, cache=self_cache)
            return self.dropout1(h)

        def cross_block(h: torch.Tensor) -> torch.Tensor:
            h = self.cross_attn(h, memory, mask=memory_mask, cache=cross_cache)
            return self.dropout2(h)

        # 1) causal self-attention, 2) cross-attention to the memory, 3) feed-forward
        if self.norm_first:
            x = x + self_block(self.norm1(x))  # (B, T, E)
            x = x + cross_block(self.norm2(x))  # (B, T, E)
            return x + self.dropout3(self.ffn(self.norm3(x)))  # (B, T, E)
        x = self.norm1(x + self_block(x))  # (B, T, E)
        x = self.norm2(x + cross_block(x))  # (B, T, E)
        return self.norm3(x + self.dropout3(self.ffn(x)))  # (B, T, E)


def _clones(layer: nn.Module, num_layers: int, kind: type[nn.Module]) -> nn.ModuleList:
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be a {kind.__name__} to copy; got {type(layer).__name__}")
    # The two layers are not interchangeable: a decoder needs cross-attention to the memory.
    other = TransformerDecoderLayer if kind is TransformerEncoderLayer else TransformerEncoderLayer
    if isinstance(layer, other):
        raise TypeError(f"layer must be a {kind.__name__}; got a {other.__name__}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int; got {num_layers!r}")
    return nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))


class TransformerEncoder(nn.Module):
    """`num_layers` independent copies of `layer` (like torch), then `norm` if given.

    Pre-norm stacks need the final norm (their residual stream is never normalised
    otherwise); post-norm stacks usually have none.
    """

    def __init__(
        self, layer: TransformerEncoderLayer, num_layers: int, *, norm: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers, TransformerEncoderLayer)
        self.norm = norm

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: MaskLike = None,
        causal: bool = False,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (B, S, E) -> (B, S, E); `mask` usually the (B, S) padding mask, True = real."""
        if cache is not None:
            cache.check_owner(self, len(self.layers))
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            x = layer(x, mask=mask, causal=causal, cache=layer_cache)
        return x if self.norm is None else self.norm(x)

    def new_cache(self, *, capacity: int | None = None) -> KVCache:
        """Self-attention caches for causal (decoder-only) use of this stack."""
        layers = [LayerCache(layer.self_attn.new_cache(capacity=capacity)) for layer in self.layers]
        return KVCache(self, layers)


class TransformerDecoder(nn.Module):
    """`num_layers` independent copies of a `TransformerDecoderLayer`, then `norm` if given."""

    def __init__(
        self, layer: TransformerDecoderLayer, num_layers: int, *, norm: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers, TransformerDecoderLayer)
        self.norm = norm

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        *,
        memory_mask: MaskLike = None,
        self_mask: MaskLike = None,
        causal: bool = True,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, E), memory (B, S, E) -> (B, T, E).

        `memory_mask` is usually the source padding mask (B, S), True = real token, the same
        one the encoder used. With a `cache` (from `new_cache`), x holds the new positions
        only and the self-attention keys/values of earlier ones come from the cache.
        """
        if cache is not None:
            cache.check_owner(self, len(self.layers))
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            x = layer(
                x, memory, memory_mask=memory_mask, self_mask=self_mask, causal=causal,
                cache=layer_cache,
            )  # fmt: skip
        return x if self.norm is None else self.norm(x)

    def new_cache(self, *, capacity: int | None = None) -> KVCache:
        """A growing self-attention cache and a fill-once cross-attention cache per layer."""
        layers = [
            LayerCache(
                layer.self_attn.new_cache(capacity=capacity),
                layer.cross_attn.new_cache(cross=True),
            )
            for layer in self.layers
        ]
        return KVCache(self, layers)
