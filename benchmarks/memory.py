"""Peak memory of long-sequence attention: `python benchmarks/memory.py [--tokens N]`.

Runs forward and backward of causal attention over packed documents (default: 65,536
tokens in 4 documents, H=1, D=64) in a fresh subprocess and reports the peak resident
memory above what the inputs themselves take; then checks sampled output rows against
the reference computed for those rows alone (`qkv.attention_weights`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(tokens: int, docs: int, kernel: str) -> dict:
    import torch

    import qkv

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, tokens, 64, requires_grad=True) for _ in range(3))
    ids = (torch.arange(tokens) * docs // tokens)[None]
    mask = qkv.masks.document(ids)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, inputs allocated
    t0 = time.perf_counter()
    out = qkv.attention(q, k, v, mask=mask, causal=True, kernel=kernel)
    out.backward(torch.ones_like(out))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = [0, 1, tokens // docs - 1, tokens // docs, tokens // 2 + 7, tokens - 1]
    with torch.no_grad():
        w = qkv.attention_weights(q, k, rows=rows, mask=mask, causal=True)  # (1, 1, r, T)
        want = w @ v  # (1, 1, r, 64)
        err = float((out[:, :, rows] - want).abs().max())
    return {
        "extra_mib": (peak - base) / 1024,
        "seconds": seconds,
        "max_row_error": err,
        "grad_finite": bool(torch.isfinite(q.grad).all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--kernel", default="tiled")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.tokens, args.docs, args.kernel)))
        return
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--tokens",
        str(args.tokens),
        "--docs",
        str(args.docs),
        "--kernel",
        args.kernel,
    ]
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    dense_gib = args.tokens**2 / 2**30
    print(
        f"{args.tokens} tokens, {args.docs} documents, causal, H=1, D=64, fwd+bwd "
        f"({args.kernel}): {result['seconds']:.2f} s, peak extra memory "
        f"{result['extra_mib']:.0f} MiB (a dense bool mask alone: {dense_gib:.1f} GiB), "
        f"max error on sampled rows {result['max_row_error']:.2e}, "
        f"gradients finite: {result['grad_finite']}"
    )


if __name__ == "__main__":
    main()
