"""Scaled dot-product attention in NumPy: the forward pass and a backward pass derived by hand.

Legend of the dimension letters used in the shape comments of this file:

    ...  leading dimensions (batch B, heads H, ...); q, k and v broadcast against each other
    Tq   number of queries
    Tk   number of keys, which is also the number of values
    D    head dim of queries and keys (they are compared with a dot product, so it must match)
    Dv   head dim of values, and therefore of the output

For one (batch, head) slice the whole computation is three lines:

    S = scale · Q Kᵀ           (Tq, Tk)   how well each query matches each key
    P = softmax_rows(S)        (Tq, Tk)   each query's probability distribution over keys
    O = P V                    (Tq, Dv)   each query's weighted average of the values

A mask removes entries of S before the softmax: a removed entry gets probability exactly 0,
as if that key did not exist for that query.  A query that may attend to nothing has no
distribution at all; we define its output (and its weights, and its gradients) to be 0.

This file is the reference the rest of the library is tested against, so it favours
obviousness over speed: it materialises the full (Tq, Tk) matrix and works in float64.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .softmax import log_sum_exp, softmax

__all__ = ["AttentionCache", "attention_backward", "attention_forward", "causal_mask"]


@dataclass(frozen=True)
class AttentionCache:
    """Everything :func:`attention_backward` needs, saved by :func:`attention_forward`.

    Attributes:
        q: ``(..., Tq, D)`` the queries, as given (after the dtype conversion).
        k: ``(..., Tk, D)`` the keys, as given.
        v: ``(..., Tk, Dv)`` the values, as given.
        scale: the factor the scores were multiplied by, before the softmax.
        weights: ``(..., Tq, Tk)`` the attention probabilities P (0 where not allowed).
        allowed: ``(..., Tq, Tk)`` bool, True = may attend (mask AND causal), or None when
            every query may attend to every key.
        lse: ``(..., Tq)`` the natural log of each row's softmax denominator,
            ``log(sum_j exp(S_ij))`` over the allowed j; ``-inf`` for a row that sees nothing.

    Fields can also be read like a dict, ``cache["weights"]``, for code that prefers that.
    """

    q: NDArray[np.floating]
    k: NDArray[np.floating]
    v: NDArray[np.floating]
    scale: float
    weights: NDArray[np.floating]
    allowed: NDArray[np.bool_] | None
    lse: NDArray[np.floating]

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


def causal_mask(tq: int, tk: int) -> NDArray[np.bool_]:
    """The ``(Tq, Tk)`` bool mask of causal attention, **bottom-right aligned**.

    Query i may attend to key j when ``j <= i + (Tk - Tq)``.  Think of the Tq queries as the
    *last* Tq positions of a sequence whose Tk keys cover the whole sequence (decoding with a
    cache of past keys): the last query lines up with the last key. ``x`` = may attend::

        Tq = Tk = 4            Tq = 2, Tk = 4          Tq = 4, Tk = 2
           k0 k1 k2 k3            k0 k1 k2 k3             k0 k1
        q0  x  .  .  .         q0  x  x  x  .          q0  .  .   <- sees nothing
        q1  x  x  .  .         q1  x  x  x  x          q1  .  .   <- sees nothing
        q2  x  x  x  .                                 q2  x  .
        q3  x  x  x  x                                 q3  x  x

    With Tq = 1 the single query sees every key.  With Tq > Tk the first ``Tq - Tk`` queries
    see nothing at all (their output is defined to be 0).
    """
    for name, size in (("tq", tq), ("tk", tk)):
        if isinstance(size, (bool, np.bool_)) or not isinstance(size, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(size).__name__} {size!r}")
        if size < 0:
            raise ValueError(f"{name} must be >= 0, got {size}")
    i = np.arange(tq)[:, None]  # (Tq, 1)
    j = np.arange(tk)[None, :]  # (1, Tk)
    return j <= i + (tk - tq)  # (Tq, Tk)


def _check_causal(causal: bool) -> bool:
    """A real bool: ``causal="no"`` is truthy and would silently apply the causal mask."""
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    return bool(causal)


def _float_dtype(dtype: DTypeLike | None) -> np.dtype[Any]:
    """float64 unless the caller explicitly asks for another floating dtype."""
    dt = np.dtype(np.float64 if dtype is None else dtype)
    if not np.issubdtype(dt, np.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dt}")
    return dt


@dataclass(frozen=True)
class _Inputs:
    """Validated inputs shared by the plain and the blocked implementations."""

    q: NDArray[np.floating]  # (..., Tq, D)
    k: NDArray[np.floating]  # (..., Tk, D)
    v: NDArray[np.floating]  # (..., Tk, Dv)
    mask: NDArray[np.bool_] | None  # broadcastable to (..., Tq, Tk)
    scale: float
    lead: tuple[int, ...]  # the broadcast leading dims "..."

    @property
    def scores_shape(self) -> tuple[int, ...]:
        return (*self.lead, self.q.shape[-2], self.k.shape[-2])  # (..., Tq, Tk)


def _validate(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    mask: ArrayLike | None,
    scale: float | None,
    dtype: DTypeLike | None,
) -> _Inputs:
    """Convert and check the arguments of an attention call; raise early with clear messages."""
    dt = _float_dtype(dtype)
    q = np.asarray(q, dtype=dt)
    k = np.asarray(k, dtype=dt)
    v = np.asarray(v, dtype=dt)
    for name, x, letters in (("q", q, "Tq, D"), ("k", k, "Tk, D"), ("v", v, "Tk, Dv")):
        if x.ndim < 2:
            raise ValueError(f"{name} must have shape (..., {letters}), got shape {x.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head dim D (last axis): "
            f"q has shape {q.shape}, k has shape {k.shape}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same length Tk (second-to-last axis): "
            f"k has shape {k.shape}, v has shape {v.shape}"
        )
    try:
        lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(
            f"the leading dims of q, k and v do not broadcast: "
            f"q has shape {q.shape}, k has shape {k.shape}, v has shape {v.shape}"
        ) from None

    if scale is None:
        if q.shape[-1] == 0:
            raise ValueError(f"the default scale 1/sqrt(D) needs D > 0; q has shape {q.shape}")
        # 1/sqrt(D) keeps the scores' variance near 1 when q and k have unit-variance entries:
        # a dot product of D such terms has variance D.  Without it a large D would push the
        # softmax into saturation, where it is nearly one-hot and its gradients vanish.
        scale = 1.0 / math.sqrt(q.shape[-1])
    else:
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale}")

    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(
                f"mask must be a bool array (True = may attend), got dtype {mask.dtype}"
            )
        scores_shape = (*lead, q.shape[-2], k.shape[-2])  # (..., Tq, Tk)
        try:
            fits = np.broadcast_shapes(mask.shape, scores_shape) == scores_shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"mask of shape {mask.shape} cannot be broadcast to the scores' shape "
                f"{scores_shape} = (..., Tq, Tk) given by q {q.shape} and k {k.shape}"
            )
    return _Inputs(q=q, k=k, v=v, mask=mask, scale=scale, lead=lead)


def _allowed(
    mask: NDArray[np.bool_] | None, causal: bool, tq: int, tk: int
) -> NDArray[np.bool_] | None:
    """Combine the user's mask and the causal rule with AND; None means "all allowed"."""
    allowed = causal_mask(tq, tk) if causal else None  # (Tq, Tk)
    if mask is not None:
        allowed = mask if allowed is None else mask & allowed  # (..., Tq, Tk)
    return allowed


