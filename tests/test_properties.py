"""Property-based tests: every kernel and module against the float64 NumPy truth.

Letters: B batch, Hq/Hkv query/key-value heads, Tq/Tk lengths, D/Dv head dims, E width.

A hypothesis composite draws a whole case (shapes, dtype, mask, input magnitude, scale,
bias); the kernel under test runs it, and its output, log-sum-exp and gradients are
compared with `qkv.numpy` in float64 (`conftest.numpy_truth`) within the dtype-aware bound
of `conftest.assert_close`: at most FACTOR x the error of plain attention computed in the
same dtype (`naive_attention`), plus ATOL[dtype]. Rows that may attend to nothing must give
output 0, lse -inf and zero gradients, never NaN.

The last part pins down what non-finite *inputs* do (docs/robustness.md): a NaN or inf in
q, k or v should reach exactly the output rows that can see it; -inf in a bias masks; +inf
in a bias poisons its row. Where a kernel does something else the test is a strict xfail
that names the cause.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

import qkv
from conftest import (
    ATOL,
    FACTOR,
    assert_close,
    lse_dtype,
    make_qkv,
    max_err,
    naive_attention,
    numpy_truth,
)
from qkv import kernels, masks
from qkv._validate import build_problem
from qkv.kernels import tiled
from qkv.kernels.plan import TileConfig
from qkv.kernels.tiles import plan_tiles

KERNELS = ["reference", "fused", "tiled", "tiled-small"]


# ---- running one kernel ----------------------------------------------------------------


def run_kernel(kernel: str, q, k, v, *, block=(16, 8), **options) -> qkv.AttentionOutput:
    """One call on one kernel; "tiled-small" is the tiled kernel with `block` tiles (and
    masked blocks refined into sub-blocks of a quarter of their rows)."""
    if kernel == "tiled-small":
        p = build_problem(q, k, v, **options)
        rows = max(1, block[0] // 4)
        return tiled.run(q, k, v, p, block_q=block[0], block_k=block[1], refine_rows=rows)
    res = qkv.attention(q, k, v, kernel=kernel, **options)
    return res if isinstance(res, qkv.AttentionOutput) else qkv.AttentionOutput(res)


def fused_supports(q, k, v, **options) -> bool:
    return kernels.KERNELS["fused"].unsupported(build_problem(q, k, v, **options)) is None


# ---- strategies ------------------------------------------------------------------------

_SMALL_T = st.integers(1, 20)
_LARGE_T = st.sampled_from([31, 63, 64, 65, 97, 129, 200, 257, 300])
_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@st.composite
def lengths(draw):
    """(Tq, Tk): mostly small, about one case in six a few hundred long."""
    large = draw(st.integers(0, 5)) == 0
    if large:
        return draw(_LARGE_T), draw(_LARGE_T | _SMALL_T)
    return draw(_SMALL_T), draw(_SMALL_T)


def _rows_cut(draw, T: int) -> int:
    return draw(st.sampled_from([0, T]) | st.integers(0, T))


def _band(Tq: int, Tk: int, before: float, after: float) -> torch.Tensor:
    """(1, 1, Tq, Tk): i' - before <= j <= i' + after with i' = i + Tk - Tq, written out."""
    i = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None, :]
    return ((j >= i - before) & (j <= i + after))[None, None]


@st.composite
def primitive_masks(draw, B: int, Hq: int, Tq: int, Tk: int):
    """(a qkv.masks mask, the same mask as a (B|1, Hq|1, Tq, Tk) bool tensor built here).

    The tensor is computed independently of qkv.masks, so that the truth does not inherit
    a bug of the mask algebra.
    """
    kind = draw(st.sampled_from(["causal", "window", "padding", "document", "dense"]))
    if kind == "causal":
        return masks.causal(), _band(Tq, Tk, math.inf, 0)
    if kind == "window":
        before, after = draw(st.integers(0, Tk + 2)), draw(st.integers(0, 3))
        return masks.window(before, after), _band(Tq, Tk, before, after)
    if kind == "padding":
        lengths_ = [_rows_cut(draw, Tk) for _ in range(B)]
        keep = torch.arange(Tk)[None, :] < torch.tensor(lengths_)[:, None]  # (B, Tk)
        return masks.padding(lengths_), keep[:, None, None, :].expand(B, 1, Tq, Tk)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if kind == "document":
        n_docs = draw(st.integers(1, 4))
        ids = torch.randint(0, n_docs, (B, Tq), generator=g)
        kv_ids = torch.randint(0, n_docs, (B, Tk), generator=g)
        if draw(st.booleans()):  # packed sequences: documents are contiguous runs
            ids, kv_ids = ids.sort(-1).values, kv_ids.sort(-1).values
        if Tq == Tk and draw(st.booleans()):
            return masks.document(ids), (ids[:, :, None] == ids[:, None, :])[:, None]
        return masks.document(ids, kv_ids), (ids[:, :, None] == kv_ids[:, None, :])[:, None]
    # dense, any broadcastable shape, random density, some rows forced to see nothing
    shape = draw(st.sampled_from([(B, 1, Tq, Tk), (1, 1, Tq, Tk), (Tq, Tk), (B, Hq, Tq, Tk)]))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    dense = torch.rand(shape, generator=g) < density
    for row in draw(st.lists(st.integers(0, Tq - 1), max_size=3)):
        dense[..., row, :] = False  # rows that see nothing
    return masks.from_dense(dense), dense.reshape((1,) * (4 - dense.dim()) + shape)


