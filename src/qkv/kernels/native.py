"""The native kernel: a float32 attention forward in C++ (native.cpp), built on first use.

Letters: B batch, Hq query heads, Hkv key/value heads, Tq/Tk lengths, D/Dv head dims,
n blocks of r query rows.

torch's fused CPU kernel reaches about 70% of the machine's matrix-multiply speed on
long spans and about half of it on the short key spans of a sliding window's sub-blocks.
native.cpp computes blocks of up to 4 vectors of queries transposed, vectors across the
queries, so the softmax needs no reduction across lanes and both products are one
register-blocked kernel (see its header); measured on a 2-core AVX-512 machine it runs the
dense N=2048 forward ~10% faster than torch's, causal ~20%, and a 256-key window's
sub-blocks ~25% faster (`qkv bench`, benchmarks/tile_sizes.py).

It serves two callers:
- this module's `run`, the "native" entry of the dispatch: float32 CPU forwards of at
  least min_rows() queries without a mask or with plain causal masking (Tq ≤ Tk), when no
  gradient is needed (torch's fused forward and backward run those), neither weights,
  bias nor dropout are asked, and the tensors are plain (no vmap, forward-mode AD,
  torch.compile tracing or subclass: `_types.plain_tensors`);
- the tiled kernel (stacked.py), for the float32 jobs of its plans.

One source, two instruction sets (`ISAS`): AVX-512 (16 floats a vector) and AVX2 + FMA (8),
the vector width a compile-time parameter (QKV_VECTOR_BITS). The best one the CPU's flags
offer is built, with the machine's own compiler (`c++ -O3 -march=native -fopenmp`, about
2 s, once, on the first call that would run it; or ahead of time by `build()`), cached under
~/.cache/qkv (or $QKV_CACHE_DIR) by a hash of the source, the ISA, the compiler and the CPU
flags, and written by rename, so that no process loads half a file. QKV_NATIVE_ISA=avx2
asks for the narrower build on a machine that has both (tests and benchmarks measure both).
It is an accelerator, never a requirement: without a compiler, without either ISA (ARM,
older x86), if the build fails, or with QKV_NATIVE=0, `unavailable()` says why and the fused
and tiled kernels run on torch's kernel alone. `unavailable(build=False)` answers without
compiling anything ("not built yet" until a call needed it): what `qkv.explain` says.
The call is one `Job` structure, whose layout native.cpp reports when it is loaded (a
mismatch refuses the library instead of corrupting memory). tests/test_native.py compares
the kernel with the NumPy float64 truth on each ISA the machine has.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .._types import AttentionOutput, Problem

__all__ = [
    "ISAS",
    "MIN_ROWS",
    "MIN_ROWS_BY_ISA",
    "ROWS",
    "build",
    "forward",
    "isa",
    "min_rows",
    "run",
    "unavailable",
    "unsupported",
]

_SOURCE = Path(__file__).with_name("native.cpp")
_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-Wfatal-errors"]

# Instruction sets native.cpp is written for, best first: the CPU flags each needs, and the
# compiler flags of the build on a machine that has them (-march=native tunes for the
# machine; the AVX2 build turns AVX-512 off so that it runs as on an AVX2-only CPU).
ISAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512": (("avx512f",), ("-march=native", "-DQKV_VECTOR_BITS=512")),
    "avx2": (("avx2", "fma"), ("-march=native", "-mno-avx512f", "-DQKV_VECTOR_BITS=256")),
}
# The same source built for a CPU that need not be this one: what a test compiles to
# check the other ISA's code on a machine without it (the result is never loaded).
PORTABLE = {
    "avx512": ("-march=x86-64-v4", "-DQKV_VECTOR_BITS=512"),
    "avx2": ("-march=x86-64-v3", "-DQKV_VECTOR_BITS=256"),
}

# Query rows per block of the native kernel's own problems (`run`): a multiple of what
# native.cpp computes at a time (64 with AVX-512, 32 with AVX2).
ROWS = 64

# Fewest queries (per batch and head, or per block of a tiled job) worth the native kernel,
# per ISA: its vectors run across queries, so few queries leave lanes idle. Against 2048
# and 32,768 keys (B=4, H=8; 2026-12-01, Zen 4) the AVX-512 build took 1.4-1.6× torch's
# time at 16 queries, 0.83-0.97× at 24 and 0.72× at 32; the AVX2 build, with vectors
# half as wide, 0.74-0.92× already at 16.
MIN_ROWS_BY_ISA = {"avx512": 32, "avx2": 16}
MIN_ROWS = min(MIN_ROWS_BY_ISA.values())  # the fewest any build takes (a cheap pre-filter)


def min_rows() -> int:
    """Fewest queries the native kernel takes with this machine's build."""
    return MIN_ROWS_BY_ISA.get(isa()[0] or "", max(MIN_ROWS_BY_ISA.values()))


