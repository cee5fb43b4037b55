"""Multi-head attention in NumPy, forward and backward by hand, in torch's weight layout.

Legend of the dimension letters used in the shape comments of this file:

    B    batch size
    H    number of heads
    Tq   number of queries (length of the query sequence)
    Tk   number of keys and values
    E    model width (``embed_dim``), the width of queries and of the output
    Ek   width of the key inputs (``kdim``, default E)
    Ev   width of the value inputs (``vdim``, default E)
    Dh   head dim, E / H

The five steps of the forward pass, numbered the same way in the code:

    1) project queries, keys and values, each with its own weights:  (B, T, E*) -> (B, T, E)
    2) split the feature axis into H heads:          (B, T, E) -> (B, H, T, Dh)
    3) attend, every head independently:             (B, H, Tq, Dh)
    4) merge the heads back side by side:            (B, H, Tq, Dh) -> (B, Tq, E)
    5) output projection:                            (B, Tq, E) -> (B, Tq, E)

Weights follow ``torch.nn.Linear``: ``y = x @ w.T + b`` with ``w`` of shape (E_out, E_in), so
they can be copied into ``torch.nn.MultiheadAttention`` one-to-one (``in_proj_weight`` is
``concat(w_q, w_k, w_v)`` when Ek == Ev == E, otherwise ``q_proj_weight`` etc.).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .attention import AttentionCache, _float_dtype, attention_backward, attention_forward

__all__ = [
    "MultiHeadCache",
    "MultiHeadParams",
    "multi_head_attention_backward",
    "multi_head_attention_forward",
]


def _check_size(size: int, name: str) -> int:
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(size).__name__} {size!r}")
    if size < 1:
        raise ValueError(f"{name} must be positive, got {size}")
    return int(size)


def _check_heads(embed_dim: int, num_heads: int) -> int:
    """Heads split the E features into H equal groups, so H must divide E."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)):
        raise TypeError(f"num_heads must be an int, got {num_heads!r}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    if embed_dim % num_heads != 0:
        raise ValueError(
            f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}): "
            f"each head takes embed_dim / num_heads features"
        )
    return embed_dim // num_heads


