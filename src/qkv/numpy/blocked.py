"""FlashAttention's algorithm, written out in NumPy: attention one tile at a time.

Legend of the dimension letters used in the shape comments of this file:

    ...  leading dimensions (batch B, heads H, ...); q, k and v broadcast against each other
    Tq   number of queries;   bq = the rows of the current query block (<= block_q)
    Tk   number of keys;      bk = the rows of the current key block (<= block_k)
    D    head dim of queries and keys
    Dv   head dim of values and of the output

The plain implementation (``attention.py``) builds the whole (Tq, Tk) score matrix.  For long
sequences that matrix is what runs out of memory, and on a GPU it is what makes attention
slow: it is written to and read back from slow memory several times.  FlashAttention never
builds it.  It walks over tiles ``(query block) × (key block)`` that fit in fast memory, and
uses two facts:

1. **Online softmax (forward).**  The softmax of a row can be computed in one pass over its
   pieces.  Keep, per query row, the running maximum ``m`` of the scores seen so far, the
   running sum ``l = Σ exp(s - m)`` and the running unnormalised output
   ``acc = Σ exp(s - m) v``.  When a new tile raises the maximum from ``m_old`` to
   ``m_new``, everything accumulated so far was measured against the wrong reference;
   multiplying ``l`` and ``acc`` by ``exp(m_old - m_new)`` (<= 1, so it cannot overflow)
   re-expresses them against ``m_new``.  At the end ``out = acc / l`` and
   ``lse = m + log(l)``.  The result equals the plain softmax exactly, up to rounding.

2. **Recomputation (backward).**  Instead of storing the (Tq, Tk) probabilities, the forward
   stores one number per row, ``lse``.  The backward recomputes each tile's probabilities as
   ``P = exp(S - lse)`` from the tile's scores, which is cheap compared with storing them.

The results match ``attention_forward``/``attention_backward`` to ~1e-15 relative error; the
loops are written for reading, not for speed.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .attention import _check_causal, _sum_to_shape, _validate

__all__ = ["blocked_attention_backward", "blocked_attention_forward"]


def _check_block(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _last_key_end(q_end: int, tq: int, tk: int, causal: bool) -> int:
    """One past the last key any query in rows ``[.., q_end)`` may see.

    Under the causal rule query i sees keys ``j <= i + (Tk - Tq)``; the block's last row,
    ``q_end - 1``, sees furthest.  Key blocks starting at or after this index are entirely
    hidden from the whole query block, so the forward never even computes their scores.
    """
    if not causal:
        return tk
    return min(tk, max(0, q_end + tk - tq))


def _first_query_block(k_start: int, tq: int, tk: int, causal: bool, block_q: int) -> int:
    """Start of the first query block that may see key ``k_start`` (and so its key block).

    Query i sees key ``k_start`` when ``i >= k_start - (Tk - Tq)``; query blocks that end
    before that row only hold queries for which the whole key block is in the future.
    """
    if not causal:
        return 0
    first_row = max(0, k_start - (tk - tq))
    return (first_row // block_q) * block_q


def _tile_allowed(
    mask: NDArray[np.bool_] | None,
    causal: bool,
    rows: slice,
    cols: slice,
    tq: int,
    tk: int,
) -> NDArray[np.bool_] | None:
    """The allowed-mask restricted to one tile, ``(..., bq, bk)``, or None if all allowed.

    Only this tile's piece of the causal pattern is built, never the full (Tq, Tk) one.  The
    user's mask is sliced from a broadcast *view*, so slicing it does not copy the mask.
    """
    allowed = None
    if causal:
        i = np.arange(rows.start, rows.stop)[:, None]  # (bq, 1) global query indices
        j = np.arange(cols.start, cols.stop)[None, :]  # (1, bk) global key indices
        allowed = j <= i + (tk - tq)  # (bq, bk), same rule as causal_mask
    if mask is not None:
        tile = mask[..., rows, cols]  # (..., bq, bk)
        allowed = tile if allowed is None else tile & allowed  # (..., bq, bk)
    return allowed


def blocked_attention_forward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    mask: ArrayLike | None = None,
    scale: float | None = None,
    causal: bool = False,
    *,
    block_q: int = 64,
    block_k: int = 64,
    dtype: DTypeLike | None = None,
) -> tuple[NDArray[np.floating], NDArray[np.floating]]:
    """Attention computed tile by tile with the online softmax (FlashAttention's forward).

    Same arguments and same semantics as :func:`qkv.numpy.attention_forward` (mask True = may
    attend, default scale ``1/sqrt(D)``, bottom-right aligned ``causal``), plus the tile sizes.
    At no point is more than a ``(..., block_q, block_k)`` piece of the score matrix held.

    Returns:
        ``(out, lse)``: ``out`` of shape ``(..., Tq, Dv)`` and the per-row log-sum-exp of the
        scaled scores ``lse`` of shape ``(..., Tq)``.  A query that sees nothing gets output 0
        and lse ``-inf``.
    """
    x = _validate(q, k, v, mask, scale, dtype)
    causal = _check_causal(causal)
    block_q, block_k = _check_block(block_q, "block_q"), _check_block(block_k, "block_k")
    tq, tk, dv = x.q.shape[-2], x.k.shape[-2], x.v.shape[-1]
    dt = x.q.dtype

    # Broadcast views (no copies) so that every block can be sliced the same way.
    qb = np.broadcast_to(x.q, (*x.lead, *x.q.shape[-2:]))  # (..., Tq, D)
    kb = np.broadcast_to(x.k, (*x.lead, *x.k.shape[-2:]))  # (..., Tk, D)
    vb = np.broadcast_to(x.v, (*x.lead, *x.v.shape[-2:]))  # (..., Tk, Dv)
    mask_b = None if x.mask is None else np.broadcast_to(x.mask, x.scores_shape)

    out = np.zeros((*x.lead, tq, dv), dtype=dt)  # (..., Tq, Dv)
    lse = np.full((*x.lead, tq), -np.inf, dtype=dt)  # (..., Tq)

    for q0 in range(0, tq, block_q):
        rows = slice(q0, min(q0 + block_q, tq))
        bq = rows.stop - rows.start
        q_blk = qb[..., rows, :]  # (..., bq, D)

        # Running statistics of each query row, over the key blocks visited so far.
        m = np.full((*x.lead, bq, 1), -np.inf, dtype=dt)  # (..., bq, 1) max score
        l = np.zeros((*x.lead, bq, 1), dtype=dt)  # (..., bq, 1) Σ exp(s - m)
        acc = np.zeros((*x.lead, bq, dv), dtype=dt)  # (..., bq, Dv) Σ exp(s - m) v

        # Under causal masking, key blocks past the diagonal are skipped outright: this is
        # where causal attention saves about half of the work.
        for k0 in range(0, _last_key_end(rows.stop, tq, tk, causal), block_k):
            cols = slice(k0, min(k0 + block_k, tk))
            allowed = _tile_allowed(mask_b, causal, rows, cols, tq, tk)  # (..., bq, bk)
            if allowed is not None and not allowed.any():
                continue  # the user's mask hides this whole tile: nothing to add

            s = (q_blk @ kb[..., cols, :].swapaxes(-1, -2)) * x.scale  # (..., bq, bk)
            if allowed is not None:
                s = np.where(allowed, s, -np.inf)  # (..., bq, bk); exp(-inf) = 0 below

            m_new = np.maximum(m, s.max(axis=-1, keepdims=True))  # (..., bq, 1)
            # A row that has seen no allowed key yet still has m_new = -inf.  Shifting it by
            # 0 instead keeps its exponents at exp(-inf) = 0 rather than exp(nan).
            shift = np.where(m_new == -np.inf, 0.0, m_new)  # (..., bq, 1)
            p = np.exp(s - shift)  # (..., bq, bk), entries in [0, 1]
            # Re-express the old statistics relative to the new maximum: exp(m_old - m_new)
            # is <= 1, and it is 0 for a row whose old max was -inf (its l and acc are 0).
            alpha = np.exp(m - shift)  # (..., bq, 1)
            l = alpha * l + p.sum(axis=-1, keepdims=True)  # (..., bq, 1)
            acc = alpha * acc + p @ vb[..., cols, :]  # (..., bq, Dv)
            m = m_new

        # Normalise once per row, at the end.  l == 0 exactly when the row saw no key (and a
        # NaN in the inputs makes l NaN, which "!= 0" lets through to the output, as it should).
        seen = l != 0  # (..., bq, 1)
        out[..., rows, :] = np.divide(acc, l, out=np.zeros_like(acc), where=seen)
        log_l = np.log(l, out=np.full_like(l, -np.inf), where=seen)  # (..., bq, 1)
        lse[..., rows] = np.where(seen, m + log_l, -np.inf)[..., 0]  # (..., bq)

    return out, lse


def blocked_attention_backward(
    dout: ArrayLike,
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    out: ArrayLike,
    lse: ArrayLike,
    mask: ArrayLike | None = None,
    scale: float | None = None,
    causal: bool = False,
    *,
    block_q: int = 64,
    block_k: int = 64,
    dtype: DTypeLike | None = None,
) -> tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]]:
    """Gradients of attention, tile by tile, from ``out`` and ``lse`` alone (no stored P).

    Args:
        dout: ``(..., Tq, Dv)`` gradient of the loss with respect to ``out``.
        q, k, v, mask, scale, causal: exactly as passed to :func:`blocked_attention_forward`.
        out: ``(..., Tq, Dv)`` and lse: ``(..., Tq)``, what that forward returned.
        block_q, block_k: tile sizes (need not match the forward's).

    Returns:
        ``(dq, dk, dv)`` with the shapes of q, k and v as passed in.

    The per-tile formulas are those of :func:`qkv.numpy.attention_backward`,
    ``dS = P ⊙ (dP - rowsum(dP ⊙ P))``, with two substitutions that make tiles independent:

    * ``P = exp(S - lse)``: the forward's probabilities, rebuilt from the tile's scores.
    * ``rowsum(dP ⊙ P) = rowsum(dO ⊙ O)``.  The left side needs a whole row of P, i.e. every
      key block, before any tile's dS could be formed.  But ``dP = dO Vᵀ``, so
      ``Σ_j P_ij dP_ij = Σ_j P_ij Σ_c dO_ic V_jc = Σ_c dO_ic (Σ_j P_ij V_jc) = Σ_c dO_ic O_ic``:
      one number per query row, computed up front from ``dO`` and ``O`` (``Tq × Dv``).
    """
    x = _validate(q, k, v, mask, scale, dtype)
    causal = _check_causal(causal)
    block_q, block_k = _check_block(block_q, "block_q"), _check_block(block_k, "block_k")
    tq, tk, d, dv = x.q.shape[-2], x.k.shape[-2], x.q.shape[-1], x.v.shape[-1]
    dt = x.q.dtype

    out_shape = (*x.lead, tq, dv)  # (..., Tq, Dv)
    dout = np.asarray(dout, dtype=dt)
    out = np.asarray(out, dtype=dt)
    lse = np.asarray(lse, dtype=dt)
    for name, arr, want in (("dout", dout, out_shape), ("out", out, out_shape)):
        if arr.shape != want:
            raise ValueError(f"{name} must have shape (..., Tq, Dv) = {want}, got {arr.shape}")
    if lse.shape != out_shape[:-1]:
        raise ValueError(f"lse must have shape (..., Tq) = {out_shape[:-1]}, got {lse.shape}")

    qb = np.broadcast_to(x.q, (*x.lead, tq, d))  # (..., Tq, D)
    kb = np.broadcast_to(x.k, (*x.lead, tk, d))  # (..., Tk, D)
    vb = np.broadcast_to(x.v, (*x.lead, tk, dv))  # (..., Tk, Dv)
    mask_b = None if x.mask is None else np.broadcast_to(x.mask, x.scores_shape)

    # D_i = rowsum(dO ⊙ O), standing in for rowsum(dP ⊙ P) (see the docstring).
    delta = np.sum(dout * out, axis=-1)[..., None]  # (..., Tq, 1)
    # A row that saw nothing has lse = -inf and must get P = 0.  Using +inf in its place
    # makes exp(S - lse) = exp(-inf) = 0 with no special case (and no inf - inf).
    lse_safe = np.where(lse == -np.inf, np.inf, lse)[..., None]  # (..., Tq, 1)

    dq = np.zeros((*x.lead, tq, d), dtype=dt)  # (..., Tq, D)
    dk = np.zeros((*x.lead, tk, d), dtype=dt)  # (..., Tk, D)
    dvv = np.zeros((*x.lead, tk, dv), dtype=dt)  # (..., Tk, Dv)

    # Outer loop over key blocks, as in FlashAttention-2: each key block's dK and dV
    # accumulate over the query blocks in a local buffer, while dQ receives a contribution
    # from every key block (on a GPU that last sum is where atomics or a second pass come in).
    for k0 in range(0, tk, block_k):
        cols = slice(k0, min(k0 + block_k, tk))
        k_blk = kb[..., cols, :]  # (..., bk, D)
        v_blk = vb[..., cols, :]  # (..., bk, Dv)
        dk_blk = np.zeros(k_blk.shape, dtype=dt)  # (..., bk, D)
        dv_blk = np.zeros(v_blk.shape, dtype=dt)  # (..., bk, Dv)

        # Causal: query blocks that lie entirely before this key block cannot see it.
        for q0 in range(_first_query_block(k0, tq, tk, causal, block_q), tq, block_q):
            rows = slice(q0, min(q0 + block_q, tq))
            allowed = _tile_allowed(mask_b, causal, rows, cols, tq, tk)  # (..., bq, bk)
            if allowed is not None and not allowed.any():
                continue  # all probabilities of this tile are 0: it contributes nothing
            q_blk = qb[..., rows, :]  # (..., bq, D)
            do_blk = dout[..., rows, :]  # (..., bq, Dv)

            s = (q_blk @ k_blk.swapaxes(-1, -2)) * x.scale  # (..., bq, bk)
            if allowed is not None:
                s = np.where(allowed, s, -np.inf)  # (..., bq, bk)
            p = np.exp(s - lse_safe[..., rows, :])  # (..., bq, bk), the forward's P tile

            dv_blk += p.swapaxes(-1, -2) @ do_blk  # (..., bk, Dv)
            dp = do_blk @ v_blk.swapaxes(-1, -2)  # (..., bq, bk)
            ds = p * (dp - delta[..., rows, :])  # (..., bq, bk)
            dq[..., rows, :] += x.scale * (ds @ k_blk)  # (..., bq, D)
            dk_blk += x.scale * (ds.swapaxes(-1, -2) @ q_blk)  # (..., bk, D)

        dk[..., cols, :] = dk_blk
        dvv[..., cols, :] = dv_blk

    return (
        _sum_to_shape(dq, x.q.shape),
        _sum_to_shape(dk, x.k.shape),
        _sum_to_shape(dvv, x.v.shape),
    )