@st.composite
def mask_specs(draw, B: int, Hq: int, Tq: int, Tk: int):
    """(mask, allowed, causal): None, a primitive, or a combination with &, |, ~."""
    kind = draw(st.sampled_from(["none", "flag", "one", "one", "and", "or", "not"]))
    causal = draw(st.booleans()) if kind != "flag" else True
    if kind in ("none", "flag"):
        return None, None, causal
    a, dense_a = draw(primitive_masks(B, Hq, Tq, Tk))
    if kind == "one":
        return a, dense_a, causal
    if kind == "not":
        return ~a, ~dense_a, causal
    b, dense_b = draw(primitive_masks(B, Hq, Tq, Tk))
    if kind == "and":
        return a & b, dense_a & dense_b, causal
    return a | b, dense_a | dense_b, causal


@dataclass
class Case:
    shape: tuple[int, int, int, int, int, int, int]  # (B, Hq, Hkv, Tq, Tk, D, Dv)
    dtype: torch.dtype
    mask: masks.Mask | None
    causal: bool
    magnitude: float  # q and k are multiplied by it: tiny or huge scores
    scale: float | None
    bias: str | None  # None, "full" (B, Hq, Tq, Tk) or "keys" (B, 1, 1, Tk)
    block: tuple[int, int]  # tiles of "tiled-small"
    seed: int
    dense: torch.Tensor | None = field(default=None, repr=False)  # `mask`, built by hand

    def inputs(self):
        return make_qkv(self.shape, self.dtype, seed=self.seed, scale=self.magnitude)

    def allowed(self) -> torch.Tensor | None:
        """(B, Hq, Tq, Tk) bool of mask AND causal, from the hand-built tensors."""
        B, Hq, _, Tq, Tk, _, _ = self.shape
        allowed = self.dense
        if self.dense is None and self.mask is not None:  # fixed cases: from qkv.masks
            allowed = self.mask.to_dense(B, Hq, Tq, Tk)
        if self.causal:
            causal = torch.from_numpy(qkv.numpy.causal_mask(Tq, Tk))  # (Tq, Tk)
            allowed = causal if allowed is None else allowed & causal
        return None if allowed is None else allowed.expand(B, Hq, Tq, Tk)

    def bias_tensor(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        B, Hq, _, Tq, Tk, _, _ = self.shape
        g = torch.Generator().manual_seed(self.seed + 1)
        shape = (B, Hq, Tq, Tk) if self.bias == "full" else (B, 1, 1, Tk)
        bias = torch.randn(shape, generator=g, dtype=torch.float64) * 2
        if self.bias == "keys":
            bias[..., ::3] = -math.inf  # -inf bias: those keys are masked
        return bias.to(self.dtype).requires_grad_()


@st.composite
def cases(draw, dtypes=_DTYPES, bias=True, magnitudes=(1.0, 1.0, 1.0, 1e-3, 1e3)):
    Tq, Tk = draw(lengths())
    large = max(Tq, Tk) > 20
    B = 1 if large else draw(st.integers(1, 2))
    Hkv = 1 if large else draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2] if large else [1, 2, 4]))
    D = draw(st.sampled_from([1, 3, 17] if large else [1, 3, 8, 17, 59]))
    Dv = draw(st.sampled_from([D, 1, 5]))
    Hq = Hkv * group
    mask, dense, causal = draw(mask_specs(B, Hq, Tq, Tk))
    small_blocks = [(16, 8), (8, 16), (4, 4), (3, 5)] if not large else [(16, 8), (32, 16)]
    return Case(
        shape=(B, Hq, Hkv, Tq, Tk, D, Dv),
        dtype=draw(st.sampled_from(dtypes)),
        mask=mask,
        causal=causal,
        magnitude=draw(st.sampled_from(magnitudes)),
        scale=draw(st.sampled_from([None, None, 0.5, 2.0])),
        bias=draw(st.sampled_from([None, None, "full", "keys"])) if bias else None,
        block=draw(st.sampled_from(small_blocks)),
        seed=draw(st.integers(0, 2**16)),
        dense=dense,
    )


# ---- truth and baselines ---------------------------------------------------------------


def torch64_truth(q, k, v, allowed, scale, bias, dout):
    """float64 truth for calls with a bias (qkv.numpy has none): autograd of the formula."""
    q, k, v, b = (t.detach().double().requires_grad_() for t in (q, k, v, bias))
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ kk.transpose(-2, -1)) * scale + b
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    live = torch.isfinite(s).any(-1, keepdim=True)
    s_safe = torch.where(live, s, torch.zeros_like(s))
    p = torch.where(live, torch.softmax(s_safe, -1), torch.zeros_like(s))
    lse = torch.where(live.squeeze(-1), torch.logsumexp(s_safe, -1), -math.inf)
    out = p @ vv
    out.backward(dout.double())
    return {"out": out.detach(), "lse": lse.detach(), "weights": p.detach(), "dq": q.grad,
            "dk": k.grad, "dv": v.grad, "dbias": b.grad}  # fmt: skip