@dataclass
class MultiHeadParams:
    """Weights and biases of multi-head attention, in ``torch.nn.Linear`` layout.

    Attributes:
        w_q: ``(E, E)``  query projection;   b_q: ``(E,)`` or None.
        w_k: ``(E, Ek)`` key projection;     b_k: ``(E,)`` or None.
        w_v: ``(E, Ev)`` value projection;   b_v: ``(E,)`` or None.
        w_o: ``(E, E)``  output projection;  b_o: ``(E,)`` or None.

    The same class holds gradients: :func:`multi_head_attention_backward` returns one whose
    every field is the gradient of the matching parameter (None where the bias is None).
    """

    w_q: NDArray[np.floating]
    b_q: NDArray[np.floating] | None
    w_k: NDArray[np.floating]
    b_k: NDArray[np.floating] | None
    w_v: NDArray[np.floating]
    b_v: NDArray[np.floating] | None
    w_o: NDArray[np.floating]
    b_o: NDArray[np.floating] | None

    @property
    def embed_dim(self) -> int:
        return int(np.shape(self.w_q)[0])

    @property
    def kdim(self) -> int:
        return int(np.shape(self.w_k)[1])

    @property
    def vdim(self) -> int:
        return int(np.shape(self.w_v)[1])

    def as_dict(self) -> dict[str, NDArray[np.floating] | None]:
        """The eight fields by name (handy for looping over parameters in tests)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def init(
        cls,
        embed_dim: int,
        num_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        rng: np.random.Generator | int | None = None,
        dtype: DTypeLike | None = None,
    ) -> MultiHeadParams:
        """Fresh parameters: Xavier-uniform weights, zero biases (as torch initialises them).

        Xavier (Glorot) uniform draws from ``U(-a, a)`` with ``a = sqrt(6 / (fan_in +
        fan_out))``, which keeps the variance of activations (forward) and of gradients
        (backward) roughly unchanged through the layer.

        Args:
            embed_dim: E.
            num_heads: if given, checked to divide E (otherwise checked at the forward).
            kdim, vdim: widths of key and value inputs; default E.
            bias: False gives all four biases as None.
            rng: a ``np.random.Generator`` or a seed; never the global random state.
            dtype: floating dtype of the arrays; default float64.
        """
        embed_dim = _check_size(embed_dim, "embed_dim")
        kdim = embed_dim if kdim is None else _check_size(kdim, "kdim")
        vdim = embed_dim if vdim is None else _check_size(vdim, "vdim")
        if num_heads is not None:
            _check_heads(embed_dim, num_heads)
        gen = np.random.default_rng(rng)
        dt = _float_dtype(dtype)

        def xavier(fan_out: int, fan_in: int) -> NDArray[np.floating]:
            a = math.sqrt(6.0 / (fan_in + fan_out))
            return gen.uniform(-a, a, size=(fan_out, fan_in)).astype(dt)  # (E_out, E_in)

        def zeros() -> NDArray[np.floating] | None:
            return np.zeros(embed_dim, dtype=dt) if bias else None  # (E,)

        return cls(
            w_q=xavier(embed_dim, embed_dim),
            b_q=zeros(),
            w_k=xavier(embed_dim, kdim),
            b_k=zeros(),
            w_v=xavier(embed_dim, vdim),
            b_v=zeros(),
            w_o=xavier(embed_dim, embed_dim),
            b_o=zeros(),
        )


@dataclass(frozen=True)
class MultiHeadCache:
    """What :func:`multi_head_attention_backward` needs from the forward pass.

    Attributes:
        query ``(B, Tq, E)``, key ``(B, Tk, Ek)``, value ``(B, Tk, Ev)``: the inputs.
        params: the parameters used (converted to the compute dtype).
        num_heads: H.
        context: ``(B, Tq, E)`` the merged heads, the input of the output projection.
        attention: the :class:`AttentionCache` of step 3, with per-head tensors.
    """

    query: NDArray[np.floating]
    key: NDArray[np.floating]
    value: NDArray[np.floating]
    params: MultiHeadParams
    num_heads: int
    context: NDArray[np.floating]
    attention: AttentionCache

    @property
    def weights(self) -> NDArray[np.floating]:
        """``(B, H, Tq, Tk)`` the attention probabilities of every head."""
        return self.attention.weights

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


def _linear(
    x: NDArray[np.floating], w: NDArray[np.floating], b: NDArray[np.floating] | None
) -> NDArray[np.floating]:
    """``x @ w.T + b``, torch.nn.Linear's convention: ``(..., E_in) -> (..., E_out)``."""
    y = x @ w.T  # (..., E_out)
    return y if b is None else y + b


def _linear_backward(
    dy: NDArray[np.floating],
    x: NDArray[np.floating],
    w: NDArray[np.floating],
    has_bias: bool,
) -> tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating] | None]:
    """Gradients of ``y = x @ w.T + b`` given ``dy``: returns ``(dx, dw, db)``.

    Each of the B·T rows of x went through the same w and b, so their gradients add up
    over all rows: ``dw = Σ_rows dyᵀ x`` and ``db = Σ_rows dy``.
    """
    e_out, e_in = w.shape
    dx = dy @ w  # (..., E_in)
    dw = dy.reshape(-1, e_out).T @ x.reshape(-1, e_in)  # (E_out, E_in)
    db = dy.reshape(-1, e_out).sum(axis=0) if has_bias else None  # (E_out,)
    return dx, dw, db


def _split_heads(x: NDArray[np.floating], num_heads: int) -> NDArray[np.floating]:
    """``(B, T, E) -> (B, H, T, Dh)``: head h owns features ``h·Dh .. (h+1)·Dh - 1``."""
    b, t, e = x.shape
    # Split the *feature* axis (not the time axis): reshape cuts E into H consecutive groups
    # of Dh, then the head axis moves in front of T so every head is its own attention.
    return x.reshape(b, t, num_heads, e // num_heads).transpose(0, 2, 1, 3)  # (B, H, T, Dh)


def _merge_heads(x: NDArray[np.floating]) -> NDArray[np.floating]:
    """``(B, H, T, Dh) -> (B, T, H·Dh)``, the exact inverse of :func:`_split_heads`."""
    b, h, t, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * dh)  # (B, T, E)


