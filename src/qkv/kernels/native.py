"""The native kernel: a float32 attention forward in C++ (native.cpp), built on first use.

Letters: B batch, Hq query heads, Hkv key/value heads, Tq/Tk lengths, D/Dv head dims,
n blocks of r query rows.

torch's fused CPU kernel reaches about 70% of the machine's matrix-multiply speed on
long spans and about half of it on the short key spans of a sliding window's sub-blocks.
native.cpp computes blocks of up to 64 queries transposed, vectors across the queries,
so the softmax needs no reduction across lanes and both products are one register-
blocked kernel (see its header); measured on a 2-core AVX-512 machine it runs the dense
N=2048 forward ~10% faster than torch's, causal ~20%, and a 256-key window's sub-blocks
~25% faster (`qkv bench`, benchmarks/tile_sizes.py).

It serves two callers:
- this module's `run`, the "native" entry of the dispatch: float32 CPU forwards of at
  least 32 queries without a mask or with plain causal masking (Tq ≤ Tk), when no
  gradient is needed (torch's fused forward and backward run those), neither weights,
  bias nor dropout are asked, and the tensors are plain (no vmap, forward-mode AD,
  torch.compile tracing or subclass: `_types.plain_tensors`);
- the tiled kernel (stacked.py), for the float32 jobs of its plans.

The library is C++ with GCC vector extensions and AVX-512 intrinsics, compiled here with
the machine's own compiler (`c++ -O3 -march=native -fopenmp`, about 2 s, once; cached
under ~/.cache/qkv, or $QKV_CACHE_DIR, by a hash of the source, the compiler and the CPU
flags, and written by rename, so that no process loads half a file). It is an
accelerator, never a requirement: without a compiler, without AVX-512, if the build fails,
or with QKV_NATIVE=0, `unavailable()` says why and the fused and tiled kernels run on
torch's kernel alone. tests/test_native.py compares it with the NumPy float64 truth.
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

__all__ = ["MIN_ROWS", "ROWS", "forward", "run", "unavailable", "unsupported"]

_SOURCE = Path(__file__).with_name("native.cpp")
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-fopenmp", "-shared", "-fPIC"]

# Query rows per block of the native kernel's own problems: the kernel computes 64 at a
# time (four 16-float vectors against each broadcast key element).
ROWS = 64

# Fewest queries (per batch and head, or per block of a tiled job) worth the native kernel:
# its vectors run across queries, so few queries leave lanes idle. Against 2048 and 32,768
# keys (B=4, H=8) it was 1.1-4× slower than torch's kernel below 32 queries (decoding) and
# 0.94-0.99× at 32.
MIN_ROWS = 32

_lock = threading.Lock()
_state: dict[str, object] = {}  # "fn": the loaded function, "why": why there is none


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    root = os.environ.get("QKV_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "qkv"


def _compile(cxx: str, target: Path) -> str | None:
    """Build the library at `target`; None, or why it failed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as err:
        return f"cannot write to {target.parent}: {err}"
    try:
        done = subprocess.run(
            [cxx, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            return f"{cxx} failed: {done.stderr.strip()[-400:]}"
        os.replace(tmp, target)  # atomic: another process sees no file or the whole one
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return f"{cxx} failed: {err}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> tuple[object | None, str | None]:
    """(the loaded forward function, None) or (None, why there is none); never raises."""
    try:
        return _try_build()
    except Exception as err:  # an accelerator, never a requirement: fall back, say why
        return None, f"building the native kernel failed: {type(err).__name__}: {err}"


def _try_build() -> tuple[object | None, str | None]:
    if os.environ.get("QKV_NATIVE", "1") == "0":
        return None, "disabled by QKV_NATIVE=0"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None, f"needs Linux on x86-64; this is {platform.system()} {platform.machine()}"
    flags = _cpu_flags()
    if "avx512f" not in flags:
        return None, "the CPU has no AVX-512"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler on PATH (c++, g++ or $CXX)"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"{cxx} --version failed: {err}"
    key = hashlib.sha256(
        b"\0".join(
            text if isinstance(text, bytes) else text.encode()
            for text in (
                _SOURCE.read_bytes(),
                version.stdout,
                " ".join(_FLAGS),
                " ".join(sorted(flags)),
            )
        )
    ).hexdigest()[:16]
    target = _cache_dir() / f"native-{key}.so"
    if not target.exists():
        why = _compile(cxx, target)
        if why is not None:
            return None, why
    try:
        fn = ctypes.CDLL(str(target)).qkv_native_forward
    except (OSError, AttributeError) as err:
        return None, f"loading {target} failed: {err}"
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [P] * 6 + [I] * 2 + [P] * 6 + [I] * 11 + [C] * 6 + [ctypes.c_float, C]
    fn.restype = C
    return fn, None


def _function():
    if not _state:  # built (or refused) once per process; read without the lock after
        with _lock:
            if not _state:
                fn, why = _build()
                _state.update(fn=fn, why=why)
    return _state["fn"]


def unavailable() -> str | None:
    """Why the native kernel cannot run on this machine (None: it can)."""
    _function()
    return _state["why"]  # type: ignore[return-value]


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
    float32 contiguous, rp = rows rounded up to 16; with tail > 0 it covers only the last
    `tail` keys of each block (the others all visible) and is (Bm, n|1, Hm, tail, rp).
    out (B, Tq, Hq, Dv) and lse (B, Tq, Hq) float32 (unit last stride for out) receive
    each block's rows: out 0 and lse -inf where a row sees no key.
    """
    fn = _function()
    if fn is None:
        raise RuntimeError(f"the native kernel is unavailable: {_state['why']}")
    B, H, _, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    group = H // Hkv
    qo, q_row = _offsets(q, B, H, q0, (0, 2, 1))
    ko, k_row = _offsets(k, B, H, k0, (0, 2, 1), group)
    vo, v_row = _offsets(v, B, H, k0, (0, 2, 1), group)
    oo, o_row = _offsets(out, B, H, q0, (0, 1, 2))
    lo, l_row = _offsets(lse, B, H, q0, (0, 1, 2))
    m_ptr, m_step, m_offs = None, 0, [0] * (B * H)
    if mask_t is not None:  # (Bm, n|1, Hm, ...): batch and head broadcast when 1
        Bm, nm, Hm = mask_t.shape[:3]
        sb, sh = mask_t.stride(0), mask_t.stride(2)
        m_ptr, m_step = mask_t.data_ptr(), (mask_t.stride(1) if nm > 1 else 0)
        m_offs = [min(b, Bm - 1) * sb + min(h, Hm - 1) * sh for b in range(B) for h in range(H)]
    mo = (ctypes.c_int64 * len(m_offs))(*m_offs)
    items = B * H * n
    work = items * rows * (keys + grow * n // 2) * (D + Dv)
    threads = torch.get_num_threads() if work >= _PARALLEL_WORK else 1
    status = fn(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), m_ptr, out.data_ptr(), lse.data_ptr(),
        items, n, qo, ko, vo, mo, oo, lo,
        sq * q_row, sk * k_row, sk * v_row, m_step, sq * o_row, sq * l_row,
        q_row, k_row, v_row, o_row, l_row,
        rows, keys, grow, tail, D, Dv, float(scale), threads,
    )  # fmt: skip
    if status != 0:
        raise MemoryError("the native kernel could not allocate its per-thread buffers")


def unsupported(p: Problem) -> str | None:
    """Why the native kernel cannot run the problem, or None when it can."""
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
    if not p.direct:
        return "inside vmap, forward-mode AD or torch.compile, or a tensor subclass"
    if p.dtype != torch.float32:
        return "float32 only"
    if p.device.type != "cpu":
        return "CPU only"
    if p.needs_grad:
        return "gradients: torch's fused forward and backward run as a pair"
    why = unavailable()
    return None if why is None else f"not built here: {why}"


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous (all the kernels need), else a copy."""
    return x if x.stride(-1) == 1 and x.shape[-1] > 0 else x.contiguous()


@functools.lru_cache(maxsize=8)
def _diagonal(r: int) -> torch.Tensor:
    """The causal diagonal tile of a block of r rows, transposed, as the kernel reads it:
    key u of the tail (rows) is visible to query t (columns) when u ≤ t."""
    rp = -(-r // 16) * 16
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