def baseline(q, k, v, allowed, scale, bias, dout):
    """Plain attention in the inputs' dtype (flash-attention's baseline), with gradients.

    float16 overflows on huge scores (|q·k| > 65504): there the baseline is computed in
    float32 and rounded to float16, the best plain float16-output attention can do. Rows
    that see nothing get zero gradients (the plain softmax backward gives NaN there).
    """
    dtype = q.dtype
    if dtype == torch.float16:
        bound = float(q.detach().abs().max() * k.detach().abs().max()) * q.shape[-1]
        if not bound * (1.0 if scale is None else abs(scale)) < 6e4:
            dtype = torch.float32
    qb, kb, vb = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    b = None if bias is None else bias.detach().to(dtype).requires_grad_()
    out, _ = naive_attention(qb, kb, vb, allowed, scale, b)
    out.backward(dout.to(dtype))
    with torch.no_grad():
        s = qb @ kb.repeat_interleave(qb.shape[1] // kb.shape[1], 1).transpose(-2, -1)
        s = s * (qb.shape[-1] ** -0.5 if scale is None else scale)
        s = s if b is None else s + b
        s = s if allowed is None else s.masked_fill(~allowed, -math.inf)
        lse = torch.logsumexp(s, -1)
    grads = [None if t is None else torch.nan_to_num(t.grad, nan=0.0).to(q.dtype)
             for t in (qb, kb, vb, b)]  # fmt: skip
    return {"out": out.detach().to(q.dtype), "dq": grads[0], "dk": grads[1], "dv": grads[2],
            "dbias": grads[3], "lse": lse}  # fmt: skip


def describe(case: Case) -> None:
    """Hypothesis events: `--hypothesis-show-statistics` shows what the examples covered."""
    if not currently_in_test_context():
        return
    B, Hq, Hkv, Tq, Tk, D, Dv = case.shape
    event(f"length {'> 20' if max(Tq, Tk) > 20 else '<= 20'}")
    event(f"Tq {'<' if Tq < Tk else '>' if Tq > Tk else '='} Tk")
    event(f"GQA group {Hq // Hkv}")
    event(str(case.dtype))
    event(f"mask {type(case.mask).__name__}" + (" + causal" if case.causal else ""))
    event(f"|q|, |k| x {case.magnitude:g}")
    event(f"bias {case.bias}")
    allowed = case.allowed()
    if allowed is not None and (~allowed.any(-1)).any():
        event("some rows see nothing")


def check_case(case: Case, kernel: str) -> None:
    B, Hq, Hkv, Tq, Tk, D, Dv = case.shape
    describe(case)
    q, k, v = case.inputs()
    bias = case.bias_tensor()
    allowed = case.allowed()
    mask, causal = case.mask, case.causal
    if kernel == "fused" and not fused_supports(q, k, v, mask=mask, causal=causal):
        mask, causal = allowed, False  # fused runs structured masks within one tile only
    want_lse = kernel != "fused"
    options = dict(mask=mask, causal=causal, scale=case.scale, bias=bias, return_lse=want_lse)
    if kernel == "fused":
        options.pop("bias")
    if kernel.startswith("tiled") and currently_in_test_context():
        default = TileConfig()
        tiles = case.block if kernel == "tiled-small" else (default.block_q, default.block_k)
        plan = plan_tiles(build_problem(q, k, v, mask=mask, causal=causal).mask, Tq, Tk, *tiles)
        most = max((len(blk.segments) for blk in plan), default=0)
        event("tiles: partial results merged" if most > 1 else "tiles: one segment per block")
    res = run_kernel(kernel, q, k, v, block=case.block, **options)

    g = torch.Generator().manual_seed(case.seed + 2)
    dout = torch.randn(B, Hq, Tq, Dv, generator=g, dtype=torch.float64)
    if bias is None:
        truth = numpy_truth(q, k, v, allowed, case.scale, dout=dout)
    else:
        truth = torch64_truth(q, k, v, allowed, case.scale, bias, dout)
    base = baseline(q, k, v, allowed, case.scale, bias, dout)

    assert res.output.dtype == case.dtype and res.output.shape == (B, Hq, Tq, Dv)
    assert_close(res.output, truth["out"], base["out"], case.dtype, "output")
    if want_lse:
        assert res.lse.dtype == lse_dtype(case.dtype)
        # relative to the largest |lse|: huge scores (x 1e3) make lse ~ 1e6, whose last bits
        # differ with the order of summation even in float64
        finite = truth["lse"][torch.isfinite(truth["lse"])]
        norm = max(1.0, float(finite.abs().max()) if finite.numel() else 0.0)
        assert_close(res.lse / norm, truth["lse"] / norm, base["lse"] / norm, case.dtype, "lse")

    empty = None if allowed is None else ~allowed.expand(B, Hq, Tq, Tk).any(-1)
    if bias is not None:
        empty = torch.isneginf(truth["lse"])
    if empty is not None and empty.any():
        assert (res.output.detach()[empty] == 0).all(), "empty rows must give output 0"
        if want_lse:
            assert torch.isneginf(res.lse[empty]).all(), "empty rows must give lse -inf"

    res.output.backward(dout.to(case.dtype))
    if case.magnitude > 1:
        # near-one-hot softmax: gradients are exact zeros or huge near-ties; only finiteness
        for t in (q.grad, k.grad, v.grad):
            assert torch.isfinite(t).all()
        return
    for name, got in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert_close(got, truth[name], base[name], case.dtype, name)
    if bias is not None and kernel != "fused":
        assert_close(bias.grad, truth["dbias"], base["dbias"], case.dtype, "dbias")
    if empty is not None and empty.any():
        assert (q.grad[empty.view(B, Hq, Tq)] == 0).all(), "empty rows must give zero dq"


# ---- the kernels ------------------------------------------------------------------------


# large scores with a bias that takes a gradient: the tiled backward recomputes the weights
# from the forward's log-sum-exp, so both passes must compute the scores the same way
_BIAS_LARGE_SCORES = Case(shape=(1, 4, 1, 1, 1, 59, 59), dtype=torch.float32, mask=None,
                          causal=False, magnitude=1.0, scale=2.0, bias="full", block=(16, 8),
                          seed=0, dense=None)  # fmt: skip


@pytest.mark.parametrize("kernel", ["reference", "tiled", "tiled-small"])
@settings(max_examples=150)
@given(case=cases())
@example(case=_BIAS_LARGE_SCORES)
def test_kernel_matches_numpy_truth(kernel, case):
    check_case(case, kernel)


@settings(max_examples=150)
@given(case=cases(bias=False))
def test_fused_kernel_matches_numpy_truth(case):
    check_case(case, "fused")


@st.composite
def gappy_cases(draw):
    """Masks that leave gaps between allowed keys, so small tiles must merge segments."""
    Tq, Tk = draw(st.integers(2, 40)), draw(st.integers(8, 60))
    B, Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 4]))
    kind = draw(st.sampled_from(["outside window", "window | padding", "scattered documents"]))
    if kind == "outside window":
        before, after = draw(st.integers(0, 12)), draw(st.integers(0, 12))
        mask, dense = ~masks.window(before, after), ~_band(Tq, Tk, before, after)
    elif kind == "window | padding":
        lengths_ = [draw(st.integers(0, Tk // 2)) for _ in range(B)]
        keep = torch.arange(Tk)[None, :] < torch.tensor(lengths_)[:, None]  # (B, Tk)
        w = draw(st.integers(0, 6))
        mask = masks.window(w) | masks.padding(lengths_)
        dense = _band(Tq, Tk, w, 0) | keep[:, None, None, :]
    else:
        g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
        ids, kv_ids = (
            torch.randint(0, 3, (B, Tq), generator=g),
            torch.randint(0, 3, (B, Tk), generator=g),
        )
        mask, dense = masks.document(ids, kv_ids), (ids[:, :, None] == kv_ids[:, None, :])[:, None]
    return Case(
        shape=(B, Hkv * group, Hkv, Tq, Tk, draw(st.sampled_from([3, 8])), 5),
        dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16])),
        mask=mask, causal=draw(st.booleans()), magnitude=1.0, scale=None,
        bias=draw(st.sampled_from([None, None, "full"])),
        block=draw(st.sampled_from([(2, 2), (4, 3), (3, 5), (8, 4)])),
        seed=draw(st.integers(0, 999)), dense=dense,
    )  # fmt: skip


