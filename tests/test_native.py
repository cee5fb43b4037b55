"""The native kernel (native.cpp) equals the float64 truth, and falls back cleanly.

Its own problems (dense and causal float32 forwards) are compared with the NumPy truth
across the sizes where its blocking changes: 64-row chunks, 16-query vectors, key
slices of the online softmax (≤ 512), head widths that are not a multiple of anything.
As the tiled kernel's engine for float32 jobs it is compared with torch's fused kernel on the
same plans. Each runs on every instruction set native.cpp is written for that this CPU has
(AVX-512 and AVX2 on a machine with both, via QKV_NATIVE_ISA); the source of an ISA the CPU
lacks is at least compiled. Where it cannot be built (neither ISA, no compiler) those tests
skip, and the fallback tests still run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qkv
from conftest import assert_close, make_qkv, naive_attention, naive_lse, numpy_truth
from qkv import masks
from qkv._validate import build_problem
from qkv.kernels import native, stacked, tiled
from qkv.kernels.plan import PlanCache

WHY = native.unavailable()
needs_native = pytest.mark.skipif(WHY is not None, reason=f"native kernel unavailable: {WHY}")
HERE = [name for name, (cpu, _) in native.ISAS.items() if set(cpu) <= native._cpu_flags()]


@pytest.fixture(params=HERE or [None])
def isa(request, monkeypatch):
    """Each ISA this CPU has in turn (QKV_NATIVE_ISA), the default build's when none."""
    if request.param is not None:
        monkeypatch.setenv("QKV_NATIVE_ISA", request.param)
        why = native.unavailable()
        if why is not None:
            pytest.skip(f"the {request.param} build is unavailable: {why}")
    return request.param


SIZES = [  # (B, Hq, Hkv, Tq, Tk, D, Dv)
    (1, 1, 1, 1, 1, 1, 1),
    (2, 2, 2, 1, 300, 16, 16),  # decoding: one query against a cache
    (1, 2, 2, 63, 63, 64, 64),  # one chunk less one row
    (1, 2, 1, 64, 128, 64, 64),  # one chunk, one slice
    (2, 4, 2, 65, 129, 59, 17),  # chunk + 1, slice + 1, GQA, odd widths
    (1, 3, 1, 129, 257, 8, 80),  # MQA, Dv > D
    (1, 2, 2, 100, 1000, 128, 64),
    (1, 1, 1, 17, 2048, 33, 33),
]


def _run_native(q, k, v, **options):
    """The native kernel itself, also where dispatch would not pick it (few queries)."""
    p = build_problem(q, k, v, return_lse=True, **options)
    return native.run(q, k, v, p)


@needs_native
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_native_matches_truth(size, causal, isa):
    B, Hq, Hkv, Tq, Tk, D, Dv = size
    q, k, v = (t.detach() for t in make_qkv(size, torch.float32, seed=Tq + Tk))
    allowed = masks.causal().to_dense(B, Hq, Tq, Tk) if causal else None
    truth = numpy_truth(q, k, v, allowed)
    res = _run_native(q, k, v, causal=causal)
    base, _ = naive_attention(q, k, v, allowed)
    assert_close(res.output, truth["out"], base, torch.float32, "out")
    assert res.lse.dtype == torch.float32
    assert_close(res.lse, truth["lse"], naive_lse(q, k, allowed), torch.float32, "lse")


@needs_native
def test_native_takes_any_strides(isa):
    """Inputs in token-major storage (a projection viewed as (B, T, H, D)) and a
    non-contiguous slice give the same result as contiguous ones."""
    q, k, v = (t.detach() for t in make_qkv((2, 4, 4, 70, 90, 32, 32), torch.float32))
    token_major = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    wide = torch.randn(2, 4, 90, 64)
    wide[..., :32] = k
    sliced_k = wide[..., :32]  # rows of 64 floats, 32 of them used
    a = _run_native(q, k, v)
    b = _run_native(*token_major)
    c = _run_native(q, sliced_k, v)
    for other in (b, c):
        torch.testing.assert_close(other.output, a.output, rtol=0, atol=0)
        torch.testing.assert_close(other.lse, a.lse, rtol=0, atol=0)


