"""Why attention divides the scores by sqrt(d_k), measured: `python benchmarks/sqrt_dk.py`.

Letters: N sampled queries, T keys per query, D = d_k the head dim.

For q and k with independent unit-variance components, q·k = Σ_d q_d k_d is a sum of D
terms of variance 1: its variance is D, its standard deviation sqrt(D). Unscaled, the
scores of a D = 512 head spread over about ±45, and the softmax over them puts nearly all
the weight on one key; that is a saturated softmax, and its Jacobian

    ∂p/∂s = diag(p) - p pᵀ,    ‖·‖_F² = Σ p_i² - 2 Σ p_i³ + (Σ p_i²)²   (closed form)

vanishes as p becomes one-hot, so almost no gradient reaches the scores, and through them
W_q and W_k (Vaswani et al. 2017, §3.2.1, footnote 4). Divided by sqrt(D) the scores have
unit variance whatever D is, and the softmax and its gradient behave the same at every D.

For each D the script samples N queries and N·T keys, and reports the measured standard
deviation of q·k (against sqrt(D)) and of q·k/sqrt(D), and with and without the scaling
the mean largest weight, the mean entropy of the weights (in nats; uniform is log T) and
the mean Frobenius norm of the softmax Jacobian. docs/concepts.md shows one run.

    python benchmarks/sqrt_dk.py [--keys 64] [--samples 2000] [--seed 0] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import torch

DIMS = (8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class Row:
    """One head dim D: the scores' spread and the softmax with and without 1/sqrt(D)."""

    D: int
    std_qk: float  # measured std of q·k; the formula says sqrt(D)
    std_scaled: float  # measured std of q·k / sqrt(D); the formula says 1
    max_weight: float  # mean largest softmax weight, unscaled scores
    max_weight_scaled: float  # the same with scaled scores
    entropy: float  # mean entropy of the weights in nats (uniform: log T), unscaled
    entropy_scaled: float
    grad: float  # mean ‖∂softmax/∂scores‖_F, unscaled
    grad_scaled: float
    saturated: float  # share of rows whose largest weight exceeds 0.99, unscaled
    saturated_scaled: float
    dead: float  # share of rows whose Jacobian norm is below 0.01 (no gradient), unscaled
    dead_scaled: float


def jacobian_norm(p: torch.Tensor) -> torch.Tensor:
    """‖diag(p) - p pᵀ‖_F for each row of p (..., T): the softmax's Jacobian at p.

    Entry (i, j) is p_i δ_ij - p_i p_j, so the sum of squares is Σ_i (p_i - p_i²)² +
    Σ_{i≠j} p_i² p_j² = Σ p² - 2 Σ p³ + (Σ p²)². Returns (...).
    """
    p2 = (p * p).sum(-1)
    p3 = (p * p * p).sum(-1)
    return (p2 - 2 * p3 + p2 * p2).clamp(min=0).sqrt()


def _softmax_stats(scores: torch.Tensor) -> tuple[float, float, float, float, float]:
    """Over the rows of softmax(scores (N, T)): the mean largest weight, mean entropy (nats),
    mean Jacobian norm, share of rows with a weight above 0.99, share of Jacobian norms below
    0.01."""
    logp = torch.log_softmax(scores, dim=-1)  # (N, T): exact even when p underflows
    p = logp.exp()
    entropy = -(p * logp).sum(-1)  # (N,)
    top, jac = p.amax(-1), jacobian_norm(p)  # (N,) each
    return (
        float(top.mean()), float(entropy.mean()), float(jac.mean()),
        float((top > 0.99).double().mean()), float((jac < 0.01).double().mean()),
    )  # fmt: skip


def measure(D: int, *, keys: int = 64, samples: int = 2000, seed: int = 0) -> Row:
    """Sample `samples` queries (D,) and `keys` keys each, components N(0, 1), float64."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + D)
    parts = []
    for start in range(0, samples, 256):  # chunks: 256 x T x 512 float64 is 64 MiB at most
        n = min(256, samples - start)
        q = torch.randn(n, 1, D, generator=g, dtype=torch.float64)  # (n, 1, D)
        k = torch.randn(n, keys, D, generator=g, dtype=torch.float64)  # (n, T, D)
        parts.append((q * k).sum(-1))  # (n, T): q·k
    scores = torch.cat(parts)  # (N, T)
    scaled = scores / math.sqrt(D)
    raw, sc = _softmax_stats(scores), _softmax_stats(scaled)
    pairs = [value for pair in zip(raw, sc, strict=True) for value in pair]
    return Row(D, float(scores.std()), float(scaled.std()), *pairs)


def table(rows: list[Row], keys: int) -> str:
    """The rows as a Markdown table."""
    lines = [
        f"| D | std(q·k) | √D | std(q·k/√D) | max weight: q·k / q·k/√D "
        f"| entropy (log T = {math.log(keys):.2f}): q·k / q·k/√D "
        "| ‖∂softmax/∂s‖: q·k / q·k/√D | rows with a weight > 0.99 "
        "| rows with ‖∂softmax/∂s‖ < 0.01 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.D} | {r.std_qk:.2f} | {math.sqrt(r.D):.2f} | {r.std_scaled:.3f} "
            f"| {r.max_weight:.3f} / {r.max_weight_scaled:.3f} "
            f"| {r.entropy:.2f} / {r.entropy_scaled:.2f} "
            f"| {r.grad:.3f} / {r.grad_scaled:.3f} "
            f"| {r.saturated:.1%} / {r.saturated_scaled:.1%} | {r.dead:.1%} / {r.dead_scaled:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=64, help="T, keys per query (default 64)")
    parser.add_argument("--samples", type=int, default=2000, help="N queries per D")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS), help="head dims D")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.keys < 2 or args.samples < 2 or min(args.dims) < 1:
        parser.error("--keys and --samples must be >= 2 and every D >= 1")
    rows = [measure(D, keys=args.keys, samples=args.samples, seed=args.seed) for D in args.dims]
    print(f"{args.samples} queries x {args.keys} keys per D, components N(0, 1), seed {args.seed}")
    print(table(rows, args.keys))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"keys": args.keys, "samples": args.samples,
                       "rows": [asdict(r) for r in rows]}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