@settings(max_examples=80)
@given(case=gappy_cases())
def test_tiled_kernel_merges_segments_exactly(case):
    """Output, lse and gradients stay exact when a query block's keys come in pieces."""
    check_case(case, "tiled-small")


@settings(max_examples=60)
@given(case=cases(dtypes=[torch.float64, torch.float32], magnitudes=(1.0,)))
def test_weights_match_numpy_truth(case):
    """Weights from the reference kernel and, without autograd, from the tiled one."""
    B, Hq, Hkv, Tq, Tk, D, Dv = case.shape
    q, k, v = case.inputs()
    bias = case.bias_tensor()
    allowed = case.allowed()
    if bias is None:
        truth = numpy_truth(q, k, v, allowed, case.scale)["weights"]
    else:
        truth = torch64_truth(q, k, v, allowed, case.scale, bias, torch.zeros(B, Hq, Tq, Dv))
        truth = truth["weights"]
    _, base = naive_attention(q.detach(), k.detach(), v.detach(), allowed, case.scale,
                              None if bias is None else bias.detach())  # fmt: skip
    options = dict(mask=case.mask, causal=case.causal, scale=case.scale, bias=bias)
    for kernel in ("reference", "tiled", "tiled-small"):
        with torch.no_grad():
            res = run_kernel(kernel, q, k, v, block=case.block, return_weights=True, **options)
        assert_close(res.weights, truth, base, case.dtype, f"{kernel} weights")
        sums = res.weights.double().sum(-1)
        live = truth.sum(-1) > 0
        assert torch.allclose(sums[live], torch.ones_like(sums[live]), atol=1e-5)
        assert (sums[~live] == 0).all()


