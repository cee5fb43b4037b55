"""The mask algebra: dense forms against direct formulas, and block classification
against the dense form (property-based)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qkv import masks
from qkv.masks import EMPTY, FULL, PARTIAL


def _band(Tq, Tk, lo, hi):
    """Direct formula: allowed when lo <= j - (i + Tk - Tq) <= hi."""
    i = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None, :]
    return (j - i >= lo) & (j - i <= hi)


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 7), (5, 5), (3, 8), (8, 3)])
def test_causal_dense_form(Tq, Tk):
    got = masks.causal().to_dense(1, 1, Tq, Tk)[0, 0]
    want = torch.tensor([[j <= i + Tk - Tq for j in range(Tk)] for i in range(Tq)])
    assert torch.equal(got, want)


def test_causal_drawing_is_bottom_right():
    assert masks.causal().draw(2, 4) == "■ ■ ■ ·\n■ ■ ■ ■"
    assert masks.causal().draw(3, 2) == "· ·\n■ ·\n■ ■"


@pytest.mark.parametrize("before,after", [(0, 0), (2, 0), (3, 1), (0, 4)])
@pytest.mark.parametrize("Tq,Tk", [(6, 6), (4, 9), (9, 4)])
def test_window_dense_form(before, after, Tq, Tk):
    got = masks.window(before, after).to_dense(2, 3, Tq, Tk)
    assert got.shape == (2, 3, Tq, Tk)
    assert torch.equal(got[1, 2], _band(Tq, Tk, -before, after))


def test_padding_dense_form():
    got = masks.padding([0, 2, 4]).to_dense(3, 2, 3, 4)
    assert got.shape == (3, 2, 3, 4)
    for b, length in enumerate([0, 2, 4]):
        assert torch.equal(got[b, 1, 2], torch.arange(4) < length)


def test_document_dense_form():
    ids = torch.tensor([[0, 0, 1, 1, 2]])
    got = masks.document(ids).to_dense(1, 1, 5, 5)[0, 0]
    assert torch.equal(got, ids[0][:, None] == ids[0][None, :])
    kv = torch.tensor([[1, 1, 2]])
    got = masks.document(ids, kv).to_dense(1, 1, 5, 3)[0, 0]
    assert torch.equal(got, ids[0][:, None] == kv[0][None, :])


def test_combinators():
    a, b = masks.causal(), masks.padding([3])
    da, db = a.to_dense(1, 1, 5, 5), b.to_dense(1, 1, 5, 5)
    assert torch.equal((a & b).to_dense(1, 1, 5, 5), da & db)
    assert torch.equal((a | b).to_dense(1, 1, 5, 5), da | db)
    assert torch.equal((~a).to_dense(1, 1, 5, 5), ~da)
    assert (a & None) is a and (None & a) is a
    assert masks.combine(None, None) is None and masks.combine(a, None) is a
    assert (
        repr(a & b & masks.window(2))
        == "causal() & padding(lengths=[3]) & window(before=2, after=0)"
    )
    assert repr((a | b) & a) == "(causal() | padding(lengths=[3])) & causal()"


def test_repr_draws_small_masks():
    text = repr(masks.from_dense(torch.eye(3, dtype=torch.bool)))
    assert "■ · ·\n· ■ ·\n· · ■" in text
    assert "■ ■ ·" in repr(masks.document(torch.tensor([[0, 0, 1]])))
    assert "\n" not in repr(masks.from_dense(torch.ones(40, 40, dtype=torch.bool)))


def test_from_dense_broadcasts():
    m = masks.from_dense(torch.tensor([True, False, True]))  # (Tk,) → (1, 1, 1, Tk)
    assert m.to_dense(2, 2, 4, 3).shape == (2, 2, 4, 3)
    with pytest.raises(ValueError, match=r"does not broadcast to \(B, H, Tq, Tk\)"):
        m.to_dense(2, 2, 4, 5)


# --- block classification -----------------------------------------------------------------


def _check_kinds(mask, B, H, Tq, Tk, bq, bk, exact=True):
    """Every tile's kind agrees with the dense form: sound always, exact for primitives."""
    dense = mask.to_dense(B, H, Tq, Tk)
    kinds = mask.block_kinds(Tq, Tk, bq, bk)
    nq, nk = -(-Tq // bq), -(-Tk // bk)
    assert kinds.shape[-2:] == (nq, nk) and kinds.dtype == torch.int8
    kinds = kinds.expand(B, H, nq, nk)
    for i in range(nq):
        for j in range(nk):
            tile = dense[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            any_, all_ = tile.flatten(2).any(-1), tile.flatten(2).all(-1)  # (B, H)
            kind = kinds[:, :, i, j]
            assert not (any_ & (kind == EMPTY)).any(), "a tile called empty has allowed pairs"
            assert not (~all_ & (kind == FULL)).any(), "a tile called full has forbidden pairs"
            if exact:
                want = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY))
                assert torch.equal(kind.long(), want.long()), (i, j)


sizes = st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 9), st.integers(1, 9))


@given(sizes, st.integers(0, 12), st.integers(0, 12))
def test_window_and_causal_blocks(size, before, after):
    Tq, Tk, bq, bk = size
    _check_kinds(masks.window(before, after), 1, 1, Tq, Tk, bq, bk)
    _check_kinds(masks.causal(), 1, 1, Tq, Tk, bq, bk)


