"""The tile engine's values: plans, configs, crops, ring schedules, and a dispatch that
reads the machine's state without changing it.

Plans are values: one built once and passed as the mask gives results identical to the
mask planned on each call; its tile map shows what is skipped. Crops (what a ring step
sees of the global mask) classify their tiles like the dense rectangle they cut out.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from conftest import make_qkv
from qkv import masks
from qkv.distributed._steps import schedule, step_rects
from qkv.distributed.layout import positions
from qkv.kernels import TileConfig, TilePlan
from qkv.masks import EMPTY, FULL, PARTIAL


def test_a_plan_built_once_gives_identical_results():
    ids = (torch.arange(300) * 3 // 300)[None].expand(2, 300)
    config = TileConfig(block_q=32, block_k=16, refine_rows=8)
    for m in (masks.window(40, 3), masks.document(ids) & masks.causal() & masks.padding([300, 77])):
        q, k, v = make_qkv((2, 4, 2, 300, 300, 8, 8), torch.float32)
        plan = TilePlan(m, 300, 300, config)
        runs = []
        for mask in (m, plan, plan):  # planned on the call, then the same plan twice
            qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
            res = qkv.attention(qq, kk, vv, mask=mask, return_lse=True, kernel="tiled")
            res.output.backward(torch.ones_like(res.output))
            runs.append((res.output, res.lse, qq.grad, kk.grad, vv.grad))
        # the call with the mask planned with the default tiles; equal up to rounding
        for a, b in zip(runs[0], runs[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
        for a, b in zip(runs[1], runs[2], strict=True):
            assert torch.equal(a, b)  # the reused plan: bit for bit
    copy = pickle.loads(pickle.dumps(plan))  # plans travel to spawned processes
    assert repr(copy) == repr(plan)


def test_a_plan_prints_its_tile_map_and_checks_its_sizes():
    plan = masks.window(3).plan(24, 24, TileConfig(block_q=8, block_k=8))
    text = repr(plan)
    assert "tiles 8×8: 0 full, 5 masked, 4 skipped" in text
    assert text.splitlines()[1:] == ["◩ · ·", "◩ ◩ ·", "· ◩ ◩"]
    full = repr(masks.causal().plan(40, 40, TileConfig(block_q=8, block_k=8, max_masked_full=8)))
    assert full.endswith(
        "9 full, 6 masked, 10 skipped)\n◩ · · · ·\n◩ ◩ · · ·\n■ ■ ◩ · ·\n■ ■ ■ ◩ ·\n■ ■ ■ ■ ◩"
    )
    q = torch.randn(1, 1, 20, 8)
    with pytest.raises(ValueError, match=r"tile plan is for \(Tq, Tk\)=\(24, 24\)"):
        qkv.attention(q, q, q, mask=plan)
    with pytest.raises(ValueError, match="block_q must be an int >= 1"):
        TileConfig(block_q=0)
    with pytest.raises(TypeError, match="config must be a TileConfig"):
        TilePlan(masks.causal(), 4, 4, config={"block_q": 4})


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 30), st.integers(1, 30), st.integers(1, 7), st.integers(1, 7),
    st.integers(0, 29), st.integers(0, 29), st.integers(0, 29), st.integers(0, 29),
    st.sampled_from(["window", "padding", "documents", "combined"]),
)  # fmt: skip
def test_crops_classify_like_their_dense_rectangle(Tq, Tk, bq, bk, a, b, c, d, kind):
    q0, q1 = sorted((min(a, Tq), min(b, Tq)))
    k0, k1 = sorted((min(c, Tk), min(d, Tk)))
    if q1 == q0 or k1 == k0:
        return
    g = torch.Generator().manual_seed(Tq * 31 + Tk)
    ids = torch.randint(0, 3, (2, Tq), generator=g).sort(-1).values
    kv_ids = torch.randint(0, 3, (2, Tk), generator=g).sort(-1).values
    m = {
        "window": masks.window(3, 1),
        "padding": masks.padding([min(Tk, 5), Tk]),
        "documents": masks.document(ids, kv_ids),
        "combined": (masks.causal() & masks.document(ids, kv_ids)) | ~masks.padding([2, Tk]),
    }[kind]
    crop = m.crop(Tq, Tk, q0, q1, k0, k1)
    dense = m.to_dense(2, 1, Tq, Tk)[:, :, q0:q1, k0:k1]
    assert torch.equal(crop.to_dense(2, 1, q1 - q0, k1 - k0), dense)
    kinds = crop.block_kinds(q1 - q0, k1 - k0, bq, bk).expand(2, 1, -1, -1)
    for i in range(kinds.shape[2]):
        for j in range(kinds.shape[3]):
            tile = dense[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk].flatten(2)
            any_, all_ = tile.any(-1), tile.all(-1)
            assert not (any_ & (kinds[:, :, i, j] == EMPTY)).any()
            assert not (~all_ & (kinds[:, :, i, j] == FULL)).any()
            if kind != "combined":  # primitives classify exactly
                want = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY))
                assert torch.equal(kinds[:, :, i, j].long(), want.long())


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [1, 2, 3, 5])
def test_ring_steps_cover_exactly_the_global_mask(layout, W):
    """Without spawning: the rectangles of every (rank, src) step are exactly the global
    mask at those positions, and the schedule needs every step that allows a pair (and,
    for the primitive masks, only those: combinations classify soundly, not exactly)."""
    T = 24 * W
    ids = (torch.arange(T) * 3 // T)[None].expand(2, T)
    cases = [None, masks.causal(), masks.window(5), masks.document(ids) & masks.causal(),
             masks.window(7) & masks.padding([T - 20, 3])]  # fmt: skip
    for n, m in enumerate(cases):
        exact = n < 3
        dense = torch.ones(2, 1, T, T, dtype=torch.bool) if m is None else m.to_dense(2, 1, T, T)
        plan = schedule(m, W, T, layout)
        hops = 0
        for r in range(W):
            qp = positions(r, W, T, layout=layout)
            for src in range(W):
                kp = positions(src, W, T, layout=layout)
                want = dense[:, :, qp][:, :, :, kp]
                got = torch.zeros(2, 1, len(qp), len(kp), dtype=torch.int64)
                for rect in step_rects(m, r, src, W, T, layout):
                    lq, lk = rect.q1 - rect.q0, rect.k1 - rect.k0
                    tile = torch.ones(1, 1, lq, lk, dtype=torch.bool)
                    if rect.mask is not None:
                        tile = rect.mask.to_dense(2, 1, lq, lk)
                    got[:, :, rect.q0 : rect.q1, rect.k0 : rect.k1] += tile
                assert torch.equal(got, want.long()), (m, r, src)
                if exact or want.any():
                    assert plan.needed[r][src] == bool(want.any()), (m, r, src)
                if want.any():
                    hops = max(hops, (r - src) % W)
        assert plan.hops == hops if exact else plan.hops >= hops, m


EXPLAIN = """
    import pathlib, sys, torch, qkv
    from qkv.kernels import native
    q = torch.randn(1, 2, 64, 16)
    for opts in ({}, {"causal": True}, {"mask": qkv.masks.window(8)}, {"return_lse": True}):
        print(qkv.explain(q, q, q, **opts))
    print(qkv.explain(q[:, :, :1], q, q))
    print("native:", native.unavailable(build=False))
    print("files:", sorted(p.name for p in pathlib.Path(sys.argv[1]).rglob("*")))
"""


def test_explain_never_compiles_anything(tmp_path):
    """In a fresh process with an empty native-kernel cache, explain names kernels and
    reasons and leaves the cache empty: no build starts inside a dispatch check."""
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, "QKV_CACHE_DIR": str(cache), "QKV_NATIVE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXPLAIN), str(cache)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "files: []" in done.stdout, done.stdout
    assert "fused" in done.stdout or "native" in done.stdout