def _sum_to_shape(grad: NDArray[np.floating], shape: tuple[int, ...]) -> NDArray[np.floating]:
    """Undo broadcasting: sum ``grad`` down to ``shape``.

    If an input was broadcast (a leading dim it lacked, or a length-1 dim stretched), it was
    *reused* by every slice along that dim, so its gradient is the sum of the slices'.
    """
    extra = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(extra)))  # drop the dims the input did not have
    stretched = tuple(a for a, n in enumerate(shape) if n == 1 and grad.shape[a] != 1)
    return grad.sum(axis=stretched, keepdims=True)  # (shape)


def attention_forward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    mask: ArrayLike | None = None,
    scale: float | None = None,
    causal: bool = False,
    *,
    dtype: DTypeLike | None = None,
) -> tuple[NDArray[np.floating], AttentionCache]:
    """Scaled dot-product attention, ``softmax(scale · Q Kᵀ, masked) V``.

    Args:
        q: ``(..., Tq, D)`` queries.
        k: ``(..., Tk, D)`` keys.
        v: ``(..., Tk, Dv)`` values.  The leading dims of q, k, v must broadcast together.
        mask: optional bool array broadcastable to ``(..., Tq, Tk)``; **True = may attend**.
        scale: multiplies the scores before the softmax; default ``1/sqrt(D)``.
        causal: if True, query i may only attend to keys ``j <= i + Tk - Tq``, combined with
            ``mask`` by AND.  Bottom-right aligned (the last query sees the last key); for
            Tq = 3, Tk = 5 (``x`` = may attend, more in :func:`causal_mask`)::

                   k0 k1 k2 k3 k4
                q0  x  x  x  .  .
                q1  x  x  x  x  .
                q2  x  x  x  x  x
        dtype: floating dtype to compute in; default float64.

    Returns:
        ``(out, cache)``: ``out`` of shape ``(..., Tq, Dv)``, and an :class:`AttentionCache`
        holding the weights ``(..., Tq, Tk)`` and log-sum-exp ``(..., Tq)`` among others.
        A query that may attend to nothing gets output 0, weights 0 and lse ``-inf``.

    Raises:
        TypeError: ``mask`` is not a bool array, ``causal`` is not a bool.
        ValueError: inconsistent shapes, a mask that does not broadcast, a non-finite scale.
    """
    x = _validate(q, k, v, mask, scale, dtype)
    causal = _check_causal(causal)
    tq, tk = x.q.shape[-2], x.k.shape[-2]

    # Similarity of every query with every key.  The scale is applied to the scores, before
    # the softmax (scaling the probabilities afterwards would be a different function).
    scores = (x.q @ x.k.swapaxes(-1, -2)) * x.scale  # (..., Tq, Tk)

    allowed = _allowed(x.mask, causal, tq, tk)  # (..., Tq, Tk) or None
    if allowed is not None:
        allowed = np.broadcast_to(allowed, scores.shape)  # (..., Tq, Tk), a read-only view

    # Per-row stable softmax over the allowed keys; an empty row gets all-zero weights.
    weights = softmax(scores, axis=-1, where=allowed)  # (..., Tq, Tk)
    # Its log-denominator: the one number per row that lets a later pass rebuild the row's
    # probabilities from the scores alone, P = exp(S - lse) (the blocked backward does so).
    lse = log_sum_exp(scores, axis=-1, where=allowed)  # (..., Tq)

    # Each query's output is the average of the values, weighted by its probabilities.
    out = weights @ x.v  # (..., Tq, Dv)

    cache = AttentionCache(
        q=x.q, k=x.k, v=x.v, scale=x.scale, weights=weights, allowed=allowed, lse=lse
    )
    return out, cache


