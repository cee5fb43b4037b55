"""qkv.numpy: attention written out in plain NumPy, the library's teaching code and its truth.

Everything here is float64 by default, materialises what it needs, and has its gradients
derived by hand, so that the fast implementations elsewhere in qkv can be tested against it.

Modules, best read in this order:

* :mod:`~qkv.numpy.softmax`: a per-row stable softmax and log-sum-exp that handle masks and
  empty rows.
* :mod:`~qkv.numpy.attention`: scaled dot-product attention, forward and backward.
* :mod:`~qkv.numpy.multihead`: multi-head attention on top of it, in torch's weight layout.
* :mod:`~qkv.numpy.blocked`: the same attention, tile by tile, as FlashAttention computes it.
* :mod:`~qkv.numpy.gradcheck`: finite differences, to check any of the above.
"""

from .attention import AttentionCache, attention_backward, attention_forward, causal_mask
from .blocked import blocked_attention_backward, blocked_attention_forward
from .gradcheck import check_gradient, numerical_gradient
from .multihead import (
    MultiHeadCache,
    MultiHeadParams,
    multi_head_attention_backward,
    multi_head_attention_forward,
)
from .softmax import log_sum_exp, softmax

__all__ = [
    "AttentionCache",
    "MultiHeadCache",
    "MultiHeadParams",
    "attention_backward",
    "attention_forward",
    "blocked_attention_backward",
    "blocked_attention_forward",
    "causal_mask",
    "check_gradient",
    "log_sum_exp",
    "multi_head_attention_backward",
    "multi_head_attention_forward",
    "numerical_gradient",
    "softmax",
]
