"""Per-call cost of `qkv.attention` on a decode step, against a direct SDPA call.

A decoder generating token by token calls attention once per layer per token with one
query against the cache (Tq = 1, Tk = 128, H = 8, D = 64 here): at that size the call's
overhead (validation, mask handling, kernel choice) is most of its time, so it is
measured against torch's own `scaled_dot_product_attention` given the same problem:

    no mask         qkv.attention(q, k, v)                   vs sdpa(q, k, v)
    causal=True     qkv.attention(q, k, v, causal=True)      vs sdpa(q, k, v)   (Tq = 1: all keys)
    key padding     qkv.attention(q, k, v, mask=padding)     vs sdpa(..., attn_mask=(B,1,1,Tk) bool)
    a reused plan   qkv.attention(q, k, v, mask=plan)        (a window's TilePlan, built once)

Contenders are interleaved (one batch of calls each, round after round) and the median
per-call time over the rounds is reported, so that the noise of a shared machine hits
all of them alike.

    PYTHONPATH=src python benchmarks/dispatch_cost.py [--rounds 30] [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import qkv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    B, H, Tk, D = args.batch, 8, 128, 64
    q = torch.randn(B, H, 1, D)
    k, v = torch.randn(B, H, Tk, D), torch.randn(B, H, Tk, D)
    lengths = torch.tensor([100 + 7 * b for b in range(B)])
    padding = qkv.masks.padding(lengths)
    bool_mask = (torch.arange(Tk) < lengths[:, None])[:, None, None]  # (B, 1, 1, Tk)
    window = qkv.masks.window(63)
    plan = window.plan(1, Tk) if hasattr(window, "plan") else window  # older qkv: no plans
    contenders = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa bool mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask),
        "qkv": lambda: qkv.attention(q, k, v),
        "qkv causal": lambda: qkv.attention(q, k, v, causal=True),
        "qkv padding": lambda: qkv.attention(q, k, v, mask=padding),
        "qkv window plan": lambda: qkv.attention(q, k, v, mask=plan),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.inference_mode():
        for fn in contenders.values():  # warm up: first calls build, load, allocate
            for _ in range(20):
                fn()
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / args.calls)
    med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    threads = torch.get_num_threads()
    print(f"decode step B={B}, H={H}, Tq=1, Tk={Tk}, D={D}, float32, {threads} threads; ")
    print(f"median of {args.rounds} rounds × {args.calls} calls")
    for name, us in med.items():
        print(f"  {name:16s} {us:7.1f} µs")
    print(f"  qkv / sdpa                 {med['qkv'] / med['sdpa']:.2f}×")
    print(f"  qkv causal / sdpa          {med['qkv causal'] / med['sdpa']:.2f}×")
    print(f"  qkv padding / sdpa mask    {med['qkv padding'] / med['sdpa bool mask']:.2f}×")


if __name__ == "__main__":
    main()