# Fixed edge cases every kernel must get right, whatever hypothesis happens to draw.
EDGES = {
    "causal Tq<Tk": ((1, 2, 1, 5, 13, 3, 3), None, True),
    "causal Tq>Tk": ((2, 2, 2, 13, 5, 3, 3), None, True),
    "causal Tq=1": ((2, 4, 2, 1, 9, 17, 5), None, True),
    "window Tq>Tk": ((1, 2, 1, 19, 7, 8, 8), masks.window(2, 1), False),
    "padding 0 and Tk": ((2, 2, 1, 9, 11, 8, 8), masks.padding([0, 11]), False),
    "all False": (
        (2, 2, 2, 7, 9, 3, 3),
        masks.from_dense(torch.zeros(7, 9, dtype=torch.bool)),
        False,
    ),
    "~causal": ((1, 2, 2, 9, 9, 8, 8), ~masks.causal(), False),
    "window|padding": ((2, 4, 1, 20, 33, 17, 17), masks.window(3) | masks.padding([0, 5]), True),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("edge", list(EDGES))
@pytest.mark.parametrize("kernel", KERNELS)
def test_edge_cases(kernel, edge, dtype):
    shape, mask, causal = EDGES[edge]
    case = Case(shape, dtype, mask, causal, 1.0, None, None, (4, 4), seed=len(edge))
    check_case(case, kernel)


def test_float16_runs_on_every_kernel():
    """float16 is supported on CPU by all kernels (so the property tests draw it)."""
    q, k, v = make_qkv((1, 2, 1, 9, 11, 8, 8), torch.float16)
    for kernel in KERNELS:
        out = run_kernel(kernel, q, k, v, causal=True).output
        assert out.dtype == torch.float16 and torch.isfinite(out).all()


# ---- the modules ------------------------------------------------------------------------


def _mha_params(m: qkv.MultiHeadAttention) -> qkv.numpy.MultiHeadParams:
    """The module's weights for qkv.numpy, kv heads repeated for grouped-query attention."""
    group, D = m.num_heads // m.num_kv_heads, m.head_dim

    def kv(w):  # (Hkv·D, ·) -> (H·D, ·): each kv head serves `group` query heads
        return w.detach().double().unflatten(0, (m.num_kv_heads, D)).repeat_interleave(
            group, 0).flatten(0, 1).numpy()  # fmt: skip

    def kvb(b):
        return None if b is None else kv(b[:, None])[:, 0]

    def plain(t):
        return None if t is None else t.detach().double().numpy()

    return qkv.numpy.MultiHeadParams(
        w_q=plain(m.q_proj.weight), b_q=plain(m.q_proj.bias),
        w_k=kv(m.k_proj.weight), b_k=kvb(m.k_proj.bias),
        w_v=kv(m.v_proj.weight), b_v=kvb(m.v_proj.bias),
        w_o=plain(m.out_proj.weight), b_o=plain(m.out_proj.bias),
    )  # fmt: skip


@st.composite
def mha_cases(draw):
    B, Tq = draw(st.integers(1, 2)), draw(st.integers(1, 12))
    H = draw(st.sampled_from([1, 2, 3, 4]))
    Hkv = draw(st.sampled_from([d for d in (1, 2, 3, 4) if H % d == 0]))
    Dh = draw(st.sampled_from([1, 3, 5]))
    E = H * Dh
    cross = draw(st.booleans())
    Tk = draw(st.integers(1, 12)) if cross else Tq
    kdim = draw(st.sampled_from([E, 2, 7])) if cross else E
    vdim = draw(st.sampled_from([E, 3])) if cross else E
    kind = draw(st.sampled_from(["none", "padding", "matrix", "window", "heads"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    mask = {
        "none": None,
        "padding": torch.arange(Tk)[None, :] < torch.randint(0, Tk + 1, (B, 1), generator=g),
        "matrix": torch.rand(B, Tq, Tk, generator=g) < 0.6,
        "window": masks.window(draw(st.integers(0, 4))),
        "heads": torch.rand(B, H, Tq, Tk, generator=g) < 0.7,
    }[kind]
    return dict(B=B, Tq=Tq, Tk=Tk, H=H, Hkv=Hkv, E=E, kdim=kdim, vdim=vdim, cross=cross,
                mask=mask, causal=draw(st.booleans()), bias=draw(st.booleans()),
                seed=draw(st.integers(0, 999)))  # fmt: skip


def _dense_for_numpy(mask, B, H, Tq, Tk):
    if mask is None:
        return None
    if isinstance(mask, masks.Mask):
        return mask.to_dense(B, H, Tq, Tk).numpy()
    if mask.dim() == 2:
        return mask[:, None, None, :].numpy()  # (B, Tk): key padding
    if mask.dim() == 3:
        return mask[:, None].numpy()  # (B, Tq, Tk)
    return mask.numpy()


@settings(max_examples=80)
@given(c=mha_cases(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_multi_head_attention_matches_numpy(c, dtype):
    torch.manual_seed(c["seed"])
    m = qkv.MultiHeadAttention(
        c["E"], c["H"], num_kv_heads=c["Hkv"], kdim=c["kdim"], vdim=c["vdim"], bias=c["bias"],
        dtype=dtype,
    )  # fmt: skip
    if c["bias"]:  # non-zero biases, so that a mix-up of them would show
        with torch.no_grad():
            for proj in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
                proj.bias.normal_()
    B, Tq, Tk = c["B"], c["Tq"], c["Tk"]
    query = torch.randn(B, Tq, c["E"], dtype=dtype, requires_grad=True)
    key = torch.randn(B, Tk, c["kdim"], dtype=dtype, requires_grad=True) if c["cross"] else None
    value = torch.randn(B, Tk, c["vdim"], dtype=dtype, requires_grad=True) if c["cross"] else None
    out, weights = m(query, key, value, mask=c["mask"], causal=c["causal"], need_weights=True)

    params = _mha_params(m)
    kv_in = (query, query) if key is None else (key, value)
    np_in = [t.detach().double().numpy() for t in (query, *kv_in)]
    np_mask = _dense_for_numpy(c["mask"], B, c["H"], Tq, Tk)
    options = dict(mask=np_mask, causal=c["causal"])
    want, cache = qkv.numpy.multi_head_attention_forward(*np_in, params, c["H"], **options)
    base_out = base_w = None
    if dtype != torch.float64:  # the baseline: the same computation in float32
        np32 = qkv.numpy.multi_head_attention_forward(*np_in, params, c["H"], dtype=np.float32,
                                                      **options)  # fmt: skip
        base_out, base_w = torch.from_numpy(np32[0]), torch.from_numpy(np32[1].weights)
    assert_close(out, torch.from_numpy(want), base_out, dtype, "MultiHeadAttention output")
    assert_close(weights, torch.from_numpy(cache.weights), base_w, dtype, "weights")
    if dtype != torch.float64:
        return
    dout = np.random.default_rng(c["seed"]).standard_normal(want.shape)
    dq, dk, dv, grads = qkv.numpy.multi_head_attention_backward(dout, cache)
    out.backward(torch.from_numpy(dout))
    if c["cross"]:
        pairs = [(query.grad, dq), (key.grad, dk), (value.grad, dv)]
    else:
        pairs = [(query.grad, dq + dk + dv)]  # one tensor fed all three projections
    pairs += [(m.q_proj.weight.grad, grads.w_q), (m.out_proj.weight.grad, grads.w_o)]
    if c["Hkv"] == c["H"]:
        pairs += [(m.k_proj.weight.grad, grads.w_k), (m.v_proj.weight.grad, grads.w_v)]
    for got, want_grad in pairs:
        assert torch.allclose(got, torch.from_numpy(want_grad), atol=1e-9, rtol=1e-7)


@st.composite
def classic_cases(draw):
    B, Tq, Tk = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kind = draw(st.sampled_from(["none", "padding", "matrix", "lengths"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    lengths_ = torch.randint(0, Tk + 1, (B,), generator=g)
    mask = {
        "none": None,
        "padding": (torch.arange(Tk)[None, :] < lengths_[:, None])[:, None, :],  # (B, 1, Tk)
        "matrix": torch.rand(B, Tq, Tk, generator=g) < 0.5,
        "lengths": masks.padding(lengths_),
    }[kind]
    allowed = None
    if mask is not None:
        dense = mask.to_dense(B, 1, Tq, Tk)[:, 0] if isinstance(mask, masks.Mask) else mask
        allowed = dense.expand(B, Tq, Tk)
    dims = [draw(st.sampled_from([1, 3, 6])) for _ in range(4)]
    return dict(B=B, Tq=Tq, Tk=Tk, mask=mask, allowed=allowed, dims=dims,
                kind=draw(st.sampled_from(["additive", "bilinear", "dot", "dot-scaled"])),
                seed=draw(st.integers(0, 999)))  # fmt: skip


def _softmax64(scores: torch.Tensor, allowed) -> torch.Tensor:
    """Masked softmax in float64 through qkv.numpy (empty rows give 0)."""
    where = None if allowed is None else allowed.numpy()
    return torch.from_numpy(qkv.numpy.softmax(scores.detach().double().numpy(), where=where))


@settings(max_examples=60)
@given(c=classic_cases())
def test_classic_attention_matches_float64_formula(c):
    torch.manual_seed(c["seed"])
    Dq, Dk, Dv, A = c["dims"]
    B, Tq, Tk = c["B"], c["Tq"], c["Tk"]
    if c["kind"].startswith("dot"):
        Dk = Dq
    query = torch.randn(B, Tq, Dq, dtype=torch.float64)
    keys = torch.randn(B, Tk, Dk, dtype=torch.float64)
    values = torch.randn(B, Tk, Dv, dtype=torch.float64)
    if c["kind"] == "additive":
        m = qkv.nn.AdditiveAttention(Dq, Dk, A, bias=True).double()
        hidden = torch.tanh(m.query_proj(query)[:, :, None] + m.key_proj(keys)[:, None])
        scores = m.score_proj(hidden)[..., 0]  # vᵀ tanh(W_q s + W_k h + b)
    elif c["kind"] == "bilinear":
        m = qkv.nn.BilinearAttention(Dq, Dk).double()
        scores = query @ m.weight @ keys.transpose(1, 2)  # sᵀ W h
    else:
        m = qkv.nn.DotAttention(scaled=c["kind"] == "dot-scaled")
        scores = query @ keys.transpose(1, 2) / (math.sqrt(Dq) if m.scaled else 1.0)
    weights = _softmax64(scores, c["allowed"])
    context, got_w = m(query, keys, values, mask=c["mask"])
    assert torch.allclose(got_w, weights, atol=1e-12)
    assert torch.allclose(context, weights @ values, atol=1e-12)
    if c["allowed"] is not None:
        empty = ~c["allowed"].any(-1)
        assert (context[empty] == 0).all() and (got_w[empty] == 0).all()


# ---- non-finite inputs ------------------------------------------------------------------

_T = 8  # Tq; Tk is 8 or 40 (torch's flash kernel treats Tk <= 15 differently)


def _nonfinite_mask(name: str, Tk: int):
    return {
        "none": None,
        "causal": masks.causal(),
        "padding": masks.padding([Tk - 3, Tk]),
        "dense": masks.from_dense(torch.arange(_T)[:, None] != 3),  # row 3 sees nothing
    }[name]


def _reach(where: str, mask, Tk: int, i: int, j: int) -> torch.Tensor:
    """(B, H, Tq) bool: the output rows a non-finite entry at q row i / key j can reach."""
    B, H = 2, 2
    allowed = torch.ones(B, H, _T, Tk, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask.to_dense(B, H, _T, Tk)
    reach = torch.zeros(B, H, _T, dtype=torch.bool)
    if where.startswith("q"):
        reach[0, 0, i] = allowed[0, 0, i].any()
    else:
        reach[0] = allowed[0, :, :, j]  # every query head of kv head 0 (Hkv = 1)
    return reach


def _nonfinite_params():
    """NaN in q, k or v and inf in v, on each kernel and mask.

    (An infinite q or k makes infinite *scores*, whose effect depends on their sign: see
    test_infinite_scores_follow_ieee.)
    """
    params = []
    for kernel in KERNELS:
        for mask in ("none", "causal", "padding"):
            for Tk in (_T, 40):
                if mask == "causal" and Tk != _T:
                    continue
                params.append(pytest.param(kernel, "q", "nan", mask, Tk,
                                           id=f"{kernel}-q-nan-{mask}-Tk{Tk}"))  # fmt: skip
            for where, value in (("k", "nan"), ("v", "nan"), ("v", "inf")):
                params.append(pytest.param(kernel, where, value, mask, 40,
                                           id=f"{kernel}-{where}-{value}-{mask}"))  # fmt: skip
        params.append(pytest.param(kernel, "q-empty", "nan", "dense", 40,
                                   id=f"{kernel}-q-empty-nan"))  # fmt: skip
    return params


@pytest.mark.parametrize("kernel,where,value,mask_name,Tk", _nonfinite_params())
def test_nonfinite_input_is_never_hidden(kernel, where, value, mask_name, Tk):
    """NaN/inf in q, k or v: no exception, and never a silently finite wrong answer.

    The documented behaviour (docs/robustness.md): every output row the bad entry can
    reach (q row i: row i, if it sees any key; key/value j: the rows that may attend to
    key j, in every query head of its kv head) is non-finite. A row out of reach either
    equals the clean run or is non-finite too: masking multiplies a weight of exactly 0
    by the value (0 · NaN = NaN), and the fused kernels add the mask as -inf (NaN + -inf =
    NaN), so a NaN may spread within its (batch, head) — loudly, never as a wrong number.
    Other batch elements are untouched.
    """
    mask = _nonfinite_mask(mask_name, Tk)
    g = torch.Generator().manual_seed(Tk)
    q = torch.randn(2, 2, _T, 8, generator=g)
    k, v = torch.randn(2, 1, Tk, 8, generator=g), torch.randn(2, 1, Tk, 8, generator=g)
    i = 3 if where == "q-empty" else 1
    j = Tk - 1  # the last key: masked by padding, and by causal for all but the last row
    bad = {"nan": math.nan, "inf": math.inf}[value]
    dirty = [t.clone() for t in (q, k, v)]
    if where.startswith("q"):
        dirty[0][0, 0, i, 2] = bad
    else:
        dirty["kv".index(where) + 1][0, 0, j, 2] = bad
    clean = run_kernel(kernel, q, k, v, mask=mask, block=(4, 4)).output
    got = run_kernel(kernel, *dirty, mask=mask, block=(4, 4)).output
    reach = _reach(where, mask, Tk, i, j)
    nonfinite = ~torch.isfinite(got).all(-1)
    assert torch.equal(nonfinite & reach, reach), (
        f"rows in reach stayed finite: {(reach & ~nonfinite).nonzero().tolist()}"
    )
    finite_rows = ~nonfinite  # out of reach and finite: must be the clean answer
    assert torch.allclose(got[finite_rows], clean[finite_rows], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], clean[1])  # the other batch element


@pytest.mark.parametrize("kernel", ["reference", "tiled", "tiled-small"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_minus_inf_bias_on_a_whole_row_is_a_masked_row(kernel, dtype):
    """-inf bias where a mask would forbid gives the masked result: 0 / -inf / zero grads."""
    B, Hq, Tq, Tk = 2, 2, 9, 11
    q, k, v = make_qkv((B, Hq, 1, Tq, Tk, 8, 8), dtype, seed=3)
    allowed = torch.rand(B, 1, Tq, Tk, generator=torch.Generator().manual_seed(0)) < 0.6
    allowed[:, :, 4] = False  # a whole row of -inf
    bias = torch.zeros(B, Hq, Tq, Tk, dtype=dtype).masked_fill(~allowed, -math.inf)
    bias.requires_grad_()
    res = run_kernel(kernel, q, k, v, bias=bias, return_lse=True, block=(4, 4))
    dout = torch.randn_like(res.output)
    res.output.backward(dout)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = run_kernel("reference", q2, k2, v2, mask=allowed, return_lse=True)
    want.output.backward(dout)
    atol = ATOL[dtype] * 10
    assert torch.allclose(res.output, want.output, atol=atol)
    assert torch.equal(torch.isneginf(res.lse), torch.isneginf(want.lse))
    assert (res.output[:, :, 4] == 0).all() and torch.isneginf(res.lse[:, :, 4]).all()
    for got, ref in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert torch.isfinite(got).all() and torch.allclose(got, ref, atol=atol * 10)
    assert (q.grad[:, :, 4] == 0).all()
    assert torch.isfinite(bias.grad).all() and (bias.grad[~allowed.expand_as(bias)] == 0).all()


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["+inf", "nan"])
@pytest.mark.parametrize("kernel", ["reference", "tiled", "tiled-small"])
def test_plus_inf_or_nan_bias_poisons_only_its_row(kernel, value):
    """+inf or NaN in a bias has no softmax: that row is NaN, every other row is exact."""
    q, k, v = make_qkv((1, 2, 2, 6, 7, 8, 8), torch.float32, seed=1)
    bias = torch.zeros(1, 2, 6, 7)
    bias[0, 1, 2, 3] = value
    got = run_kernel(kernel, q, k, v, bias=bias, block=(4, 4)).output.detach()
    clean = run_kernel(kernel, q, k, v, block=(4, 4)).output.detach()
    assert torch.isnan(got[0, 1, 2]).all()
    rest = torch.ones(1, 2, 6, dtype=torch.bool)
    rest[0, 1, 2] = False
    assert torch.allclose(got[rest], clean[rest], atol=1e-6)


def test_fused_kernel_refuses_a_bias():
    q, k, v = make_qkv((1, 1, 1, 3, 3, 4, 4), torch.float32)
    with pytest.raises(ValueError, match=r"kernel='fused' cannot run this call: .*bias"):
        qkv.attention(q, k, v, bias=torch.zeros(3, 3), kernel="fused")


def test_extreme_scores_do_not_overflow_on_any_kernel():
    """Scores near float32's limit (|q·k| ~ 1e30): finite outputs equal to the truth."""
    q, k, v = make_qkv((1, 2, 1, 5, 9, 4, 4), torch.float32, seed=2, scale=1e15)
    truth = numpy_truth(q, k, v)["out"]
    for kernel in KERNELS:
        out = run_kernel(kernel, q, k, v).output.detach()
        assert torch.isfinite(out).all(), kernel
        assert max_err(out, truth) <= FACTOR * 1e-3 + ATOL[torch.float32], kernel


@pytest.mark.parametrize("kernel", KERNELS)
def test_infinite_scores_follow_ieee(kernel):
    """An infinite q or k gives infinite scores: -inf acts as a mask, +inf poisons the row.

    Key 4 of batch 0 has k[..., 2] = ±inf and every query q[..., 2] = 1, so all its scores
    are ±inf (the other features are finite).
    """
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(3))
    q[..., 2] = 1.0
    k_minus, k_plus = k.clone(), k.clone()
    k_minus[0, :, 4, 2], k_plus[0, :, 4, 2] = -math.inf, math.inf
    hide = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    hide[0, :, :, 4] = False
    got = run_kernel(kernel, q, k_minus, v, block=(4, 4)).output
    want = run_kernel("reference", q, k, v, mask=hide).output
    assert torch.allclose(got, want, atol=1e-6), "a -inf score must act as a masked key"
    got = run_kernel(kernel, q, k_plus, v, block=(4, 4)).output
    assert torch.isnan(got[0]).all(-1).all(), "a +inf score has no softmax: NaN row"
    assert torch.allclose(got[1], want[1], atol=1e-6), "other batch elements are untouched"
