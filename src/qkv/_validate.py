"""Up-front validation for `qkv.attention`: clear errors instead of deep torch ones.

Every message names the argument and the shapes it got, and says what was expected.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import masks
from ._types import Problem, plain_tensors

# Mirrors of the dispatch's thresholds (kernels/fused.py, kernels/native.py), read here so
# that the quick path below never imports the kernels' modules on the hot path.
_POISON_BELOW_KEYS = 64
_NATIVE_MIN_ROWS = 16  # native.MIN_ROWS: the fewest any of its builds takes

__all__ = ["build_problem", "quick_sdpa"]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(x, name: str, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} must have 4 dimensions {layout}; got shape {_shape(x)}"
            + (" (add a batch or head dimension with unsqueeze)" if x.dim() < 4 else "")
        )
    return x


def _as_bool(x, name: str) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool; got {type(x).__name__} {x!r}")
    return x


def _as_real(x, name: str) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(x).__name__} {x!r}")
    return float(x)


def _normalise_mask(mask) -> masks.Mask | None:
    if mask is None or isinstance(mask, masks.Mask):
        return mask
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            hint = " For an additive float mask use bias=." if mask.is_floating_point() else ""
            raise TypeError(
                "mask must be a bool tensor (True = may attend) or a qkv.masks mask; got a "
                f"{mask.dtype} tensor of shape {_shape(mask)}.{hint}"
            )
        if not 1 <= mask.dim() <= 4:
            raise ValueError(
                "mask must have 1 to 4 dimensions broadcastable to (B, Hq, Tq, Tk); got shape "
                f"{_shape(mask)}"
            )
        return masks.from_dense(mask)
    raise TypeError(
        f"mask must be None, a bool tensor or a qkv.masks mask; got {type(mask).__name__}"
    )


def build_problem(
    q,
    k,
    v,
    *,
    mask=None,
    bias=None,
    causal=False,
    scale=None,
    dropout_p=0.0,
    generator=None,
    return_weights=False,
    return_lse=False,
) -> Problem:
    """Validate one call of `qkv.attention` (same options and defaults) as a `Problem`."""
    q = _check_tensor(q, "q", "(B, Hq, Tq, D)")
    k = _check_tensor(k, "k", "(B, Hkv, Tk, D)")
    v = _check_tensor(v, "v", "(B, Hkv, Tk, Dv)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device; got q {q.device}, k {k.device}, v {v.device}"
        )
    B, Hq, Tq, D = q.shape
    _, Hkv, Tk, Dv = v.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(
            f"q, k and v must have the same batch size B; got q {_shape(q)}, k {_shape(k)}, "
            f"v {_shape(v)}"
        )
    if k.shape[1] != Hkv or k.shape[2] != Tk:
        raise ValueError(
            f"k and v must have the same heads Hkv and length Tk; got k {_shape(k)} and "
            f"v {_shape(v)}"
        )
    if k.shape[3] != D:
        raise ValueError(
            f"q and k must have the same head dim D; got q {_shape(q)} and k {_shape(k)}"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"the query heads Hq must be a multiple of the key/value heads Hkv; got q "
            f"{_shape(q)} (Hq={Hq}) and k {_shape(k)} (Hkv={Hkv})"
        )

    causal = _as_bool(causal, "causal")
    return_weights = _as_bool(return_weights, "return_weights")
    return_lse = _as_bool(return_lse, "return_lse")

    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    scale = _as_real(scale, "scale")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")

    dropout_p = _as_real(dropout_p, "dropout_p")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1]; got {dropout_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")

    user_mask = _normalise_mask(mask)
    if user_mask is not None:
        user_mask.check(B, Hq, Tq, Tk)
        if user_mask.device is not None and user_mask.device.type != q.device.type:
            raise ValueError(f"mask is on {user_mask.device} but q is on {q.device}")
    full_mask = masks.combine(masks.causal() if causal else None, user_mask)
    is_causal = causal and user_mask is None

    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            got = f"dtype {bias.dtype}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise TypeError(f"bias must be a floating-point tensor; got {got}")
        if bias.dim() > 4 or any(
            g not in (1, w) for g, w in zip(bias.shape[::-1], (Tk, Tq, Hq, B), strict=False)
        ):
            raise ValueError(
                f"bias of shape {_shape(bias)} does not broadcast to (B, Hq, Tq, Tk)="
                f"{(B, Hq, Tq, Tk)}"
            )
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device} but q is on {q.device}")

    return Problem(
        B=B,
        Hq=Hq,
        Hkv=Hkv,
        Tq=Tq,
        Tk=Tk,
        D=D,
        Dv=Dv,
        mask=full_mask,
        is_causal=is_causal,
        bias=bias,
        scale=scale,
        dropout_p=dropout_p,
        generator=generator,
        need_weights=return_weights,
        need_lse=return_lse,
        dtype=q.dtype,
        device=q.device,
        needs_grad=torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (q, k, v, bias)),
        # only the native kernel reads this, and only for Tq >= its MIN_ROWS queries: the
        # check costs microseconds a decoding step need not pay
        direct=Tq >= _NATIVE_MIN_ROWS and Tk > 0 and plain_tensors(q, k, v),
    )


def quick_sdpa(q, k, v, mask, causal, scale):
    """(attn_mask, is_causal, scale, enable_gqa) for torch's SDPA when the call is one of
    the common cases the dispatch would send to the fused kernel as it stands: no mask,
    causal=True with Tq in (1, Tk), or key padding; None when the full validation and
    dispatch must decide (anything unusual, including every wrong input).

    A decoding loop calls attention once per layer per token; at one query against a
    short cache the checks of `build_problem` and the walk over every kernel cost more
    than the attention (benchmarks/dispatch_cost.py).
    """
    T = torch.Tensor
    if type(q) is not T or type(k) is not T or type(v) is not T:
        return None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None
    dtype, device = q.dtype, q.device
    if k.dtype != dtype or v.dtype != dtype or not dtype.is_floating_point:
        return None
    if k.device != device or v.device != device:
        return None
    B, Hq, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    Bv, Hv, Tv, _ = v.shape
    if Bk != B or Bv != B or Hv != Hkv or Tv != Tk or Dk != D or Hkv == 0 or Hq % Hkv:
        return None
    if Tk == 0 or D == 0:
        return None
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if (
        Tq >= _NATIVE_MIN_ROWS
        and dtype == torch.float32
        and device.type == "cpu"
        and not wants_grad
    ):
        return None  # the native kernel may take it: the dispatch decides
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif type(scale) is float or type(scale) is int:
        scale = float(scale)
        if not math.isfinite(scale):
            return None
    else:
        return None
    attn_mask, is_causal = None, False
    if causal is True and Tq != 1:
        if mask is not None or Tq != Tk:
            return None
        is_causal = True
    elif causal is not True and causal is not False:
        return None
    if mask is not None:
        if not isinstance(mask, masks.Mask) or mask.form != "key_padding":
            return None
        lengths = mask.key_lengths
        if lengths.shape[0] != B or lengths.device.type != device.type:
            return None
        try:
            attn_mask = mask.key_mask(Tk, device)  # (B, 1, 1, Tk), kept by the mask
        except ValueError:
            return None
    elif Tk < _POISON_BELOW_KEYS:
        return None  # see kernels/fused.poison
    return attn_mask, is_causal, scale, Hq != Hkv
