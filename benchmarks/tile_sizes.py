"""Measure the tiled kernel's tile sizes: `python benchmarks/tile_sizes.py [--quick]`.

For each workload, times the tiled kernel forward (and forward+backward) with several
(block_q, block_k) pairs, interleaved, medians; then, with the default tiles, the rows of
the sub-blocks masked blocks are refined into (forward; 256 = not refined). The defaults
of qkv.kernels.TileConfig (block_q, block_k, refine_rows) are chosen from these tables.
The first line names the machine and the native kernel's ISA: float32 forward tiles run on
it, so the tables differ between AVX-512 and AVX2 (`QKV_NATIVE_ISA=avx2` measures the
AVX2 build on a machine that has both).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qkv import masks
from qkv._validate import build_problem
from qkv.kernels import TileConfig, tiled

SIZES = [(64, 64), (128, 64), (128, 128), (256, 64), (256, 128), (256, 256), (512, 128)]
REFINE_ROWS = [16, 32, 64, 128, 256]
DEFAULT_ROWS = TileConfig().refine_rows


def workloads(quick: bool):
    s = 4 if quick else 1
    T = 16384 // s
    ids = (torch.arange(T) * 4 // T)[None]
    return {
        "window 256": (1, 4, T, masks.window(255), False),
        "window 1024": (1, 4, T, masks.window(1023), False),
        "4 documents causal": (1, 4, T, masks.document(ids), True),
        "causal + lse": (1, 8, 4096 // s, None, True),
    }


def time_sizes(B, H, T, mask, causal, backward, repeats, configs=None):
    """Median seconds per config: (block_q, block_k) or (block_q, block_k, refine_rows)."""
    configs = configs or SIZES
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, 64, generator=g).requires_grad_(backward) for _ in range(3))
    p = build_problem(q, k, v, mask=mask, causal=causal, return_lse=True)

    def once(bq, bk, rows=DEFAULT_ROWS):
        config = TileConfig(block_q=bq, block_k=bk, refine_rows=rows)
        t0 = time.perf_counter()
        out = tiled.run(q, k, v, p, config=config).output
        if backward:
            out.sum().backward()
        return time.perf_counter() - t0

    for config in configs:
        once(*config)
    times = {config: [] for config in configs}
    for _ in range(repeats):
        for config in configs:
            times[config].append(once(*config))
    return {size: statistics.median(ts) for size, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from qkv.bench import machine_line

    print(machine_line() + "\n")
    print("| workload | pass | " + " | ".join(f"{bq}×{bk}" for bq, bk in SIZES) + " |")
    print("|---|---|" + "---:|" * len(SIZES))
    for name, (B, H, T, mask, causal) in workloads(args.quick).items():
        for backward in (False, True):
            t = time_sizes(B, H, T, mask, causal, backward, args.repeats)
            best = min(t.values())
            cells = [f"{1e3 * t[s]:.0f}{'*' if t[s] == best else ''}" for s in SIZES]
            label = "fwd+bwd" if backward else "fwd"
            print(f"| {name} (T={T}) | {label} | " + " | ".join(cells) + " |", flush=True)
    head = " | ".join(f"{r} rows" for r in REFINE_ROWS)
    print(f"\n| workload (256×256 tiles, fwd) | {head} |")
    print("|---|" + "---:|" * len(REFINE_ROWS))
    for name, (B, H, T, mask, causal) in workloads(args.quick).items():
        configs = [(256, 256, rows) for rows in REFINE_ROWS]
        t = time_sizes(B, H, T, mask, causal, False, args.repeats, configs)
        best = min(t.values())
        cells = [f"{1e3 * t[c]:.0f}{'*' if t[c] == best else ''}" for c in configs]
        print(f"| {name} (T={T}) | " + " | ".join(cells) + " |", flush=True)
    print("\ntimes in ms, * = fastest")


if __name__ == "__main__":
    main()
