"""Benchmarks: qkv against torch's own attention, measured in one process.

Letters: B batch, H heads, Tq/Tk lengths, D head dim.

Every case times its contenders *interleaved* (one call of each in turn, repeated, the
first of a round rotating) and reports medians, so that a slow moment of the machine hits
all of them alike. Contenders:

- qkv        `qkv.attention` with the structured mask (what a user writes)
- sdpa       torch's `scaled_dot_product_attention` where its own options express the case
- sdpa-mask  the same with the mask materialised as a dense bool (B, H|1, Tq, Tk) matrix
- flex       FlexAttention compiled with a block mask (compile time reported apart)
- naive      matmul · softmax · matmul with the dense mask (the textbook code)

"GEMM %" is the throughput of a contender on the FLOPs the mask actually needs (4·D per
allowed (query, key) pair forward, 2.5× that forward+backward), as a fraction of a large
matrix multiply measured in the same run (after a warm-up: a cold first multiply reads
up to 30% slower). "peak" is the resident memory one call adds above its inputs, measured
in a fresh process per contender (the dense mask of sdpa-mask and naive counts; flex's
compilation does not).

A GEMM is measured only for the dtypes of the cases selected. bfloat16 cases are skipped,
with the reason printed, on a machine whose bfloat16 matrix multiply is emulated (far slower
than its float32 one, as on CPUs without AVX512-BF16 or AMX); `--bf16` runs them anyway.
The "decode call" cases measure what one call costs beyond the arithmetic: a single query
against 128 keys, where validation and dispatch are most of the time.

    python -m qkv.bench            # the full suite (a few minutes on 2 cores)
    python -m qkv.bench --quick    # smaller sizes: under two minutes on 2 AVX2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import qkv
from qkv import masks
from qkv._argparse import OneLineParser
from qkv._bench_memory import memory_child, peak_memory
from qkv._bench_report import (
    check_output_dir,
    check_output_file,
    format_table,
    machine_line,
    plot_sweep,
)

__all__ = ["Case", "gemm_throughput", "main", "peak_memory", "run_case", "suite"]


@dataclass
class Case:
    """One benchmark: inputs, the mask in qkv's and torch's terms, and what to measure."""

    name: str
    B: int
    H: int
    Tq: int
    Tk: int
    D: int = 64
    dtype: torch.dtype = torch.float32
    mask: masks.Mask | None = None
    causal: bool = False  # qkv's (bottom-right) causal; torch's is_causal when Tq == Tk
    backward: bool = False
    flex: bool = False  # also time FlexAttention (compiles on first use)
    contenders: tuple[str, ...] = ("qkv", "sdpa", "sdpa-mask", "naive")
    repeats: int | None = None  # timed calls per contender, instead of the run's (tiny cases)
    results: dict = field(default_factory=dict)

    def allowed(self) -> torch.Tensor | None:
        """The dense bool mask torch needs, (Bm, 1, Tq, Tk); None if nothing is masked."""
        m = masks.combine(masks.causal() if self.causal else None, self.mask)
        if m is None:
            return None
        return m.submask(self.Tq, self.Tk, 0, self.Tq, 0, self.Tk)

    def pairs(self) -> float:
        """Allowed (query, key) pairs over batch and heads: what the arithmetic must cover."""
        allowed = self._count_allowed()
        return allowed * self.H

    def _count_allowed(self) -> float:
        m = masks.combine(masks.causal() if self.causal else None, self.mask)
        if m is None:
            return float(self.B * self.Tq * self.Tk)
        total = 0.0
        step = 1024  # count row blocks at a time: never the whole matrix in memory
        for q0 in range(0, self.Tq, step):
            q1 = min(q0 + step, self.Tq)
            total += float(
                m.submask(self.Tq, self.Tk, q0, q1, 0, self.Tk)
                .expand(self.B, 1, q1 - q0, self.Tk)
                .sum()
            )
        return total


def _inputs(c: Case, grad: bool):
    g = torch.Generator().manual_seed(0)
    shapes = [(c.B, c.H, c.Tq, c.D), (c.B, c.H, c.Tk, c.D), (c.B, c.H, c.Tk, c.D)]
    return [torch.randn(s, generator=g).to(c.dtype).requires_grad_(grad) for s in shapes]


def _naive(q, k, v, allowed):
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def _flex(c: Case):
    """A compiled FlexAttention call for the case, and the seconds compiling took."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    m = masks.combine(masks.causal() if c.causal else None, c.mask)
    dense = None if m is None else m.submask(c.Tq, c.Tk, 0, c.Tq, 0, c.Tk)[:, 0]  # (Bm,Tq,Tk)

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b if dense.shape[0] > 1 else 0, q_idx, kv_idx]

    block = None
    if dense is not None:
        block = create_block_mask(
            mask_mod,
            B=dense.shape[0] if dense.shape[0] > 1 else None,
            H=None,
            Q_LEN=c.Tq,
            KV_LEN=c.Tk,
            device="cpu",
        )
    compiled = torch.compile(flex_attention, dynamic=False)
    q, k, v = _inputs(c, c.backward)
    t0 = time.perf_counter()
    out = compiled(q, k, v, block_mask=block)
    if c.backward:
        out.sum().backward()
    return (lambda q, k, v: compiled(q, k, v, block_mask=block)), time.perf_counter() - t0