def attention_backward(
    dout: ArrayLike, cache: AttentionCache
) -> tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]]:
    """Gradients of a scalar loss with respect to q, k and v, given ``dout = dLoss/dout``.

    Args:
        dout: ``(..., Tq, Dv)``, the gradient of the loss with respect to ``out``.
        cache: what :func:`attention_forward` returned alongside ``out``.

    Returns:
        ``(dq, dk, dv)`` with the shapes of q ``(..., Tq, D)``, k ``(..., Tk, D)`` and
        v ``(..., Tk, Dv)`` as they were passed in (broadcast dims are summed back).
        Rows of dq for queries that saw nothing are exactly 0, as are the rows of dk and dv
        for keys that no query saw.
    """
    if not isinstance(cache, AttentionCache):
        raise TypeError(
            f"cache must be the AttentionCache returned by attention_forward, got "
            f"{type(cache).__name__}"
        )
    q, k, v, scale, p = cache.q, cache.k, cache.v, cache.scale, cache.weights
    dout = np.asarray(dout, dtype=p.dtype)
    expected = (*p.shape[:-1], v.shape[-1])  # (..., Tq, Dv), the shape of out
    if dout.shape != expected:
        raise ValueError(f"dout must have the shape of out, {expected}; got {dout.shape}")

    # Step 3 backwards, O = P V.  A matrix product Y = A B has dA = dY Bᵀ and dB = Aᵀ dY.
    dv = p.swapaxes(-1, -2) @ dout  # (..., Tk, Dv)
    dp = dout @ v.swapaxes(-1, -2)  # (..., Tq, Tk)

    # Step 2 backwards, P = softmax(S), one row at a time.  For a row p = softmax(s):
    #     dp_i/ds_j = p_i (δ_ij - p_j),   i.e. the Jacobian is  J = diag(p) - p pᵀ.
    # J is symmetric, so  ds = Jᵀ dp = p ⊙ dp - p (pᵀ dp) = p ⊙ (dp - <dp, p>):
    # every entry is pushed by its own upstream gradient minus the row's p-weighted mean.
    # Masked entries: their p is 0, so their ds is 0 (the mask is a constant and the masked
    # scores never reached the output), and the restriction of J to the allowed entries is
    # exactly what this full-row formula computes.  A row that saw nothing is all-zero.
    row_dot = np.sum(dp * p, axis=-1, keepdims=True)  # (..., Tq, 1)
    ds = p * (dp - row_dot)  # (..., Tq, Tk)

    # Step 1 backwards, S = scale · Q Kᵀ.
    dq = scale * (ds @ k)  # (..., Tq, D)
    dk = scale * (ds.swapaxes(-1, -2) @ q)  # (..., Tk, D)

    return _sum_to_shape(dq, q.shape), _sum_to_shape(dk, k.shape), _sum_to_shape(dv, v.shape)