@given(sizes, st.lists(st.integers(0, 40), min_size=1, max_size=3))
def test_padding_blocks(size, lengths):
    Tq, Tk, bq, bk = size
    lengths = [min(n, Tk) for n in lengths]
    _check_kinds(masks.padding(lengths), len(lengths), 1, Tq, Tk, bq, bk)


@given(sizes, st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_document_blocks(size, ndocs, seed):
    Tq, Tk, bq, bk = size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ndocs, (2, Tq), generator=g).sort(-1).values
    kv = torch.randint(0, ndocs, (2, Tk), generator=g)  # unsorted on purpose
    _check_kinds(masks.document(ids, kv), 2, 1, Tq, Tk, bq, bk)


@given(sizes, st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.5, 0.97, 1.0]))
def test_dense_blocks(size, seed, density):
    Tq, Tk, bq, bk = size
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(2, 3, Tq, Tk, generator=g) < density
    _check_kinds(masks.from_dense(t), 2, 3, Tq, Tk, bq, bk)
    _check_kinds(masks.from_dense(t[:, :1, :1]), 2, 3, Tq, Tk, bq, bk)  # broadcast rows


@given(sizes, st.integers(0, 6), st.lists(st.integers(0, 40), min_size=2, max_size=2))
def test_combined_blocks_are_sound(size, w, lengths):
    Tq, Tk, bq, bk = size
    lengths = [min(n, Tk) for n in lengths]
    pad = masks.padding(lengths)
    for m in (
        masks.causal() & pad,
        masks.window(w) | pad,
        ~masks.window(w, 1),
        (masks.causal() & masks.window(w)) | ~pad,
    ):
        _check_kinds(m, 2, 1, Tq, Tk, bq, bk, exact=False)


def test_document_classification_skips_shared_range_without_shared_id():
    # query block holds docs {0, 2}, key block doc {1}: ranges overlap, nothing shared
    m = masks.document(torch.tensor([[0, 2]]), torch.tensor([[1, 1]]))
    assert m.block_kinds(2, 2, 2, 2).item() == EMPTY


def test_long_packed_documents_classify_without_dense():
    T = 65536
    ids = (torch.arange(T) * 4 // T)[None]  # 4 documents of 16384 tokens
    kinds = (masks.causal() & masks.document(ids)).block_kinds(T, T, 512, 512)
    assert kinds.shape == (1, 1, 128, 128)
    assert (kinds == FULL).sum() == 4 * (32 * 31 // 2)  # below the diagonal, same document
    assert (kinds == PARTIAL).sum() == 128  # the diagonal tiles


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: masks.window(-1), ValueError, "before must be >= 0"),
        (lambda: masks.window(2, -3), ValueError, "after must be >= 0"),
        (lambda: masks.window(2.5), TypeError, "before must be an int"),
        (lambda: masks.window(True), TypeError, "before must be an int"),
        (lambda: masks.padding([3, -1]), ValueError, "lengths must be >= 0"),
        (lambda: masks.padding(torch.tensor([1.0, 2.0])), TypeError, "lengths must hold integers"),
        (
            lambda: masks.padding(torch.ones(2, 2, dtype=torch.long)),
            ValueError,
            "lengths must have 1",
        ),
        (lambda: masks.padding("abc"), TypeError, "lengths must be a tensor"),
        (lambda: masks.document(torch.zeros(3, dtype=torch.long)), ValueError, "ids must have 2"),
        (lambda: masks.document(torch.zeros(2, 3)), TypeError, "ids must hold integers"),
        (
            lambda: masks.document(
                torch.zeros(2, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)
            ),
            ValueError,
            "same batch",
        ),
        (lambda: masks.from_dense(torch.ones(3, 3)), TypeError, "bool tensor"),
        (lambda: masks.from_dense([[True]]), TypeError, "bool tensor"),
    ],
)
def test_bad_construction(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_padding_length_beyond_keys_is_rejected():
    with pytest.raises(
        ValueError, match=r"padding lengths must lie in \[0, Tk=4\]; got max length 5"
    ):
        masks.padding([2, 5]).to_dense(2, 1, 3, 4)
    with pytest.raises(ValueError, match="padding has 2 lengths but the batch has B=3"):
        masks.padding([2, 3]).to_dense(3, 1, 3, 4)


@given(
    st.integers(1, 30), st.integers(1, 30), st.integers(0, 6), st.integers(0, 6),
    st.lists(st.tuples(st.integers(0, 29), st.integers(1, 8), st.integers(0, 29), st.integers(1, 8)),
             min_size=2, max_size=6),
)  # fmt: skip
def test_equal_tile_keys_mean_equal_submasks(Tq, Tk, before, after, tiles):
    """Tile plans share one submask per key: the key must determine the submask."""
    pad = masks.padding([min(Tk, 5), Tk])
    candidates = [masks.causal(), masks.window(before, after), pad, masks.causal() & pad,
                  ~masks.window(before) | pad]  # fmt: skip
    for m in candidates:
        seen = {}
        for q0, nq, k0, nk in tiles:
            q0, k0 = min(q0, Tq - 1), min(k0, Tk - 1)
            q1, k1 = min(q0 + nq, Tq), min(k0 + nk, Tk)
            key = m.tile_key(Tq, Tk, q0, q1, k0, k1)
            assert key is not None
            sub = m.submask(Tq, Tk, q0, q1, k0, k1)
            if key in seen:
                assert torch.equal(seen[key], sub), (m, key)
            seen[key] = sub
    assert masks.document(torch.zeros(1, 3, dtype=torch.long)).tile_key(3, 3, 0, 1, 0, 1) is None