def _callables(c: Case, only: str | None = None) -> dict[str, Callable]:
    """The case's contenders (or just `only`) as callables of (q, k, v); flex apart."""
    wanted = set(c.contenders) if only is None else {only}
    allowed = c.allowed() if {"sdpa-mask", "naive"} & wanted else None
    torch_causal = c.causal and c.mask is None and c.Tq == c.Tk
    # bottom-right causal with one query sees every key: torch's unmasked call is the same
    decoding = c.causal and c.mask is None and c.Tq == 1
    calls: dict[str, Callable] = {}
    if "qkv" in wanted:
        calls["qkv"] = lambda q, k, v: qkv.attention(q, k, v, mask=c.mask, causal=c.causal)
    if "sdpa" in wanted and c.mask is None and (not c.causal or torch_causal or decoding):
        calls["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=torch_causal
        )
    if "sdpa-mask" in wanted and allowed is not None:
        calls["sdpa-mask"] = lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed
        )
    if "naive" in wanted:
        calls["naive"] = lambda q, k, v: _naive(q, k, v, allowed)
    return calls


def _time_interleaved(calls: dict[str, Callable], c: Case, repeats: int) -> dict[str, float]:
    # one set of inputs for every contender: separate copies land in different memory and
    # that alone moved memory-bound cases (decoding) by 20-30% between contenders
    q, k, v = _inputs(c, c.backward)

    def once(name):
        t0 = time.perf_counter()
        out = calls[name](q, k, v)
        if c.backward:
            out.backward(torch.ones_like(out))
            for t in (q, k, v):
                t.grad = None
        return time.perf_counter() - t0

    for name in calls:  # warm-up: first calls allocate and build caches
        once(name)
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(repeats):
        # start each round with a different contender: what one leaves behind (caches,
        # freed memory) then weighs on every contender in turn
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(once(name))
    return {name: statistics.median(ts) for name, ts in times.items()}


