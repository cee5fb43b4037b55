"""Bad input to qkv.attention raises ValueError/TypeError naming the argument and shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import qkv
from qkv import masks


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


Q, K, V = _t(2, 4, 5, 8), _t(2, 2, 6, 8), _t(2, 2, 6, 3)

CASES = [
    # (call kwargs, exception, regex the message must match)
    (dict(q=np.zeros((2, 4, 5, 8))), TypeError, r"q must be a torch.Tensor .*got ndarray"),
    (dict(k=[[1.0]]), TypeError, r"k must be a torch.Tensor"),
    (
        dict(q=_t(4, 5, 8)),
        ValueError,
        r"q must have 4 dimensions \(B, Hq, Tq, D\); got shape \(4, 5, 8\)",
    ),
    (dict(v=_t(2, 2, 6, 3, 1)), ValueError, r"v must have 4 dimensions .*\(2, 2, 6, 3, 1\)"),
    (dict(q=_t(2, 4, 5, 8, dtype=torch.int64)), TypeError, r"q must be a floating-point.*int64"),
    (
        dict(k=_t(2, 2, 6, 8, dtype=torch.float64)),
        TypeError,
        r"share one dtype; got q torch.float32, k torch.float64",
    ),
    (dict(q=_t(3, 4, 5, 8)), ValueError, r"same batch size B; got q \(3, 4, 5, 8\)"),
    (
        dict(k=_t(2, 2, 7, 8)),
        ValueError,
        r"k and v must have the same heads Hkv and length Tk; got k \(2, 2, 7, 8\) and v \(2, 2, 6, 3\)",
    ),
    (
        dict(k=_t(2, 3, 6, 8), v=_t(2, 3, 6, 3)),
        ValueError,
        r"multiple of the key/value heads Hkv; got q \(2, 4, 5, 8\) \(Hq=4\) and k \(2, 3, 6, 8\) \(Hkv=3\)",
    ),
    (
        dict(k=_t(2, 2, 6, 7)),
        ValueError,
        r"same head dim D; got q \(2, 4, 5, 8\) and k \(2, 2, 6, 7\)",
    ),
    (
        dict(mask=torch.ones(5, 6)),
        TypeError,
        r"mask must be a bool tensor .*torch.float32 tensor of shape \(5, 6\).*bias=",
    ),
    (
        dict(mask=torch.ones(5, 6, dtype=torch.long)),
        TypeError,
        r"mask must be a bool tensor .*torch.int64",
    ),
    (
        dict(mask=[[True]]),
        TypeError,
        r"mask must be None, a bool tensor or a qkv.masks mask; got list",
    ),
    (
        dict(mask=torch.ones(5, 7, dtype=torch.bool)),
        ValueError,
        r"mask of shape \(1, 1, 5, 7\) does not broadcast to \(B, H, Tq, Tk\)=\(2, 4, 5, 6\)",
    ),
    (
        dict(mask=torch.ones(3, 1, 5, 6, dtype=torch.bool)),
        ValueError,
        r"mask of shape \(3, 1, 5, 6\)",
    ),
    (
        dict(mask=masks.padding([1, 7])),
        ValueError,
        r"mask: padding lengths must lie in \[0, Tk=6\]",
    ),
    (
        dict(mask=masks.padding([1, 2, 3])),
        ValueError,
        r"padding has 3 lengths but the batch has B=2",
    ),
    (
        dict(mask=masks.document(torch.zeros(2, 4, dtype=torch.long))),
        ValueError,
        r"document ids must be \(B, Tq\)=\(2, 5\)",
    ),
    (
        dict(bias=torch.ones(5, 7)),
        ValueError,
        r"bias of shape \(5, 7\) does not broadcast to \(B, Hq, Tq, Tk\)=\(2, 4, 5, 6\)",
    ),
    (dict(bias=torch.ones(1, 1, 1, 5, 6)), ValueError, r"bias of shape \(1, 1, 1, 5, 6\)"),
    (
        dict(bias=torch.ones(5, 6, dtype=torch.bool)),
        TypeError,
        r"bias must be a floating-point tensor; got dtype torch.bool",
    ),
    (dict(bias=1.0), TypeError, r"bias must be a floating-point tensor; got float"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must lie in \[0, 1\]; got -0.1"),
    (dict(dropout_p=1.5), ValueError, r"dropout_p must lie in \[0, 1\]; got 1.5"),
    (dict(dropout_p=math.nan), ValueError, r"dropout_p must lie in \[0, 1\]; got nan"),
    (dict(dropout_p="0.1"), TypeError, r"dropout_p must be a real number"),
    (dict(scale=math.nan), ValueError, r"scale must be finite; got nan"),
    (dict(scale=math.inf), ValueError, r"scale must be finite; got inf"),
    (dict(scale="big"), TypeError, r"scale must be a real number"),
    (dict(causal=1), TypeError, r"causal must be a bool; got int"),
    (dict(causal=torch.tensor(True)), TypeError, r"causal must be a bool"),
    (dict(return_weights="yes"), TypeError, r"return_weights must be a bool"),
    (dict(generator=0), TypeError, r"generator must be a torch.Generator"),
    (
        dict(kernel="fast"),
        ValueError,
        r"kernel must be 'auto' or one of \['flex', 'fused', 'native', 'reference', 'tiled'\]; got 'fast'",
    ),
    (
        dict(kernel="fused", return_weights=True),
        ValueError,
        r"kernel='fused' cannot run this call: .*weights",
    ),
]


@pytest.mark.parametrize("kwargs,exc,match", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input_raises_clear_error(kwargs, exc, match):
    call = dict(q=Q, k=K, v=V)
    call.update(kwargs)
    q, k, v = call.pop("q"), call.pop("k"), call.pop("v")
    with pytest.raises(exc, match=match):
        qkv.attention(q, k, v, **call)


def test_explain_rejects_the_same_input_and_unknown_options():
    with pytest.raises(ValueError, match="dropout_p"):
        qkv.explain(Q, K, V, dropout_p=2.0)
    with pytest.raises(TypeError, match="unexpected options"):
        qkv.explain(Q, K, V, masks=None)


def test_valid_edge_values_are_accepted():
    assert qkv.attention(Q, K, V, dropout_p=1.0).abs().sum() == 0  # everything dropped
    qkv.attention(Q, K, V, scale=0)  # uniform attention is legitimate
    qkv.attention(Q, K, V, scale=torch.tensor(0.5))
    qkv.attention(Q, K, V, mask=torch.ones(6, dtype=torch.bool))  # broadcasts over keys


def test_nan_inputs_propagate_without_crashing():
    q = Q.clone()
    q[0, 0, 0, 0] = float("nan")
    for kernel in ("reference", "fused"):
        out = qkv.attention(q, K, V, kernel=kernel)
        assert torch.isnan(out[0, 0, 0]).all()  # the poisoned row
        assert not torch.isnan(out[1]).any()  # other batch elements untouched
