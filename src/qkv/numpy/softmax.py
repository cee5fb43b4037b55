"""A softmax that survives real inputs: stable per row, and honest about empty rows.

Legend of the dimension letters used in the shape comments of this file:

    ...  any leading dimensions (batch, heads, ...), untouched
    N    the length of the axis being normalised (``axis``; the last one in every example)

Why "stable"?  ``exp`` overflows float64 above about 709 and underflows to 0 below about
-745, so ``exp(x) / sum(exp(x))`` fails on scores that are merely large.  Softmax does not
change when the same constant is subtracted from every entry of a row, so we subtract the
row's maximum first: the largest exponent becomes exp(0) = 1, nothing overflows, and the
sum is at least 1, so nothing divides by zero.  Entries far below the maximum still
underflow to exactly 0, which is the right answer for a negligible probability (numpy does
not warn about underflow unless asked to).

Why "per row"?  The constant must be *each row's own* maximum.  Subtracting one global
maximum for the whole array is just as legal algebraically, but a row whose scores all lie
far (more than ~745) below the global maximum would underflow to all zeros and then divide
0 by 0.  Every row is a separate probability distribution, so every row gets its own shift.

Why "where"?  Attention masks forbid some entries.  A forbidden entry gets probability 0
and does not take part in the maximum or the sum.  A row with *no* allowed entry is not a
distribution at all; we return zeros for it (and ``-inf`` for its log-sum-exp, the log of
an empty sum), without dividing 0 by 0 and without a single numpy warning.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["log_sum_exp", "softmax"]


def _row_shift(
    x: NDArray[np.floating], axis: int, where: NDArray[np.bool_] | None
) -> NDArray[np.floating]:
    """Each row's maximum over its allowed entries, kept as a length-1 ``axis``.

    An empty row has maximum ``-inf`` (that is what ``initial=-inf`` gives an empty
    reduction).  We shift such a row by 0 instead: subtracting ``-inf`` would turn its
    ``-inf`` entries into ``-inf - -inf = nan``, whereas subtracting 0 keeps them at ``-inf``
    and ``exp(-inf) = 0`` quietly.
    """
    # (numpy's own "everything allowed" is where=True; where=None would mean "nothing".)
    allowed = True if where is None else where
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf, where=allowed)  # (..., 1)
    return np.where(m == -np.inf, 0.0, m).astype(x.dtype, copy=False)  # (..., 1)


def _exp_shifted(
    x: NDArray[np.floating], shift: NDArray[np.floating], where: NDArray[np.bool_] | None
) -> NDArray[np.floating]:
    """``exp(x - shift)`` on allowed entries, exactly 0 on forbidden ones."""
    if where is None:
        return np.exp(x - shift)  # (..., N)
    # Forbidden entries may hold anything (even garbage); never let them reach exp.
    return np.exp(np.where(where, x - shift, -np.inf))  # (..., N)


def _prepare(
    x: ArrayLike, where: ArrayLike | None
) -> tuple[NDArray[np.floating], NDArray[np.bool_] | None]:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        # Integers (and bools) are promoted to float64, the library's default precision.
        x = x.astype(np.float64)
    if where is None:
        return x, None
    w = np.asarray(where)
    if w.dtype != np.bool_:
        raise TypeError(f"where must be a bool array (True = allowed), got dtype {w.dtype}")
    try:
        w = np.broadcast_to(w, x.shape)  # (..., N), a view: no copy
    except ValueError:
        raise ValueError(
            f"where of shape {w.shape} cannot be broadcast to x of shape {x.shape}"
        ) from None
    return x, w


def softmax(x: ArrayLike, axis: int = -1, where: ArrayLike | None = None) -> NDArray[np.floating]:
    """Numerically stable softmax of ``x`` along ``axis``.

    Args:
        x: scores, shape ``(..., N)`` (any axis may play the role of N).
        axis: the axis to normalise over.
        where: optional bool array broadcastable to ``x.shape``; True = the entry takes part.
            Forbidden entries get probability exactly 0.

    Returns:
        Probabilities with the shape of ``x``.  Each row sums to 1, except rows with no
        allowed entry, which are all zeros.
    """
    x, where = _prepare(x, where)
    shift = _row_shift(x, axis, where)  # (..., 1)
    e = _exp_shifted(x, shift, where)  # (..., N), every entry in [0, 1]
    total = np.sum(e, axis=axis, keepdims=True)  # (..., 1), >= 1 for non-empty rows, else 0
    # An empty row has total 0: leave it at 0 instead of computing 0 / 0.  (Test "!= 0", not
    # "> 0": a NaN that crept into the input must come out as NaN, not as a quiet row of 0s.)
    return np.divide(e, total, out=np.zeros_like(e), where=total != 0)  # (..., N)


def log_sum_exp(
    x: ArrayLike, axis: int = -1, where: ArrayLike | None = None
) -> NDArray[np.floating]:
    """Numerically stable ``log(sum(exp(x)))`` along ``axis`` (natural log).

    Uses ``lse = m + log(sum(exp(x - m)))`` with ``m`` the row's own maximum, so the sum lies in
    ``[1, N]`` and its log can neither overflow nor hit ``log(0)``.

    Args:
        x: scores, shape ``(..., N)``.
        axis: the axis to reduce.
        where: optional bool array broadcastable to ``x.shape``; True = the entry takes part.

    Returns:
        Shape of ``x`` without ``axis``: ``(...)``.  ``-inf`` for a row with no allowed entry
        (the log of an empty sum), computed without a divide-by-zero warning.
    """
    x, where = _prepare(x, where)
    shift = _row_shift(x, axis, where)  # (..., 1)
    total = np.sum(_exp_shifted(x, shift, where), axis=axis, keepdims=True)  # (..., 1)
    log_total = np.log(total, out=np.full_like(total, -np.inf), where=total != 0)  # (..., 1)
    return np.squeeze(shift + log_total, axis=axis)  # (...)