def gemm_throughput(
    dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 9, warmup: float = 1.0
) -> float:
    """FLOP/s of an n×n×n matrix multiply in `dtype` (median of `repeats`, after `warmup`
    seconds of warm-up: the first multiplies of a process run up to 30% slower)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    t0 = time.perf_counter()
    a @ b
    while time.perf_counter() - t0 < warmup:
        a @ b
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts)


def bf16_emulated(n: int = 256) -> str | None:
    """Why bfloat16 cases would measure an emulation rather than the hardware (its n³
    multiply below a quarter of float32's), or None when bfloat16 runs at speed. About
    0.1 s where bfloat16 is fast; bounded where it is emulated (one multiply of 2·n³
    FLOPs, ~25 ms at the ~1.4 GFLOP/s seen on an AVX2 machine)."""
    f32 = gemm_throughput(torch.float32, n, repeats=3, warmup=0.05)
    bf16 = gemm_throughput(torch.bfloat16, n, repeats=3, warmup=0.0)
    if bf16 < 0.25 * f32:
        return (
            f"bfloat16 matrix multiplies are emulated here ({bf16 / 1e9:.1f} GFLOP/s against "
            f"{f32 / 1e9:.0f} for float32 at {n}³): skipped, --bf16 runs them anyway"
        )
    return None


def run_case(c: Case, repeats: int, gemm: float, memory_quick: bool | None = None) -> Case:
    """Time the case's contenders; with `memory_quick` (the suite's quick flag) also
    measure each one's peak memory in a fresh process."""
    calls = _callables(c)
    compile_s = None
    if c.flex:
        try:
            calls["flex"], compile_s = _flex(c)
        except Exception as err:  # FlexAttention needs a compiler; report, do not fail
            c.results["flex-error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    medians = _time_interleaved(calls, c, c.repeats or repeats)
    flops = 4 * c.D * c.pairs() * (2.5 if c.backward else 1.0)
    base = medians.get("sdpa", medians.get("sdpa-mask"))
    for name, t in medians.items():
        c.results[name] = {
            "seconds": t,
            "vs_sdpa": (t / base) if base else None,
            "gemm_fraction": flops / t / gemm,
        }
    if memory_quick is not None:
        # each child measures only its own resident peak, so they can run side by side
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, min(len(medians), os.cpu_count() or 1))) as pool:
            peaks = pool.map(lambda name: peak_memory(c.name, name, memory_quick), medians)
            for name, peak in zip(medians, peaks, strict=True):
                c.results[name]["peak_mib"] = peak
    if compile_s is not None:
        c.results["flex-compile-seconds"] = compile_s
    return c


