"""Why the Transformer replaced the RNN encoder-decoder, measured on this machine.

    python benchmarks/transformer_vs_rnn.py [--only curves steps paths conv] [--out DIR]

Letters: B batch, T sequence length, E width, H heads, K kernel size, d distance.

Four measurements, each written to DIR/results.json and printed; the figures go to DIR/*.png
(docs/transformer-vs-rnn.md shows one run):

- curves: `qkv demo`'s Transformer and `qkv demo --arch rnn` (GRU encoder-decoder with
  additive attention, about the same parameter count) trained with the same data, schedule
  and thread count; every `--eval-every` steps the exact match on held-out dates, against
  training seconds (evaluation time excluded). The runs alternate (T, R, T, R, ...) and the
  time to 99% is the median over `--repeats` runs of each.
- steps: seconds of one training step (forward + backward) of one self-attention layer
  (qkv.MultiHeadAttention), one GRU layer and one Conv1d layer (kernel 3), all of width E,
  against T, with 1 and 2 torch threads. Interleaved: every round times each (layer, T,
  threads) once; medians of the rounds.
- paths: ‖∂y_T/∂x_1‖ (Frobenius norm of the E×E Jacobian of the last output with respect to
  the first input) against the distance d = T - 1, for a randomly initialised GRU and a
  randomly initialised causal self-attention layer: T products of Jacobians in the GRU,
  one in attention. Medians over seeds.
- conv: a Conv1d of kernel K computed as attention: K heads, head h allowed only the key at
  offset h - K//2 (a fixed, position-only mask), values projected by the kernel's h-th
  matrix; and one head over qkv.masks.window(r, r) with a position-only bias, which is a
  normalised depthwise convolution. Both checked against torch's conv1d.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import qkv
from qkv.demo.train import DemoConfig, evaluate, prepare, set_threads, train

__all__ = [
    "conv_as_attention",
    "jacobian_last_first",
    "path_gradients",
    "smoothing_as_attention",
    "step_seconds",
    "training_curve",
]

# ---- curves: exact match against training time ------------------------------------------


def training_curve(config: DemoConfig, *, eval_every: int, eval_examples: int) -> dict:
    """Train `config` once; exact match on `eval_examples` held-out examples every
    `eval_every` steps, with the training seconds so far (evaluation not counted)."""
    train_set, heldout, src, tgt = prepare(config)
    probe = heldout[:eval_examples]
    points: list[dict] = []

    def on_step(step: int, seconds: float, model: nn.Module) -> None:
        if step % eval_every == 0 or step == config.steps:
            model.eval()
            em = evaluate(model, probe, src, tgt).exact_match
            points.append({"step": step, "seconds": seconds, "exact_match": em})

    result = train(config, train_set, src, tgt, progress=False, on_step=on_step)
    final = evaluate(result.model, heldout, src, tgt)
    first = next((p for p in points if p["exact_match"] >= 0.99), None)
    return {
        "arch": config.arch,
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "train_seconds": result.seconds,
        "exact_match": final.exact_match,
        "eval_examples": final.total,
        "points": points,
        "seconds_to_99": None if first is None else first["seconds"],
        "steps_to_99": None if first is None else first["step"],
    }


def run_curves(args) -> dict:
    runs: dict[str, list[dict]] = {arch: [] for arch in args.archs}
    lr = {} if args.lr is None else {"lr": args.lr}  # and the seed: data, init, batch order
    for r in range(args.repeats):
        for arch in args.archs:  # alternate: the slow phases of a shared machine hit both
            config = DemoConfig(arch=arch, threads=args.threads, steps=args.train_steps,
                                seed=args.seed, **lr)  # fmt: skip
            run = training_curve(config, eval_every=args.eval_every, eval_examples=args.probe)
            runs[arch].append(run)
            print(
                f"  {arch:<11} run {r + 1}: {run['parameters']:,} parameters, "
                f"{run['train_seconds']:.1f} s, exact match {run['exact_match']:.2%}, "
                f"99% after {run['seconds_to_99']} s (step {run['steps_to_99']})",
                flush=True,
            )
    summary = {}
    for arch, arch_runs in runs.items():
        reached = [r["seconds_to_99"] for r in arch_runs if r["seconds_to_99"] is not None]
        summary[arch] = {
            "parameters": arch_runs[0]["parameters"],
            "median_train_seconds": statistics.median(r["train_seconds"] for r in arch_runs),
            "exact_match": [r["exact_match"] for r in arch_runs],
            "median_seconds_to_99": statistics.median(reached) if reached else None,
            "runs_reaching_99": len(reached),
            "steps_to_99": [r["steps_to_99"] for r in arch_runs],
        }
    return {"runs": runs, "summary": summary}


# ---- steps: one training step against the sequence length --------------------------------


def _layers(E: int, heads: int) -> dict[str, nn.Module]:
    return {
        "self-attention": qkv.MultiHeadAttention(E, heads),
        "GRU": nn.GRU(E, E, batch_first=True),
        "Conv1d (K=3)": nn.Conv1d(E, E, 3, padding=1),
    }


def _run_layer(name: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (B, T, E) -> (B, T, E) through the layer."""
    if name == "GRU":
        return layer(x)[0]
    if name.startswith("Conv1d"):
        return layer(x.transpose(1, 2)).transpose(1, 2)  # Conv1d wants (B, E, T)
    return layer(x)


