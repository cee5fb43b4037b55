"""Small result and problem types shared by the functional entry and the kernels.

Letters: B batch, Hq query heads, Hkv key/value heads, Tq/Tk lengths, D/Dv head dims.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .masks import Mask

__all__ = ["AttentionOutput", "Problem"]


@dataclass(frozen=True)
class AttentionOutput:
    """What `qkv.attention` returns when weights or log-sum-exp are asked for.

    output  (B, Hq, Tq, Dv) in the input dtype.
    weights (B, Hq, Tq, Tk) in the input dtype: the softmax probabilities (before dropout);
            0 on forbidden pairs and on rows that may attend to nothing. None if not asked.
    lse     (B, Hq, Tq) in float32 (float64 for float64 inputs): log Σ_j exp(score_ij) over
            allowed keys, -inf for rows that may attend to nothing. None if not asked.

    Unpacks like a tuple: ``out, weights, lse = qkv.attention(..., return_weights=True)``.
    """

    output: torch.Tensor
    weights: torch.Tensor | None = None
    lse: torch.Tensor | None = None

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        return iter((self.output, self.weights, self.lse))


_CPU = torch.device("cpu")


def plain_tensors(*tensors) -> bool:
    """Whether native code may read these tensors' memory directly: ordinary tensors (no
    subclass, no functorch wrapper such as vmap's, no forward-mode tangent), outside
    torch.compile's tracing. Anything else goes through torch's own operators."""
    if torch.compiler.is_compiling():
        return False
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    for t in tensors:
        if type(t) is not torch.Tensor or (wrapped is not None and wrapped(t)):
            return False
        if torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            return False
    return True


@dataclass(frozen=True)
class Problem:
    """A validated attention call, the same for every kernel.

    `mask` already includes `causal=True` (as `qkv.masks.causal()`); `is_causal` records
    that the mask is exactly bottom-right causal so kernels with a built-in causal mode can
    use it.
    """

    B: int
    Hq: int
    Hkv: int
    Tq: int
    Tk: int
    D: int
    Dv: int
    mask: Mask | None
    is_causal: bool
    bias: torch.Tensor | None
    scale: float
    dropout_p: float
    generator: torch.Generator | None
    need_weights: bool
    need_lse: bool
    dtype: torch.dtype = torch.float32  # of q (k and v share it)
    device: torch.device = _CPU
    needs_grad: bool = True  # autograd will want gradients of q, k, v or the bias
    direct: bool = False  # native code may read q, k, v's memory (see plain_tensors)

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 for ordinary multi-head attention)."""
        return self.Hq // self.Hkv