def suite(quick: bool) -> list[Case]:
    s = 4 if quick else 1  # quick runs shrink lengths
    docs_T = 16384 // s
    ids = (torch.arange(docs_T) * 4 // docs_T)[None]
    return [
        Case("dense", 1, 8, 2048 // s, 2048 // s, contenders=("qkv", "sdpa", "naive")),
        Case(
            "dense fwd+bwd",
            1,
            8,
            2048 // s,
            2048 // s,
            backward=True,
            contenders=("qkv", "sdpa", "naive"),
        ),
        Case("causal", 1, 8, 2048 // s, 2048 // s, causal=True),
        Case("causal fwd+bwd", 1, 8, 2048 // s, 2048 // s, causal=True, backward=True),
        Case(
            "window 256",
            1,
            4,
            16384 // s,
            16384 // s,
            mask=masks.window(255),
            flex=not quick,
            contenders=("qkv", "sdpa-mask"),
        ),
        Case(
            "window 256 fwd+bwd",
            1,
            4,
            16384 // s,
            16384 // s,
            mask=masks.window(255),
            backward=True,
            contenders=("qkv", "sdpa-mask"),
        ),
        Case(
            "4 documents, causal",
            1,
            4,
            docs_T,
            docs_T,
            mask=masks.document(ids),
            causal=True,
            flex=not quick,
            contenders=("qkv", "sdpa-mask"),
        ),
        Case(
            "padding",
            8,
            8,
            1024 // s,
            1024 // s,
            mask=masks.padding([1024 // s, 700 // s, 300 // s, 900 // s] * 2),
        ),
        Case("decode Tq=1", 4, 8, 1, 32768 // s, causal=True, contenders=("qkv", "sdpa")),
        Case(
            "decode Tq=1, window",
            4,
            8,
            1,
            32768 // s,
            mask=masks.window(1023),
            contenders=("qkv", "sdpa-mask"),
        ),
        # what one call costs beyond its arithmetic (a decoding step of one layer)
        Case("decode call", 1, 8, 1, 128, contenders=("qkv", "sdpa"), repeats=300),
        Case(
            "decode call, causal",
            1,
            8,
            1,
            128,
            causal=True,
            contenders=("qkv", "sdpa"),
            repeats=300,
        ),
        Case(
            "decode call, padding",
            4,
            8,
            1,
            128,
            mask=masks.padding([128, 100, 60, 1]),
            contenders=("qkv", "sdpa-mask"),
            repeats=300,
        ),
        Case(
            "dense bf16",
            1,
            8,
            2048 // s,
            2048 // s,
            dtype=torch.bfloat16,
            contenders=("qkv", "sdpa", "naive"),
        ),
    ]


def length_sweep(quick: bool, repeats: int) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Forward time against sequence length: causal (qkv, sdpa) and a 256-key window
    (qkv, sdpa with the dense mask), H=4, D=64."""
    lengths = [256, 512, 1024] if quick else [1024, 2048, 4096, 8192]
    sweeps: dict[str, dict[str, list[tuple[int, float]]]] = {"causal": {}, "window 256": {}}
    for T in lengths:
        for name, case in (
            ("causal", Case("causal", 1, 4, T, T, causal=True, contenders=("qkv", "sdpa"))),
            ("window 256", Case("window", 1, 4, T, T, mask=masks.window(255),
                                contenders=("qkv", "sdpa-mask"))),
        ):  # fmt: skip
            medians = _time_interleaved(_callables(case), case, repeats)
            for contender, seconds in medians.items():
                sweeps[name].setdefault(contender, []).append((T, seconds))
    return sweeps


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="qkv bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per contender")
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--out", default=None, help="write table.md, results.json and time_vs_length.png here"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory runs (a fresh process each)"
    )
    parser.add_argument(
        "--bf16", action="store_true", help="run bfloat16 cases even where bfloat16 is emulated"
    )
    parser.add_argument("--memory-of", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of is not None:  # the child of peak_memory
        print(memory_child(*args.memory_of, quick=args.quick))
        return 0
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    repeats = args.repeats or (3 if args.quick else 7)
    if args.only is not None and not args.only.strip():
        parser.error("--only must name (part of) a case; got an empty string")
    # where the results go is checked before minutes of measuring, not after
    if args.json is not None:
        check_output_file(parser, "--json", args.json)
    if args.out is not None:
        check_output_dir(parser, "--out", args.out)
    cases = [c for c in suite(args.quick) if args.only is None or args.only in c.name]
    if not cases:  # before anything is measured: a usage error answered at once
        names = ", ".join(repr(c.name) for c in suite(args.quick))
        parser.error(f"--only {args.only!r} matches no case; the cases are {names}")
    print(machine_line(), flush=True)
    if not args.bf16 and any(c.dtype == torch.bfloat16 for c in cases):
        why = bf16_emulated()
        if why is not None:
            for c in cases:
                if c.dtype == torch.bfloat16:
                    print(f"{c.name}: {why}", flush=True)
            cases = [c for c in cases if c.dtype != torch.bfloat16]
    gemm = {}
    for dtype in dict.fromkeys(c.dtype for c in cases):  # only the dtypes the cases use
        name = str(dtype).replace("torch.", "")
        gemm[name] = gemm_throughput(dtype, n=1024 if args.quick else 2048,
                                     warmup=0.3 if args.quick else 1.0)  # fmt: skip
        print(f"GEMM {name}: {gemm[name] / 1e9:.0f} GFLOP/s", flush=True)
    for i, c in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {c.name} ...", end=" ", flush=True)
        g = gemm[str(c.dtype).replace("torch.", "")]
        run_case(c, repeats, g, memory_quick=None if args.no_memory else args.quick)
        print(
            ", ".join(
                f"{k} {v['seconds'] * 1e3:.3g} ms"
                for k, v in c.results.items()
                if isinstance(v, dict)
            ),
            flush=True,
        )
    table = format_table(cases, gemm)
    print()
    print(table)
    results = {c.name: c.results for c in cases} | {"gemm": gemm}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(table + "\n")
        sweeps = length_sweep(args.quick, repeats)
        (out / "results.json").write_text(json.dumps(results | {"sweeps": sweeps}, indent=2))
        plot_sweep(sweeps, out / "time_vs_length.png")
        print(f"\nwrote {out / 'table.md'}, {out / 'results.json'}, {out / 'time_vs_length.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