def _validate_mha(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    params: MultiHeadParams,
    num_heads: int,
    dt: np.dtype[Any],
) -> tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating], MultiHeadParams]:
    if not isinstance(params, MultiHeadParams):
        raise TypeError(
            f"params must be a MultiHeadParams (e.g. MultiHeadParams.init(embed_dim)), got "
            f"{type(params).__name__}"
        )
    query = np.asarray(query, dtype=dt)
    key = np.asarray(key, dtype=dt)
    value = np.asarray(value, dtype=dt)
    for name, x, letters in (
        ("query", query, "B, Tq, E"),
        ("key", key, "B, Tk, Ek"),
        ("value", value, "B, Tk, Ev"),
    ):
        if x.ndim != 3:
            raise ValueError(f"{name} must have shape ({letters}), got shape {x.shape}")
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        raise ValueError(
            f"query, key and value must have the same batch size B: "
            f"shapes {query.shape}, {key.shape}, {value.shape}"
        )
    if key.shape[1] != value.shape[1]:
        raise ValueError(
            f"key and value must have the same length Tk: key has shape {key.shape}, "
            f"value has shape {value.shape}"
        )
    e = query.shape[2]
    _check_heads(e, num_heads)

    p = {
        name: None if a is None else np.asarray(a, dtype=dt) for name, a in params.as_dict().items()
    }
    for name in ("w_q", "w_k", "w_v", "w_o"):
        if p[name] is None:
            raise ValueError(f"params.{name} is required")
    expected = {
        "w_q": (e, e),
        "w_k": (e, key.shape[2]),
        "w_v": (e, value.shape[2]),
        "w_o": (e, e),
        "b_q": (e,),
        "b_k": (e,),
        "b_v": (e,),
        "b_o": (e,),
    }
    for name, shape in expected.items():
        if p[name] is not None and p[name].shape != shape:
            raise ValueError(
                f"params.{name} must have shape {shape} for query {query.shape}, key "
                f"{key.shape}, value {value.shape}; got {p[name].shape}"
            )
    return query, key, value, MultiHeadParams(**p)