@needs_native
def test_thread_count_does_not_change_the_result():
    """Every block is computed by one thread whatever their number: bit-for-bit equal."""
    q, k, v = (t.detach() for t in make_qkv((1, 4, 4, 300, 300, 64, 64), torch.float32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_native(q, k, v, causal=True)
        torch.set_num_threads(max(2, threads))
        many = _run_native(q, k, v, causal=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.output, many.output) and torch.equal(one.lse, many.lse)


@needs_native
def test_nan_propagates_to_its_row_only(isa):
    q, k, v = (t.detach() for t in make_qkv((1, 2, 2, 40, 40, 16, 16), torch.float32))
    q[0, 1, 5, 3] = float("nan")
    out = _run_native(q, k, v).output
    bad = torch.isnan(out).any(-1)  # (B, H, Tq)
    assert bad[0, 1, 5] and int(bad.sum()) == 1


@needs_native
@pytest.mark.parametrize(
    "mask_name",
    ["none", "causal", "window", "causal-window", "padding", "document&causal", "window|padding"],
)
@pytest.mark.parametrize(
    "size", [(2, 4, 2, 63, 65), (1, 2, 1, 65, 129), (2, 2, 2, 129, 63)], ids=str
)
def test_tiled_kernel_on_native_matches_truth(size, mask_name, monkeypatch, isa):
    """The tiled kernel with tiles of 64 and sub-blocks of 32 (native jobs) at tile ± 1:
    outputs, lse and gradients against the float64 truth, rows that see nothing included."""
    from test_tiled import _masks

    B, Hq, Hkv, Tq, Tk = size
    mask, causal = _masks(B, Tq, Tk)[mask_name]
    q, k, v = make_qkv((B, Hq, Hkv, Tq, Tk, 16, 16), torch.float32, seed=Tq)
    m = masks.combine(masks.causal() if causal else None, mask)
    allowed = None if m is None else m.to_dense(B, Hq, Tq, Tk)
    dout = torch.randn(B, Hq, Tq, 16, dtype=torch.float64)
    truth = numpy_truth(q, k, v, allowed, dout=dout)
    ran = []
    original = stacked._native_forward
    monkeypatch.setattr(stacked, "_native_forward", lambda *a: ran.append(1) or original(*a))
    p = build_problem(q, k, v, mask=mask, causal=causal, return_lse=True)
    res = tiled.run(q, k, v, p, block_q=64, block_k=32, refine_rows=32)
    res.output.backward(dout.float())
    assert ran or not allowed.any()  # native jobs ran, unless every key is masked
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    base, _ = naive_attention(qb, kb, vb, allowed)
    base.backward(dout.float())
    assert_close(res.output, truth["out"], base, torch.float32, "out")
    assert_close(res.lse, truth["lse"], naive_lse(q, k, allowed), torch.float32, "lse")
    for name, got, b in (("dq", q.grad, qb.grad), ("dk", k.grad, kb.grad), ("dv", v.grad, vb.grad)):
        assert_close(got, truth[name], b, torch.float32, name)


TILED_MASKS = {
    "window": (masks.window(40, 7), False),
    "causal-window": (masks.window(50), True),
    "padding with an empty sequence": (masks.padding([0, 150]), False),
    "document&causal": ("document", True),
    "window|padding": (masks.window(30) | masks.padding([50, 1]), False),
}


@needs_native
@pytest.mark.parametrize("mask_name", list(TILED_MASKS))
def test_tiled_jobs_on_native_equal_torchs_fused_kernel(mask_name, monkeypatch, isa):
    """The tiled kernel's float32 jobs (strided, masked, rows that see nothing, per-batch
    masks) give torch's fused kernel's outputs and lse, and the backward still works."""
    B, Hq, Hkv, Tq, Tk = 2, 4, 2, 150, 170
    mask, causal = TILED_MASKS[mask_name]
    if mask == "document":
        g = torch.Generator().manual_seed(0)
        ids = torch.sort(torch.randint(0, 3, (B, Tq), generator=g), -1).values
        kv = torch.sort(torch.randint(0, 3, (B, Tk), generator=g), -1).values
        mask = masks.document(ids, kv)
    q, k, v = make_qkv((B, Hq, Hkv, Tq, Tk, 8, 8), torch.float32)
    dout = torch.randn(B, Hq, Tq, 8)
    ran = []
    original = stacked._native_forward

    def spy(*args):
        ran.append(True)
        return original(*args)

    def run():
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        p = build_problem(qq, kk, vv, mask=mask, causal=causal, return_lse=True)
        res = tiled.run(qq, kk, vv, p, block_q=64, block_k=32, refine_rows=32)
        res.output.backward(dout)
        return res.output, res.lse, qq.grad, kk.grad, vv.grad

    monkeypatch.setattr(stacked, "_native_forward", spy)
    on_native = run()
    assert ran  # native jobs really ran
    monkeypatch.setattr(stacked, "_native", lambda *a: False)
    on_torch = run()
    for what, a, b in zip(("out", "lse", "dq", "dk", "dv"), on_native, on_torch, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=what)
    empty = torch.isneginf(on_native[1])
    if mask_name.startswith("padding"):
        assert empty[0].all() and not empty[1].any()  # length 0: every row sees nothing
        assert (on_native[0][0] == 0).all()


def test_dispatch_reasons():
    q = torch.randn(1, 2, 64, 16)
    choice = qkv.explain(q, q, q)
    fewest = native.min_rows() if WHY is None else max(native.MIN_ROWS_BY_ISA.values())
    decoding = qkv.explain(q[:, :, : fewest - 1], q, q)
    assert decoding.name == "fused" and f"fewer than {fewest} queries" in decoding.reason
    if WHY is None:
        assert choice.name == "native"
        assert qkv.explain(q, q, q, causal=True).name == "native"
    else:
        assert choice.name == "fused" and "not native: not built here" in choice.reason
    g = q.clone().requires_grad_()
    assert qkv.explain(g, g, g).name == "fused"
    assert "gradients" in qkv.explain(g, g, g).reason
    with torch.no_grad():  # no gradient wanted after all
        assert qkv.explain(g, g, g).name == qkv.explain(q, q, q).name
    assert "float32 only" in qkv.explain(q.double(), q.double(), q.double()).reason
    top_left = qkv.explain(q, q[:, :, :10], q[:, :, :10], causal=True)  # Tq > Tk
    assert top_left.name != "native"
    assert qkv.explain(q, q, q, return_weights=True).name == "tiled"
    assert qkv.explain(q, q, q, dropout_p=0.1).name != "native"
    assert qkv.explain(q, q, q, mask=masks.window(4)).name != "native"
    with pytest.raises(ValueError, match="kernel='native' cannot run this call"):
        qkv.explain(q.double(), q.double(), q.double(), kernel="native")


def _python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "QKV_CACHE_DIR": str(tmp_path / "cache"), **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )


SAME_AS_SDPA = """
    import torch, qkv
    from qkv.kernels import native
    print("why:", native.unavailable())
    q = torch.randn(1, 2, 100, 16)
    out = qkv.attention(q, q, q)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert (out - ref).abs().max() < 1e-5, "wrong result"
    print("kernel:", qkv.explain(q, q, q).name)
"""


def test_disabled_by_environment_falls_back(tmp_path):
    done = _python(SAME_AS_SDPA, tmp_path, QKV_NATIVE="0")
    assert done.returncode == 0, done.stderr
    assert "why: disabled by QKV_NATIVE=0" in done.stdout
    assert "kernel: fused" in done.stdout


def test_failed_build_falls_back_with_the_reason(tmp_path):
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'no compiling today' >&2\nexit 1\n")
    broken.chmod(0o755)
    done = _python(SAME_AS_SDPA, tmp_path, CXX=str(broken))
    assert done.returncode == 0, done.stderr
    if WHY is None:  # on a machine where a real build works, this one must fail visibly
        assert "failed: no compiling today" in done.stdout
    assert "kernel: fused" in done.stdout
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written is left


@needs_native
def test_build_is_cached_and_written_whole(tmp_path):
    """A fresh cache: asking compiles nothing, the first call builds, a second process
    reuses the file."""
    asking = "from qkv.kernels import native\nprint('asked:', native.unavailable(build=False))\n"
    first = _python(asking + textwrap.dedent(SAME_AS_SDPA), tmp_path)
    assert first.returncode == 0, first.stderr
    assert "asked: not built yet" in first.stdout and "why: None" in first.stdout
    assert "kernel: native" in first.stdout
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].name.startswith("native-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    second = _python(SAME_AS_SDPA, tmp_path)
    assert second.returncode == 0, second.stderr
    assert list((tmp_path / "cache").iterdir()) == built  # reused, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp


@needs_native
def test_torch_defaults_do_not_reach_the_kernel():
    """The kernel writes CPU float32 whatever torch's default dtype or device."""
    q, k, v = (t.detach() for t in make_qkv((1, 2, 2, 100, 100, 16, 16), torch.float32))
    truth = qkv.attention(q.double(), k.double(), v.double(), causal=True, kernel="reference")
    for setting in ("dtype", "device"):
        try:
            if setting == "dtype":
                torch.set_default_dtype(torch.float64)
            else:
                torch.set_default_device("meta")
            out = qkv.attention(q, k, v, causal=True)
        finally:
            torch.set_default_dtype(torch.float32)
            torch.set_default_device(None)
        assert out.device.type == "cpu"
        torch.testing.assert_close(out.double(), truth, rtol=0, atol=2e-5)


@needs_native
def test_nan_in_a_future_key_stays_out_of_earlier_rows(isa):
    """Masked keys are selected out, not added to: NaN + (-inf) would be NaN."""
    q, k, v = (t.detach() for t in make_qkv((1, 1, 1, 128, 128, 16, 16), torch.float32))
    k[0, 0, 70, 3] = float("nan")
    out = qkv.attention(q, k, v, causal=True)
    assert qkv.explain(q, k, v, causal=True).name == "native"
    bad = torch.isnan(out[0, 0]).any(-1)
    assert bad[70:].all() and not bad[:70].any()


def test_plans_are_cached_only_for_masks_their_key_identifies():
    """A mask that holds no tensor but whose tile key leaves out a parameter (as padding's
    does) must not be served another instance's plan."""
    from qkv.masks import Mask

    class KeyPrefix(Mask):  # keys j < n are visible; tile_key leaves n out, like Padding
        def __init__(self, n):
            self.n = n

        def submask(self, Tq, Tk, q0, q1, k0, k1, device=None):
            j = torch.arange(k0, k1, device=device)
            return (j < self.n).expand(q1 - q0, k1 - k0)[None, None]

        def block_kinds(self, Tq, Tk, block_q, block_k, device=None):
            starts = torch.arange(0, Tk, block_k, device=device)
            ends = torch.clamp(starts + block_k, max=Tk)
            kind = torch.where(ends <= self.n, 2, torch.where(starts >= self.n, 0, 1))
            return kind.expand(-(-Tq // block_q), -1)[None, None]

        def tile_key(self, Tq, Tk, q0, q1, k0, k1):
            return ("key-prefix", q1 - q0, k0, k1)

    q, k, v = (t.detach() for t in make_qkv((1, 2, 2, 600, 600, 16, 16), torch.float32))
    for n in (100, 500):
        got = qkv.attention(q, k, v, mask=KeyPrefix(n), kernel="tiled")
        want = qkv.attention(q, k, v, mask=KeyPrefix(n), kernel="reference")
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_plan_cache_is_safe_across_threads(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(tiled, "PLANS", PlanCache(size=1))  # evictions all the time
    q, k, v = (t.detach() for t in make_qkv((1, 1, 1, 300, 300, 8, 8), torch.float32))

    def call(i):
        return qkv.attention(q, k, v, mask=masks.window(10 + i % 5), kernel="tiled")

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(call, range(40)))
    for i, out in enumerate(outs[:5]):
        torch.testing.assert_close(out, call(i), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_function_transforms_and_tracing_go_to_torchs_kernels():
    """vmap's wrapped tensors, forward-mode duals and torch.compile's tracing are not
    plain memory: native code is never handed them."""
    import torch.autograd.forward_ad as fwad

    q, k, v = (t.detach() for t in make_qkv((2, 2, 2, 64, 64, 16, 16), torch.float32))
    stacked_q = torch.stack([q, 0.5 * q])  # vmap over a leading dimension
    batched = torch.func.vmap(lambda x: qkv.attention(x, k, v))(stacked_q)
    for i in range(2):
        want = qkv.attention(stacked_q[i], k, v)
        torch.testing.assert_close(batched[i], want, rtol=1e-5, atol=1e-5)
    with fwad.dual_level():
        dual = fwad.make_dual(q, torch.ones_like(q))
        p = build_problem(dual, k, v)
        assert not p.direct and native.unsupported(p) is not None
    traced = torch.compile(lambda a, b, c: qkv.attention(a, b, c), backend="eager", fullgraph=True)
    torch.testing.assert_close(traced(q, k, v), qkv.attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_a_build_that_raises_falls_back(monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(native, "_cache_dir", no_home)
    monkeypatch.setenv("QKV_NATIVE", "1")
    fn, why = native._build()
    assert fn is None
    if WHY is None:  # where a build can start, it must fail softly with the reason
        assert "home directory" in why


def test_isa_is_chosen_from_the_cpu_flags(monkeypatch):
    """The best ISA the flags offer; QKV_NATIVE_ISA narrows it; neither ISA says why."""
    monkeypatch.setattr(native.platform, "system", lambda: "Linux")
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("QKV_NATIVE_ISA", raising=False)
    cases = {
        frozenset({"avx512f", "avx2", "fma"}): "avx512",
        frozenset({"avx2", "fma"}): "avx2",
        frozenset({"avx2"}): None,  # AVX2 without FMA: not enough
        frozenset({"sse4_2"}): None,
    }
    for flags, want in cases.items():
        monkeypatch.setattr(native, "_cpu_flags", lambda f=flags: set(f))
        name, why = native.isa()
        assert name == want
        if want is None:
            assert why == "the CPU has neither AVX-512 nor AVX2 with FMA"
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx512f", "avx2", "fma"})
    monkeypatch.setenv("QKV_NATIVE_ISA", "avx2")
    assert native.isa() == ("avx2", None)
    monkeypatch.setattr(native, "_cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setenv("QKV_NATIVE_ISA", "avx512")
    assert native.isa() == (None, "QKV_NATIVE_ISA=avx512 but the CPU has no avx512f")
    monkeypatch.setenv("QKV_NATIVE_ISA", "neon")
    assert "QKV_NATIVE_ISA must be one of ['avx2', 'avx512']" in native.isa()[1]
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert native.isa() == (None, "needs Linux on x86-64; this is Linux aarch64")


def _compiler_takes(flags) -> bool:
    cxx = native._compiler()
    if cxx is None:
        return False
    done = subprocess.run(
        [cxx, *flags, "-x", "c++", "-fsyntax-only", "-"], input="int main(){}", text=True,
        capture_output=True, timeout=60,
    )  # fmt: skip
    return done.returncode == 0


def test_the_other_isas_source_compiles(tmp_path):
    """An ISA this CPU lacks is not run here, but its build of native.cpp must compile, so
    that a machine without AVX-512 still catches a broken AVX-512 path (and vice versa)."""
    others = [name for name in native.ISAS if name not in HERE]
    if not others:
        pytest.skip(f"every ISA runs here ({', '.join(HERE)}): the tests above built them all")
    for name in others:
        flags = native.PORTABLE[name]
        if not _compiler_takes(flags):
            pytest.skip(f"the compiler cannot target {name} ({' '.join(flags)})")
        target = tmp_path / f"{name}.so"
        assert native.compile_source(target, flags) is None
        assert target.stat().st_size > 0


def test_a_broken_source_is_refused_at_compile_time(tmp_path, monkeypatch):
    """native.cpp refuses to build for a vector width it has no helpers for."""
    if native._compiler() is None:
        pytest.skip("no C++ compiler")
    why = native.compile_source(tmp_path / "x.so", ("-DQKV_VECTOR_BITS=128",))
    assert why is not None and "QKV_VECTOR_BITS must be 512 or 256" in why
    assert not list(tmp_path.iterdir())  # nothing half-written is left


@needs_native
def test_a_library_whose_layout_differs_is_refused(monkeypatch):
    """The Job structure is checked against the library's own layout before any call
    (the cached build of this process is read again, nothing is compiled)."""
    monkeypatch.setattr(native, "_layout", lambda: [1, 2, 3])
    fn, why = native._build()
    assert fn is None and "does not match native.py's Job layout" in why
    monkeypatch.undo()
    fn, why = native._build()  # the same cached file, with the real layout
    assert fn is not None and why is None


def test_asking_without_building_agrees_where_nothing_can_be_built():
    """Where no build can run, build=False gives the same reason (no "not built yet")."""
    if WHY is None:
        pytest.skip("the kernel builds here: test_build_is_cached_and_written_whole covers it")
    assert native.unavailable(build=False) == WHY


def test_the_quick_path_mirrors_the_fewest_rows_any_build_takes():
    from qkv import _validate

    assert native.MIN_ROWS == min(native.MIN_ROWS_BY_ISA.values()) == _validate._NATIVE_MIN_ROWS
    assert set(native.MIN_ROWS_BY_ISA) == set(native.ISAS)