# Columns of a transposed mask tile (native.forward's mask_t) are rows rounded up to this:
# a whole number of vectors on either ISA.
MASK_ALIGN = 16


class Job(ctypes.Structure):
    """One call of native.cpp's kernel: `qkv_native_job` there, field for field."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("q", "k", "v", "mask", "out", "lse")),
        *((name, ctypes.c_void_p) for name in ("q_off", "k_off", "v_off", "m_off", "o_off")),
        ("l_off", ctypes.c_void_p),
        ("n_items", ctypes.c_int64),
        ("n_blocks", ctypes.c_int64),
        *((f"{t}_step", ctypes.c_int64) for t in "qkvmol"),
        *((f"{t}_row", ctypes.c_int64) for t in "qkvmol"),
        *((name, ctypes.c_int32) for name in ("r", "nk", "grow", "tail", "D", "Dv")),
        ("scale", ctypes.c_float),
        ("threads", ctypes.c_int32),
    ]


def _layout() -> list[int]:
    """sizeof(Job) and each field's offset, as native.cpp's qkv_native_layout gives them."""
    return [ctypes.sizeof(Job)] + [getattr(Job, name).offset for name, _ in Job._fields_]


_lock = threading.Lock()
_state: dict[str, tuple[object | None, str | None]] = {}  # ISA -> (function, why not)


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (read once: dispatch asks on every call)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    root = os.environ.get("QKV_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "qkv"


def isa() -> tuple[str | None, str | None]:
    """(the ISA this machine's build uses, None) or (None, why there is none).

    The best of `ISAS` the CPU has, or the one QKV_NATIVE_ISA names if the CPU has it.
    Reads /proc/cpuinfo only: compiles nothing.
    """
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None, f"needs Linux on x86-64; this is {platform.system()} {platform.machine()}"
    flags = _cpu_flags()
    asked = os.environ.get("QKV_NATIVE_ISA", "").strip().lower()
    if asked and asked not in ISAS:
        return None, f"QKV_NATIVE_ISA must be one of {sorted(ISAS)}; got {asked!r}"
    for name in [asked] if asked else list(ISAS):
        needs = ISAS[name][0]
        if all(f in flags for f in needs):
            return name, None
        if asked:
            return None, f"QKV_NATIVE_ISA={asked} but the CPU has no {'/'.join(needs)}"
    return None, "the CPU has neither AVX-512 nor AVX2 with FMA"


def compile_source(target: Path, flags: tuple[str, ...], cxx: str | None = None) -> str | None:
    """Build native.cpp with `flags` into the shared library `target`; None, or why it
    failed. Written to a temporary file and renamed: another process sees no file or the
    whole one."""
    cxx = cxx or _compiler()
    if cxx is None:
        return "no C++ compiler on PATH (c++, g++ or $CXX)"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as err:
        return f"cannot write to {target.parent}: {err}"
    try:
        done = subprocess.run(
            [cxx, *_FLAGS, *flags, "-o", tmp, str(_SOURCE)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if done.returncode != 0:
            return f"{cxx} failed: {done.stderr.strip()[-400:]}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return f"{cxx} failed: {err}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(name: str | None = None) -> tuple[object | None, str | None]:
    """(the loaded forward function, None) or (None, why there is none); never raises."""
    try:
        return _try_build(name)
    except Exception as err:  # an accelerator, never a requirement: fall back, say why
        return None, f"building the native kernel failed: {type(err).__name__}: {err}"


def _try_build(name: str | None) -> tuple[object | None, str | None]:
    if os.environ.get("QKV_NATIVE", "1") == "0":
        return None, "disabled by QKV_NATIVE=0"
    if name is None:
        name, why = isa()
        if name is None:
            return None, why
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler on PATH (c++, g++ or $CXX)"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"{cxx} --version failed: {err}"
    flags = (*_FLAGS, *ISAS[name][1])
    parts = (_SOURCE.read_bytes(), version.stdout, " ".join(flags), " ".join(sorted(_cpu_flags())))
    key = hashlib.sha256(b"\0".join(t if isinstance(t, bytes) else t.encode() for t in parts))
    target = _cache_dir() / f"native-{name}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        why = compile_source(target, ISAS[name][1], cxx)
        if why is not None:
            return None, why
    try:
        lib = ctypes.CDLL(str(target))
        fn, layout = lib.qkv_native_forward, lib.qkv_native_layout
    except (OSError, AttributeError) as err:
        return None, f"loading {target} failed: {err}"
    want = _layout()
    got = (ctypes.c_int64 * len(want))()
    layout.argtypes, layout.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int
    if layout(got, len(want)) != len(want) or list(got) != want:
        return None, f"{target} does not match native.py's Job layout (a stale or foreign build)"
    fn.argtypes, fn.restype = [ctypes.POINTER(Job)], ctypes.c_int
    return fn, None


def _function():
    """The forward function of this machine's ISA, built (or refused) once per process."""
    name = isa()[0] or ""
    got = _state.get(name)
    if got is None:
        with _lock:
            got = _state.get(name)
            if got is None:
                got = _state[name] = _build(name or None)
    return got[0]


def build() -> str | None:
    """Build (or load from the cache) the native kernel now; None, or why it cannot run."""
    _function()
    return _state[isa()[0] or ""][1]


def unavailable(*, build: bool = True) -> str | None:
    """Why the native kernel cannot run on this machine (None: it can).

    build=True compiles it first if this process has not yet; build=False never compiles
    (for `qkv.explain` and dispatch checks) and says "not built yet" until something did.
    """
    if build:
        _function()
    name, why = isa()
    if name is None and os.environ.get("QKV_NATIVE", "1") != "0":
        return why
    got = _state.get(name or "")
    if got is None:
        if os.environ.get("QKV_NATIVE", "1") == "0":
            return "disabled by QKV_NATIVE=0"
        return f"not built yet ({name}; it compiles on the first call that runs it)"
    return got[1]


# Below this many multiply-adds (about 0.1 ms of work) a call runs on one thread: waking
# the others costs more than it saves.
_PARALLEL_WORK = 1 << 24


def _offsets(x: torch.Tensor, B: int, H: int, t0: int, dims, group: int = 1):
    """(B·H,) element offsets of row t0 of each (b, h) of x, whose (batch, time, head)
    axes are `dims`; head h reads head h // group of x. Returns them and the row stride."""
    sb, st, sh = (x.stride(d) for d in dims)
    offs = [b * sb + (h // group) * sh + t0 * st for b in range(B) for h in range(H)]
    return (ctypes.c_int64 * len(offs))(*offs), st


def forward(
    q, k, v, out, lse, *, q0, k0, sq, sk, n, rows, keys, scale, mask_t=None, grow=0, tail=0
) -> None:
    """Run n blocks of every (batch, head); write out and lse in place.

    q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv): float32 CPU, unit last
    stride, any other strides; query head h reads key/value head h // (Hq / Hkv).
    Block i: queries q0 + i·sq .. + rows, keys k0 + i·sk .. + keys + i·grow.
    mask_t: None, or the additive mask (0 / -inf) transposed, (Bm, n|1, Hm, keys, rp)
    float32 with unit last stride, rp ≥ rows rounded up to MASK_ALIGN; with tail > 0 it
    covers only the last `tail` keys of each block (the others all visible) and is
    (Bm, n|1, Hm, tail, rp).
    out (B, Tq, Hq, Dv) and lse (B, Tq, Hq) float32 (unit last stride for out) receive
    each block's rows: out 0 and lse -inf where a row sees no key.
    """
    fn = _function()
    if fn is None:
        raise RuntimeError(f"the native kernel is unavailable: {unavailable(build=False)}")
    B, H, _, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    group = H // Hkv
    qo, q_row = _offsets(q, B, H, q0, (0, 2, 1))
    ko, k_row = _offsets(k, B, H, k0, (0, 2, 1), group)
    vo, v_row = _offsets(v, B, H, k0, (0, 2, 1), group)
    oo, o_row = _offsets(out, B, H, q0, (0, 1, 2))
    lo, l_row = _offsets(lse, B, H, q0, (0, 1, 2))
    m_ptr, m_step, m_row, m_offs = None, 0, 0, [0] * (B * H)
    if mask_t is not None:  # (Bm, n|1, Hm, ...): batch and head broadcast when 1
        Bm, nm, Hm = mask_t.shape[:3]
        if mask_t.stride(-1) != 1 or mask_t.shape[-1] < -(-rows // MASK_ALIGN) * MASK_ALIGN:
            raise ValueError(f"mask_t must be (..., keys, rows rounded up to {MASK_ALIGN})")
        sb, sh = mask_t.stride(0), mask_t.stride(2)
        m_ptr, m_row = mask_t.data_ptr(), mask_t.stride(-2)
        m_step = mask_t.stride(1) if nm > 1 else 0
        m_offs = [min(b, Bm - 1) * sb + min(h, Hm - 1) * sh for b in range(B) for h in range(H)]
    mo = (ctypes.c_int64 * len(m_offs))(*m_offs)
    items = B * H * n
    work = items * rows * (keys + grow * n // 2) * (D + Dv)
    job = Job(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), mask=m_ptr, out=out.data_ptr(),
        lse=lse.data_ptr(), q_off=ctypes.addressof(qo), k_off=ctypes.addressof(ko),
        v_off=ctypes.addressof(vo), m_off=ctypes.addressof(mo), o_off=ctypes.addressof(oo),
        l_off=ctypes.addressof(lo), n_items=items, n_blocks=n,
        q_step=sq * q_row, k_step=sk * k_row, v_step=sk * v_row, m_step=m_step,
        o_step=sq * o_row, l_step=sq * l_row,
        q_row=q_row, k_row=k_row, v_row=v_row, m_row=m_row, o_row=o_row, l_row=l_row,
        r=rows, nk=keys, grow=grow, tail=tail, D=D, Dv=Dv, scale=float(scale),
        threads=torch.get_num_threads() if work >= _PARALLEL_WORK else 1,
    )  # fmt: skip
    if fn(ctypes.byref(job)) != 0:
        raise MemoryError("the native kernel could not allocate its per-thread buffers")


def unsupported(p: Problem, *, build: bool = True) -> str | None:
    """Why the native kernel cannot run the problem, or None when it can.

    build=False (`qkv.explain`) compiles nothing: a kernel not built yet counts as one that
    can run, since the first call that needs it builds it.
    """
    if p.need_weights:
        return "weights come from the reference or tiled kernel"
    if p.bias is not None:
        return "a float bias is handled by the tiled or reference kernel"
    if p.dropout_p > 0.0:
        return "dropout runs on the tiled or reference kernel"
    if p.mask is not None and not (p.is_causal and p.Tq <= p.Tk):
        return "masks run on the tiled kernel (its float32 tiles use native code too)"
    if p.Tk == 0:
        return "no keys"
    if p.Tq < MIN_ROWS:
        return f"fewer than {MIN_ROWS} queries (decoding): torch's kernel is faster there"
    if not p.direct:  # before anything that reads the machine: tracing must not reach it
        return "inside vmap, forward-mode AD or torch.compile, or a tensor subclass"
    if p.Tq < min_rows():
        return f"fewer than {min_rows()} queries (decoding): torch's kernel is faster there"
    if p.dtype != torch.float32:
        return "float32 only"
    if p.device.type != "cpu":
        return "CPU only"
    if p.needs_grad:
        return "gradients: torch's fused forward and backward run as a pair"
    why = unavailable(build=build)
    if why is None or (not build and why.startswith("not built yet")):
        return None
    return f"not built here: {why}"


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (all the kernels need), else a copy."""
    return x if x.stride(-1) == 1 and x.shape[-1] > 0 else x.contiguous()


@functools.lru_cache(maxsize=8)
def _diagonal(r: int) -> torch.Tensor:
    """The causal diagonal tile of a block of r rows, transposed, as the kernel reads it:
    key u of the tail (rows) is visible to query t (columns) when u ≤ t."""
    rp = -(-r // MASK_ALIGN) * MASK_ALIGN
    u = torch.arange(r, device="cpu")[:, None]
    t = torch.arange(rp, device="cpu")[None, :]
    tile = torch.zeros(r, rp, dtype=torch.float32, device="cpu")
    tile.masked_fill_(u > t, float("-inf"))
    return tile.reshape(1, 1, 1, r, rp)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> AttentionOutput:
    q, k, v = (unit_stride(t) for t in (q, k, v))
    # explicit dtype and device: the kernel writes CPU float32, whatever torch's defaults
    out = torch.empty(p.B, p.Tq, p.Hq, p.Dv, dtype=torch.float32, device="cpu")
    lse = torch.empty(p.B, p.Tq, p.Hq, dtype=torch.float32, device="cpu")
    causal = p.mask is not None
    off = p.Tk - p.Tq  # bottom-right: query t sees keys up to t + off
    full, rest = divmod(p.Tq, ROWS)
    for q0, n, rows in ((0, full, ROWS), (full * ROWS, 1 if rest else 0, rest)):
        if n == 0:
            continue
        if causal:  # block at q0 reads keys [0, q0 + off + rows); the last `rows` masked
            forward(
                q, k, v, out, lse, q0=q0, k0=0, sq=rows, sk=0, n=n, rows=rows,
                keys=q0 + off + rows, grow=rows, tail=rows, mask_t=_diagonal(rows),
                scale=p.scale,
            )  # fmt: skip
        else:
            forward(
                q, k, v, out, lse, q0=q0, k0=0, sq=rows, sk=0, n=n, rows=rows, keys=p.Tk,
                scale=p.scale,
            )  # fmt: skip
    return AttentionOutput(
        output=out.transpose(1, 2),  # (B, Hq, Tq, Dv), token-major like torch's
        lse=lse.transpose(1, 2) if p.need_lse else None,
    )
