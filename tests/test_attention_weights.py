"""qkv.attention_weights: the weights of chosen heads and rows, equal to the full matrix's."""

from __future__ import annotations

import pytest
import torch

import qkv
from conftest import make_qkv
from qkv import masks


def _as_index(sel, n: int) -> list[int]:
    if sel is None:
        return list(range(n))
    if isinstance(sel, slice):
        return list(range(n))[sel]
    return [sel] if isinstance(sel, int) else list(sel)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"causal": True},
        {"mask": masks.window(5, 2)},
        {"mask": masks.padding([0, 30]), "causal": True},
        {"bias": torch.randn(4, 17, 30, dtype=torch.float64)},
    ],
    ids=["none", "causal", "window", "padding&causal", "bias"],
)
@pytest.mark.parametrize(
    "heads,rows", [(None, None), ([3, 0], [16, 0, 5]), (2, slice(-3, None)), ([1], [])]
)
def test_selected_weights_equal_full_weights(options, heads, rows):
    q, k, v = make_qkv((2, 4, 2, 17, 30, 8, 8), torch.float64)  # GQA, Tq < Tk
    full = qkv.attention(q, k, v, return_weights=True, kernel="reference", **options).weights
    got = qkv.attention_weights(q, k, heads=heads, rows=rows, **options)
    want = full[:, _as_index(heads, 4)][:, :, _as_index(rows, 17)]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


def test_one_row_of_a_long_sequence_without_the_full_matrix():
    T = 50_000  # the full (1, 2, T, T) float32 matrix would need 20 GB
    q, k, _ = make_qkv((1, 2, 2, T, T, 16, 16), torch.float32)
    w = qkv.attention_weights(q.detach(), k.detach(), heads=[1], rows=[T - 1, 0], causal=True)
    assert w.shape == (1, 1, 2, T)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 1, 2))
    assert (w[0, 0, 1, 1:] == 0).all()  # row 0 sees key 0 only


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"heads": [4]}, ValueError, "heads must index into 4"),
        ({"rows": [17]}, ValueError, "rows must index into 17"),
        ({"rows": [[0]]}, TypeError, "rows must be an int, a slice or a 1-D sequence"),
        ({"heads": [0.5]}, TypeError, "heads must be"),
        ({"mask": torch.ones(3, 3)}, TypeError, "mask must be a bool tensor"),
    ],
)
def test_bad_selection(kwargs, exc, match):
    q, k, _ = make_qkv((2, 4, 2, 17, 30, 8, 8), torch.float64)
    with pytest.raises(exc, match=match):
        qkv.attention_weights(q, k, **kwargs)