def step_flops(name: str, B: int, T: int, E: int) -> float:
    """Multiply-adds x 2 of one forward pass (the backward pass costs about twice that)."""
    if name == "GRU":
        return 2.0 * B * T * 3 * (E * E + E * E)  # three gates, input and hidden matrices
    if name.startswith("Conv1d"):
        return 2.0 * B * T * 3 * E * E
    return 2.0 * B * T * 4 * E * E + 2.0 * 2 * B * T * T * E  # projections, scores + sum


def step_seconds(name: str, layer: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward + backward pass of `layer` on x (B, T, E)."""
    x = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    tick = time.perf_counter()
    _run_layer(name, layer, x).square().mean().backward()
    return time.perf_counter() - tick


def run_steps(args) -> dict:
    torch.manual_seed(0)
    layers = _layers(args.width, args.heads)
    inputs = {T: torch.randn(args.batch, T, args.width) for T in args.lengths}
    for name, layer in layers.items():  # warm-up: first calls allocate and pick kernels
        for x in inputs.values():
            step_seconds(name, layer, x)
    keys = [(n, T, t) for t in args.step_threads for T in args.lengths for n in layers]
    times: dict[tuple, list[float]] = {key: [] for key in keys}
    previous = torch.get_num_threads()
    try:
        for _ in range(args.rounds):
            for threads in args.step_threads:
                torch.set_num_threads(threads)
                for name, layer in layers.items():  # untimed: the pool settles after a switch
                    step_seconds(name, layer, inputs[args.lengths[0]])
                for T, x in inputs.items():
                    for name, layer in layers.items():
                        times[name, T, threads].append(step_seconds(name, layer, x))
    finally:
        torch.set_num_threads(previous)
    rows = []
    for name, T, threads in keys:
        seconds = statistics.median(times[name, T, threads])
        flops = 3 * step_flops(name, args.batch, T, args.width)  # forward + backward
        rows.append({"layer": name, "T": T, "threads": threads, "seconds": seconds,
                     "gflops": flops / 1e9, "gflop_per_s": flops / seconds / 1e9})  # fmt: skip
    return {"batch": args.batch, "width": args.width, "heads": args.heads, "rows": rows}


# ---- paths: how far apart two positions are ----------------------------------------------


def jacobian_last_first(forward, x: torch.Tensor) -> torch.Tensor:
    """∂ y[0, -1] / ∂ x[0, 0] for y = forward(x), x (1, T, E): the (E_out, E) Jacobian, by
    one backward pass per output feature."""
    x = x.detach().requires_grad_(True)
    last = forward(x)[0, -1]  # (E_out,)
    rows = []
    for e in range(last.shape[0]):
        (grad,) = torch.autograd.grad(last[e], x, retain_graph=True)
        rows.append(grad[0, 0])  # (E,)
    return torch.stack(rows)  # (E_out, E)


def path_models(E: int, heads: int, seed: int) -> dict:
    """A random GRU and a random causal self-attention layer of width E: x (1, T, E) -> y."""
    torch.manual_seed(seed)
    gru = nn.GRU(E, E, batch_first=True).double()
    attn = qkv.MultiHeadAttention(E, heads).double()
    return {
        "GRU": lambda x: gru(x)[0],
        "self-attention": lambda x: attn(x, causal=True),
    }


def trained_encoder(path: str):
    """The forward direction of a `qkv demo --arch rnn` checkpoint's encoder GRU, on its own
    character embeddings: x (1, T, E) -> (1, T, Hd/2), and a sampler of embedded random
    source characters."""
    from qkv.demo import load_checkpoint

    model = load_checkpoint(path).model.double()
    half = model.config.hidden_dim // 2
    chars = torch.tensor([i for i in range(len(model.src_embed.weight)) if i > 2])  # no specials

    def sample(T: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        ids = chars[torch.randint(len(chars), (1, T), generator=g)]
        return model.src_embed(ids).detach()  # (1, T, E)

    return (lambda x: model.encoder(x)[0][..., :half]), sample


def path_gradients(distances, *, E: int, heads: int, seeds: int, trained: str | None = None):
    """Median over seeds of ‖∂y_T/∂x_1‖_F at each distance d = T - 1, per model."""
    norms: dict[str, dict[int, list[float]]] = {}

    def record(name, forward, x, d):
        norm = float(torch.linalg.norm(jacobian_last_first(forward, x)))
        norms.setdefault(name, {}).setdefault(d, []).append(norm)

    encoder, sample = trained_encoder(trained) if trained else (None, None)
    for seed in range(seeds):
        models = path_models(E, heads, seed)
        for d in distances:
            x = torch.randn(1, d + 1, E, dtype=torch.float64, generator=torch.Generator()
                            .manual_seed(seed))  # fmt: skip
            for name, forward in models.items():
                record(name, forward, x, d)
            if encoder is not None:
                record("trained GRU (demo encoder)", encoder, sample(d + 1, seed), d)
    return {n: {d: statistics.median(v) for d, v in by_d.items()} for n, by_d in norms.items()}


def run_paths(args) -> dict:
    medians = path_gradients(args.distances, E=args.path_width, heads=args.heads,
                             seeds=args.seeds, trained=args.trained)  # fmt: skip
    return {"width": args.path_width, "seeds": args.seeds, "trained": args.trained,
            "median_norm": medians}  # fmt: skip


# ---- conv: a convolution is attention with fixed, position-only weights ------------------


def conv_as_attention(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for x (B, E, T), a Conv1d of odd kernel K with padding K//2, as attention.

    Head h may attend only to the key at offset h - K//2 (a fixed mask that depends on the
    positions alone); a single allowed key gets weight 1 whatever the scores, so queries and
    keys are zeros. Its values are x projected by the kernel's h-th matrix W_h (E_out, E);
    the heads' outputs are summed, as a convolution sums its taps. Rows whose key falls off
    the sequence attend to nothing and give 0: the convolution's zero padding.
    """
    B, E, T = x.shape
    K = conv.kernel_size[0]
    offsets = torch.arange(K) - K // 2  # (K,)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (j - i)[None] == offsets[:, None, None]  # (K, T, T): head h sees j = i + offset_h
    v = torch.einsum("bet,oeh->bhto", x, conv.weight)  # (B, K, T, E_out): x_t W_h per head
    zeros = x.new_zeros(B, K, T, 1)  # (B, K, T, 1): no content in the scores
    out = qkv.attention(zeros, zeros, v, mask=mask[None], scale=1.0)  # (B, K, T, E_out)
    y = out.sum(1).transpose(1, 2)  # (B, E_out, T)
    return y if conv.bias is None else y + conv.bias[None, :, None]


def smoothing_as_attention(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Attention over qkv.masks.window(r, r) with a position-only bias b[i, j] = logits[j-i+r]
    and no content (zero queries and keys): x (B, T, E) -> (B, T, E). Every interior row
    averages its window with the fixed weights softmax(logits): a depthwise convolution."""
    B, T, E = x.shape
    r = (logits.shape[0] - 1) // 2
    offset = torch.arange(T)[None, :] - torch.arange(T)[:, None]  # (T, T): j - i
    bias = logits[(offset + r).clamp(0, 2 * r)]  # (T, T); outside the window it is masked
    zeros = x.new_zeros(B, 1, T, 1)
    out = qkv.attention(zeros, zeros, x[:, None], mask=qkv.masks.window(r, r), bias=bias,
                        scale=1.0)  # fmt: skip
    return out[:, 0]  # (B, T, E)


def run_conv(args) -> dict:
    torch.manual_seed(0)
    B, E, T, K = 2, 16, 40, 5
    conv = nn.Conv1d(E, E, K, padding=K // 2).double()
    x = torch.randn(B, E, T, dtype=torch.float64)
    with torch.no_grad():
        exact = float((conv_as_attention(conv, x) - conv(x)).abs().max())
        logits = torch.randn(K, dtype=torch.float64)
        kernel = torch.softmax(logits, 0)  # (K,) fixed weights, sum 1
        xt = x.transpose(1, 2)  # (B, T, E)
        smooth = smoothing_as_attention(xt, logits)
        depthwise = nn.functional.conv1d(x, kernel.expand(E, 1, K), padding=K // 2,
                                         groups=E).transpose(1, 2)  # fmt: skip
        r = K // 2
        interior = float((smooth - depthwise)[:, r : T - r].abs().max())
    params = {"Conv1d K=3": 3 * E * E + E, "self-attention": 4 * E * E + 4 * E}
    return {"conv_as_attention_max_error": exact, "window_bias_interior_max_error": interior,
            "sizes": {"B": B, "E": E, "T": T, "K": K}, "parameters_at_E16": params}  # fmt: skip


# ---- figures and the command line --------------------------------------------------------


def plot(results: dict, out: Path) -> list[str]:
    from matplotlib.figure import Figure

    written = []
    if "curves" in results:
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        for arch, color in (("transformer", "tab:blue"), ("rnn", "tab:orange")):
            for k, run in enumerate(results["curves"]["runs"].get(arch, [])):
                pts = run["points"]
                label = f"{arch} ({run['parameters']:,} parameters)" if k == 0 else None
                ax.plot([p["seconds"] for p in pts], [p["exact_match"] for p in pts],
                        color=color, alpha=0.8, label=label)  # fmt: skip
        ax.axhline(0.99, color="gray", lw=0.8, ls="--")
        ax.set(xlabel="training seconds", ylabel="exact match (held-out dates)", ylim=(0, 1.01))
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=100)
        written.append("curves.png")
    if "steps" in results:
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        rows = results["steps"]["rows"]
        colors = {}
        for name, threads in dict.fromkeys((r["layer"], r["threads"]) for r in rows):
            mine = [r for r in rows if (r["layer"], r["threads"]) == (name, threads)]
            color = colors.setdefault(name, f"C{len(colors)}")
            style = "o-" if threads == min(r["threads"] for r in rows) else "s--"
            label = f"{name}, {threads} thread{'s' * (threads > 1)}"
            ms = [r["seconds"] * 1e3 for r in mine]
            ax.plot([r["T"] for r in mine], ms, style, color=color, label=label)
        ax.set(xscale="log", yscale="log", xlabel="sequence length T",
               ylabel="ms per training step (forward + backward)")  # fmt: skip
        s = results["steps"]
        ax.set_title(f"one layer, width E={s['width']}, batch {s['batch']}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "steps.png", dpi=100)
        written.append("steps.png")
    if "paths" in results:
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        for name, by_d in results["paths"]["median_norm"].items():
            ds = sorted(int(d) for d in by_d)
            ax.plot(ds, [by_d[d] if d in by_d else by_d[str(d)] for d in ds], "o-", label=name)
        ax.set(xscale="log", yscale="log", xlabel="distance d between the two positions",
               ylabel="‖∂y_last / ∂x_first‖")  # fmt: skip
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "paths.png", dpi=100)
        written.append("paths.png")
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=("curves", "steps", "paths", "conv"),
                   default=["curves", "steps", "paths", "conv"])  # fmt: skip
    p.add_argument("--out", default="runs/transformer_vs_rnn", help="results.json and figures")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="training runs per architecture")
    p.add_argument("--train-steps", type=int, default=DemoConfig().steps)
    p.add_argument("--archs", nargs="+", choices=("transformer", "rnn"),
                   default=["transformer", "rnn"])  # fmt: skip
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-3)")
    p.add_argument("--seed", type=int, default=0, help="of the training runs (default 0)")
    p.add_argument("--eval-every", type=int, default=25, help="steps between evaluations")
    p.add_argument("--probe", type=int, default=500, help="held-out examples per evaluation")
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024, 2048])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    p.add_argument("--step-threads", type=int, nargs="+", default=[1, 2], help="steps: threads")
    p.add_argument("--distances", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--path-width", type=int, default=32)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--trained", metavar="PATH", help="paths: also a `qkv demo --arch rnn` model.pt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    counts = (args.threads, args.repeats, args.eval_every, args.probe, args.rounds, args.seeds)
    if min(*counts, *args.step_threads) < 1:
        _parser().error("counts must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    set_threads(args.threads)
    results: dict = {"threads": args.threads, "torch": torch.__version__}
    try:
        for part, run in (("conv", run_conv), ("paths", run_paths), ("steps", run_steps),
                          ("curves", run_curves)):  # fmt: skip
            if part in args.only:
                print(f"{part}:", flush=True)
                results[part] = run(args)
                print(json.dumps(results[part].get("summary", results[part]), indent=1)[:3000])
    finally:
        torch.set_num_threads(previous)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    figures = plot(results, out)
    print(f"wrote {out / 'results.json'} and {', '.join(figures) or 'no figures'} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
