"""Checking a hand-written gradient against finite differences.

Legend of the dimension letters used in the shape comments of this file:

    ...  the shape of the array x being differentiated (any shape)

A derivative is a limit, ``f'(x) = lim (f(x + h) - f(x - h)) / 2h``; with a small but finite h
it becomes a computable estimate.  The central difference used here has error ``O(h²)``
(the ``h``-terms of the two Taylor expansions cancel), against ``O(h)`` for the one-sided
``(f(x + h) - f(x)) / h``.  h cannot be made arbitrarily small, though: f is only known to
about ``1e-16 · |f|``, and that rounding is divided by h.  ``h = 1e-6`` balances the two for
smooth functions of moderate size in float64 (truncation ~1e-12, rounding ~1e-10).

The estimate costs two evaluations of f per element of x, so it is for small test cases only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["check_gradient", "numerical_gradient"]


def _scalar(value: ArrayLike) -> float:
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"f must return a scalar, got an array of shape {arr.shape}")
    return float(arr.reshape(()))


def numerical_gradient(
    f: Callable[[NDArray[np.float64]], ArrayLike], x: ArrayLike, eps: float = 1e-6
) -> NDArray[np.float64]:
    """Central-difference estimate of the gradient of a scalar function ``f`` at ``x``.

    Args:
        f: maps an array shaped like ``x`` to a scalar.  It is called with a private float64
            copy of ``x`` that is modified in place between calls, so it must not keep it.
        x: the point, any shape ``(...)``.
        eps: the step h.

    Returns:
        float64 array of the shape of ``x``: ``(f(x + h e_i) - f(x - h e_i)) / 2h`` for
        every element i.
    """
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    x = np.array(x, dtype=np.float64)  # (...), a private, contiguous copy we may poke at
    grad = np.zeros_like(x)  # (...)
    flat_x = x.reshape(-1)  # (x.size,), a view: writing here writes into x
    flat_g = grad.reshape(-1)  # (x.size,), a view
    for i in range(flat_x.size):
        original = flat_x[i]
        x_plus, x_minus = original + eps, original - eps
        flat_x[i] = x_plus
        f_plus = _scalar(f(x))
        flat_x[i] = x_minus
        f_minus = _scalar(f(x))
        flat_x[i] = original
        # Divide by the step actually taken: (x + h) - (x - h) is 2h only up to rounding.
        flat_g[i] = (f_plus - f_minus) / (x_plus - x_minus)
    return grad


def check_gradient(
    f: Callable[[NDArray[np.float64]], ArrayLike],
    x: ArrayLike,
    analytic: ArrayLike,
    eps: float = 1e-6,
) -> float:
    """Relative error between an analytic gradient and the numerical one.

    The error is **norm-based**: ``‖a - n‖₂ / max(‖a‖₂, ‖n‖₂, tiny)`` over all elements,
    with ``a`` the analytic and ``n`` the numerical gradient and ``tiny`` the smallest
    positive float64 (so two all-zero gradients give 0, not 0/0).  Unlike an element-wise
    maximum of ``|a - n| / max(|a|, |n|)``, it is not fooled by elements that are zero up to
    rounding, where the finite-difference noise (~1e-10) would look like a 100% error.

    A relative error only means something when the true gradient is not zero: if it is 0
    (a bias that every softmax row ignores, say), both sides are rounding noise and the
    result is of order 1.  Check such gradients with an absolute bound instead.

    Returns:
        A float in ``[0, 2]``.  Correct float64 gradients typically give 1e-9 or less; a
        wrong one gives something of order 1.
    """
    a = np.asarray(analytic, dtype=np.float64)  # (...)
    x = np.asarray(x)
    if a.shape != x.shape:
        raise ValueError(f"analytic must have the shape of x, {x.shape}; got {a.shape}")
    n = numerical_gradient(f, x, eps=eps)  # (...)
    tiny = np.finfo(np.float64).tiny
    denominator = max(float(np.linalg.norm(a)), float(np.linalg.norm(n)), tiny)
    return float(np.linalg.norm(a - n)) / denominator
