"""A transformers decoder on the CPU with attn_implementation eager, sdpa and qkv.

    python benchmarks/transformers.py                  # T = 2k/8k/16k, window 512
    python benchmarks/transformers.py --quick          # T = 1k/2k, a few seconds per step

One random Mistral-style model (hidden 128, 4 query heads of 64 sharing 2 kv heads, 2
layers, vocabulary 1000: small enough that attention is most of the work), in two configs:
full causal attention, and a sliding window. Measured, all in one run:

- prefill time (one forward over T tokens, last logits only): contenders interleaved in
  every round, the median of the rounds, ratios to sdpa in wall time and in CPU time
  (which a busy neighbour on a shared machine disturbs less);
- peak memory of that prefill: how far the process's resident memory rose above its level
  before the call (freed memory returned first, the kernel's peak counter reset);
- prefill with output_attentions=True, qkv against eager (sdpa cannot return weights);
- greedy decoding tokens/s against a long prompt (one KV cache filled once and copied for
  every contender, so each decodes the same steps).

eager materialises (B, H, T, T) scores several times over; above --eager-max tokens it is
left out (at 16k that would be ~10 GB). transformers' sdpa is given a dense (B, 1, T, T)
mask for every sliding-window call; qkv receives `qkv.masks.window(w - 1)`.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time

# This file is called transformers.py: its own folder must not shadow the library.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch  # noqa: E402

IMPLS = ("eager", "sdpa", "qkv")


def build(window: int | None, max_len: int):
    import transformers

    import qkv.interop.transformers as qkv_hf

    qkv_hf.register()
    config = transformers.MistralConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=max_len,
        sliding_window=window, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(config).eval()


def prompt(T: int) -> torch.Tensor:
    return torch.randint(1, 1000, (1, T), generator=torch.Generator().manual_seed(T))


def prefill(model, ids, impl: str, weights: bool = False):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1, output_attentions=weights)
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        name = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
        flags = next(x for x in lines if x.startswith("flags")).split()
        extra = [f for f in ("avx512f", "avx512_bf16", "amx_tile") if f in flags]
        name += f" ({', '.join(extra) or 'no AVX-512'})"
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# ---- peak memory: the process's resident high-water mark, reset before each run ----------


def _status_kib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return float(line.split()[1])


def measured(fn) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, MiB the resident memory rose above its level before fn).

    Freed memory is first handed back to the system (malloc_trim) and the kernel's peak
    counter reset (/proc/self/clear_refs, Linux >= 4.0), so the peak is this call's own.
    CPU seconds (all threads) shift less than wall time when neighbours share the cores.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
    except (OSError, StopIteration):
        base = None
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    del out
    peak = float("nan") if base is None else (_status_kib("VmHWM") - base) / 1024
    return seconds, cpu, peak


# ---- the measurements ---------------------------------------------------------------------


def prefill_times(model, lengths, repeats, eager_max, weights=False, impls=IMPLS):
    """Per (T, impl): median wall and CPU seconds, and the largest peak MiB.

    One untimed round first (fresh pages, plans), then `repeats` rounds; short runs get
    more rounds, since a neighbour's burst weighs more on them.
    """
    runs: dict = {}
    for T in lengths:
        ids = prompt(T)
        present = [i for i in impls if i != "eager" or eager_max >= T]
        rounds = repeats * max(1, 4096 // T)
        for rnd in range(rounds + 1):
            for impl in present:  # interleaved: a busy neighbour slows every contender
                got = measured(lambda i=impl, x=ids: prefill(model, x, i, weights))
                if rnd:
                    runs.setdefault((T, impl), []).append(got)
    return {
        key: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v),
              max(r[2] for r in v))
        for key, v in runs.items()
    }  # fmt: skip


def decode_rate(model, T: int, steps: int, repeats: int) -> dict:
    """Greedy tokens/s of each contender from one cache filled by a T-token prompt."""
    model.set_attn_implementation("qkv")
    with torch.no_grad():
        out = model(input_ids=prompt(T), use_cache=True, logits_to_keep=1)
    start = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    rates: dict = {}
    for _ in range(repeats):
        for impl in IMPLS:
            model.set_attn_implementation(impl)
            cache, token = copy.deepcopy(out.past_key_values), start
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(steps):
                    step = model(input_ids=token, past_key_values=cache, use_cache=True)
                    cache, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
            rates.setdefault(impl, []).append(steps / (time.perf_counter() - t0))
    return {impl: statistics.median(v) for impl, v in rates.items()}


def table(title, lengths, runs, ratio_to="sdpa", impls=IMPLS) -> list[str]:
    head = (
        f"{'T':>6} {'impl':>6} {'seconds':>9} {'vs ' + ratio_to:>8} {'CPU vs':>7} {'peak MiB':>9}"
    )
    lines = [title, head]
    for T in lengths:
        base = runs.get((T, ratio_to))
        for impl in impls:
            if (T, impl) not in runs:
                lines.append(f"{T:>6} {impl:>6} {'not run':>9}")
                continue
            wall, cpu, mib = runs[(T, impl)]
            ratio = f"{wall / base[0]:8.2f} {cpu / base[1]:7.2f}" if base else f"{'':>16}"
            lines.append(f"{T:>6} {impl:>6} {wall:9.3f} {ratio} {mib:9.0f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--window", type=int, default=512, help="sliding window (tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eager-max", type=int, default=8192)
    parser.add_argument("--weights-lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--decode-prompt", type=int, default=8192)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.weights_lengths, args.repeats = [1024, 2048], [1024], 1
        args.decode_prompt, args.decode_steps = 2048, 8
    print(f"machine: {machine()}")
    report: dict = {"machine": machine(), "window": args.window}
    for label, window in (("full causal", None), (f"sliding window {args.window}", args.window)):
        model = build(window, max([*args.lengths, args.decode_prompt]) + args.decode_steps + 64)
        for impl in IMPLS:
            prefill(model, prompt(256), impl)  # warm-up
        runs = prefill_times(model, args.lengths, args.repeats, args.eager_max)
        lines = table(f"\nprefill, {label}", args.lengths, runs)
        w_lengths = [T for T in args.weights_lengths if 0 < T <= args.eager_max]
        w_runs = prefill_times(
            model, w_lengths, args.repeats, args.eager_max, True, ("eager", "qkv")
        )
        if w_lengths:
            lines += table(f"\nprefill with output_attentions=True, {label}", w_lengths, w_runs,
                           "eager", ("eager", "qkv"))  # fmt: skip
        rates = decode_rate(model, args.decode_prompt, args.decode_steps, args.repeats + 2)
        lines.append(f"\ngreedy decoding after a {args.decode_prompt}-token prompt, {label}:")
        lines += [f"{impl:>6} {r:8.1f} tokens/s  ({r / rates['sdpa']:.2f}x sdpa)"
                  for impl, r in rates.items()]  # fmt: skip
        print("\n".join(lines), flush=True)
        report[label] = {
            "prefill_wall_cpu_mib": {f"{T}/{i}": r for (T, i), r in runs.items()},
            "weights_prefill_wall_cpu_mib": {f"{T}/{i}": r for (T, i), r in w_runs.items()},
            "decode_tokens_per_s": rates,
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