def multi_head_attention_forward(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    params: MultiHeadParams,
    num_heads: int,
    *,
    mask: ArrayLike | None = None,
    causal: bool = False,
    scale: float | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[NDArray[np.floating], MultiHeadCache]:
    """Multi-head attention, as ``torch.nn.MultiheadAttention(batch_first=True)`` computes it.

    Args:
        query: ``(B, Tq, E)``.
        key: ``(B, Tk, Ek)``.
        value: ``(B, Tk, Ev)``.
        params: a :class:`MultiHeadParams` (torch.nn.Linear layout).
        num_heads: H; must divide E.
        mask: bool, broadcastable to ``(B, H, Tq, Tk)``, **True = may attend**.  A padding
            mask over keys has shape ``(B, 1, 1, Tk)``.  (torch's ``key_padding_mask`` means
            the opposite, True = ignore: pass ``~key_padding_mask[:, None, None, :]``.)
        causal: bottom-right aligned causal masking, ANDed with ``mask``.
        scale: multiplies the scores before the softmax; default ``1/sqrt(Dh)``.
        dtype: floating dtype to compute in; default float64.

    Returns:
        ``(out, cache)`` with ``out`` of shape ``(B, Tq, E)``; ``cache.weights`` holds the
        per-head attention probabilities ``(B, H, Tq, Tk)``.
    """
    dt = _float_dtype(dtype)
    query, key, value, p = _validate_mha(query, key, value, params, num_heads, dt)

    # 1) Project, each input with its own weights.  After this, queries, keys and values
    #    all live in the same E-dimensional space, whatever Ek and Ev were.
    q = _linear(query, p.w_q, p.b_q)  # (B, Tq, E)
    k = _linear(key, p.w_k, p.b_k)  # (B, Tk, E)
    v = _linear(value, p.w_v, p.b_v)  # (B, Tk, E)

    # 2) Split heads on the feature axis: each head compares queries and keys using only its
    #    own Dh features, so different heads can attend to different things.
    qh = _split_heads(q, num_heads)  # (B, H, Tq, Dh)
    kh = _split_heads(k, num_heads)  # (B, H, Tk, Dh)
    vh = _split_heads(v, num_heads)  # (B, H, Tk, Dh)

    # 3) Attend: (B, H) are simply leading dims for scaled dot-product attention.
    oh, attn = attention_forward(qh, kh, vh, mask=mask, scale=scale, causal=causal, dtype=dt)
    # oh: (B, H, Tq, Dh)

    # 4) Merge heads: put each query's H head outputs side by side again.
    context = _merge_heads(oh)  # (B, Tq, E)

    # 5) Output projection: mixes the heads' results into one E-dimensional output.
    out = _linear(context, p.w_o, p.b_o)  # (B, Tq, E)

    cache = MultiHeadCache(
        query=query,
        key=key,
        value=value,
        params=p,
        num_heads=num_heads,
        context=context,
        attention=attn,
    )
    return out, cache


def multi_head_attention_backward(
    dout: ArrayLike, cache: MultiHeadCache
) -> tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating], MultiHeadParams]:
    """Gradients of multi-head attention, the five forward steps undone in reverse order.

    Args:
        dout: ``(B, Tq, E)`` gradient of the loss with respect to the forward's ``out``.
        cache: what :func:`multi_head_attention_forward` returned.

    Returns:
        ``(dquery (B, Tq, E), dkey (B, Tk, Ek), dvalue (B, Tk, Ev), grads)`` where ``grads`` is
        a :class:`MultiHeadParams` of parameter gradients (None where the bias is None).
        For self-attention (the same array passed as query, key and value) the gradient of
        that array is ``dquery + dkey + dvalue``.
    """
    if not isinstance(cache, MultiHeadCache):
        raise TypeError(
            f"cache must be the MultiHeadCache returned by multi_head_attention_forward, got "
            f"{type(cache).__name__}"
        )
    p, h = cache.params, cache.num_heads
    dout = np.asarray(dout, dtype=cache.context.dtype)
    if dout.shape != cache.context.shape:
        raise ValueError(
            f"dout must have the shape of out, (B, Tq, E) = {cache.context.shape}; got {dout.shape}"
        )

    # 5) Output projection.
    dcontext, dw_o, db_o = _linear_backward(dout, cache.context, p.w_o, p.b_o is not None)
    # dcontext: (B, Tq, E)

    # 4) Merging heads was a pure rearrangement; its backward is the inverse rearrangement.
    doh = _split_heads(dcontext, h)  # (B, H, Tq, Dh)

    # 3) Attention, per head.
    dqh, dkh, dvh = attention_backward(doh, cache.attention)  # (B, H, T*, Dh)

    # 2) Splitting heads was a rearrangement too: merge the gradients back.
    dq = _merge_heads(dqh)  # (B, Tq, E)
    dk = _merge_heads(dkh)  # (B, Tk, E)
    dv = _merge_heads(dvh)  # (B, Tk, E)

    # 1) The three input projections.
    dquery, dw_q, db_q = _linear_backward(dq, cache.query, p.w_q, p.b_q is not None)
    dkey, dw_k, db_k = _linear_backward(dk, cache.key, p.w_k, p.b_k is not None)
    dvalue, dw_v, db_v = _linear_backward(dv, cache.value, p.w_v, p.b_v is not None)
    # dquery: (B, Tq, E), dkey: (B, Tk, Ek), dvalue: (B, Tk, Ev)
    # (db_k comes out as 0 up to rounding, and that is right: b_k adds the same q·b_k to all
    # the scores of a query's row, and a softmax does not change when its row is shifted.)

    grads = MultiHeadParams(
        w_q=dw_q, b_q=db_q, w_k=dw_k, b_k=db_k, w_v=dw_v, b_v=db_v, w_o=dw_o, b_o=db_o
    )
    return dquery, dkey, dvalue, grads
