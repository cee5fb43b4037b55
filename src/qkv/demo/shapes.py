"""`qkv shapes`: one multi-head self-attention call, step by step, with FLOPs and memory.

Letters: B batch, L sequence length, E model width, H query heads, G key/value heads,
D = E / H head dim.

The walk runs the real torch operations on the "meta" device, which computes shapes and
allocates nothing, so the shapes printed are the ones torch gives. Where even that fails (a
tensor of more than 2**63 - 1 elements: torch cannot describe a billion-position score
matrix) the shapes come from the same arithmetic a test checks against torch's at small
sizes. FLOPs and bytes are Python integers, exact at any size, shown in units up to
yottabytes. A multiply-add counts as 2 FLOPs; the softmax is counted as 5 per score (max,
subtract, exp, sum, divide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["DTYPES", "Step", "Walk", "format_walk", "human_bytes", "human_count", "walk"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class Step:
    """One step: what it computes, the tensor it yields, its FLOPs and that tensor's bytes."""

    name: str
    code: str
    shape: tuple[int, ...]
    flops: int
    bytes: int  # of the tensor this step yields
    view: bool = False  # a view of the previous tensor: no new memory


@dataclass(frozen=True)
class Walk:
    """The whole call: its sizes, steps, and the memory the score matrix would need."""

    batch: int
    length: int
    dim: int
    heads: int
    kv_heads: int
    dtype: str
    steps: tuple[Step, ...]
    params: int  # weights and biases of the four projections
    by_torch: bool = True  # shapes from torch's meta device (False: by arithmetic)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def flops(self) -> int:
        return sum(s.flops for s in self.steps)

    @property
    def scores_bytes(self) -> int:
        return next(s.bytes for s in self.steps if s.name == "scores")


TORCH_MAX = 2**63 - 1  # the most elements (and the longest dimension) a torch tensor holds


def _check(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--{name} must be a positive integer; got {value!r}")
    if value > TORCH_MAX:
        raise ValueError(
            f"--{name} {value:.3g} is more than a tensor dimension can hold (2**63 - 1); "
            "give a smaller value"
        )
    return value


def _shapes(B: int, L: int, E: int, H: int, G: int, D: int) -> list[tuple[int, ...]]:
    """Every step's shape by arithmetic, in the order of `walk`'s steps."""
    return [
        (B, L, E), (B, L, H * D), (B, L, G * D), (B, L, G * D),  # x, q, k, v
        (B, H, L, D), (B, G, L, D), (B, G, L, D),  # heads split
        (B, H, L, L), (B, H, L, L), (B, H, L, D),  # scores, weights, weighted sum
        (B, L, H * D), (B, L, E),  # heads merged, output
    ]  # fmt: skip


def _torch_shapes(B: int, L: int, E: int, H: int, G: int, D: int, dtype) -> list[tuple[int, ...]]:
    """The same shapes as torch gives them, from the real operations on the "meta" device."""
    meta = {"device": "meta", "dtype": dtype}
    x = torch.empty(B, L, E, **meta)
    w_q, w_kv = torch.empty(H * D, E, **meta), torch.empty(G * D, E, **meta)
    q = F.linear(x, w_q)  # (B, L, E)
    k = F.linear(x, w_kv)  # (B, L, G·D)
    v = F.linear(x, w_kv)  # (B, L, G·D)
    qh = q.view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
    kh = k.view(B, L, G, D).transpose(1, 2)  # (B, G, L, D)
    vh = v.view(B, L, G, D).transpose(1, 2)  # (B, G, L, D)
    # Grouped-query: each k/v head serves H/G query heads (a broadcast, not a copy).
    k_h = kh[:, :, None].expand(B, G, H // G, L, D).reshape(B, H, L, D)  # (B, H, L, D)
    v_h = vh[:, :, None].expand(B, G, H // G, L, D).reshape(B, H, L, D)  # (B, H, L, D)
    scores = qh @ k_h.transpose(-2, -1)  # (B, H, L, L)
    weights = torch.softmax(scores, dim=-1)  # (B, H, L, L)
    out = weights @ v_h  # (B, H, L, D)
    merged = out.transpose(1, 2).reshape(B, L, H * D)  # (B, L, E)
    y = F.linear(merged, torch.empty(E, H * D, **meta))  # (B, L, E)
    tensors = (x, q, k, v, qh, kh, vh, scores, weights, out, merged, y)
    return [tuple(t.shape) for t in tensors]


def walk(
    batch: int, length: int, dim: int, heads: int, kv_heads: int | None = None,
    dtype: str = "float32", *, use_torch: bool | None = None,
) -> Walk:  # fmt: skip
    """Walk one self-attention call of `qkv.MultiHeadAttention(dim, heads, num_kv_heads=...)`.

    The shapes come from torch's meta device when torch can describe every tensor (at most
    2**63 - 1 elements each), by arithmetic otherwise (`use_torch` forces one or the other;
    arithmetic always works). FLOPs and bytes are Python integers: exact at any size.
    """
    B, L, E, H = (_check(n, v) for n, v in (("batch", batch), ("length", length),
                                            ("dim", dim), ("heads", heads)))  # fmt: skip
    G = H if kv_heads is None else _check("kv-heads", kv_heads)
    if E % H:
        raise ValueError(f"--dim ({E}) must be divisible by --heads ({H}): each head takes E/H")
    if H % G:
        raise ValueError(f"--heads ({H}) must be divisible by --kv-heads ({G})")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    D = E // H
    size = torch.empty((), dtype=DTYPES[dtype]).element_size()
    shapes = _shapes(B, L, E, H, G, D)
    fits = max(math.prod(s) for s in shapes) <= TORCH_MAX
    if use_torch is None:
        use_torch = fits
    elif use_torch and not fits:
        raise ValueError("use_torch=True, but the (B, H, L, L) scores are too large for torch")
    if use_torch:
        shapes = _torch_shapes(B, L, E, H, G, D, DTYPES[dtype])
    split = "q.view(B, L, H, D).transpose(1, 2)"
    what = [  # name, code, FLOPs, view
        ("input", "x", 0, False),
        ("project q", "q = x @ W_q.T + b_q", 2 * B * L * E * H * D + B * L * H * D, False),
        ("project k", "k = x @ W_k.T + b_k", 2 * B * L * E * G * D + B * L * G * D, False),
        ("project v", "v = x @ W_v.T + b_v", 2 * B * L * E * G * D + B * L * G * D, False),
        ("split q heads", split, 0, True),
        ("split k heads", split.replace("q", "k").replace("H", "G"), 0, True),
        ("split v heads", split.replace("q", "v").replace("H", "G"), 0, True),
        ("scores", "s = q @ k.transpose(-2, -1) / sqrt(D)", 2 * B * H * L * L * D, False),
        ("softmax", "w = softmax(s, dim=-1)", 5 * B * H * L * L, False),
        ("weighted sum", "o = w @ v", 2 * B * H * L * L * D, False),
        ("merge heads", "o.transpose(1, 2).reshape(B, L, E)", 0, False),
        ("project out", "y = o @ W_o.T + b_o", 2 * B * L * H * D * E + B * L * E, False),
    ]
    steps = tuple(
        Step(name, code, shape, flops, math.prod(shape) * size, view)
        for (name, code, flops, view), shape in zip(what, shapes, strict=True)
    )
    params = (E * H * D + H * D) + 2 * (E * G * D + G * D) + (H * D * E + E)
    return Walk(B, L, E, H, G, dtype, steps, params, by_torch=use_torch)


def _human(n: float, base: int, units: tuple[str, ...]) -> str:
    """n in the largest unit it reaches: whole in the first unit, one decimal after."""
    for i, unit in enumerate(units):
        if abs(n) < base or i == len(units) - 1:
            return f"{n:.0f}{unit}" if i == 0 else f"{n:.1f}{unit}"
        n /= base
    raise AssertionError  # unreachable: the last unit always returns


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    return _human(n, 1024, (" B", " KiB", " MiB", " GiB", " TiB", " PiB", " EiB", " ZiB", " YiB"))


def human_count(n: float) -> str:
    """12_300_000 -> '12.3 M'."""
    return _human(n, 1000, ("", " K", " M", " G", " T", " P", " E", " Z", " Y"))


def _tuple(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def format_walk(w: Walk) -> str:
    """The walk as a table, with totals and the closing note on why heads split E."""
    B, L, E, H, G, D = w.batch, w.length, w.dim, w.heads, w.kv_heads, w.head_dim
    size = torch.empty((), dtype=DTYPES[w.dtype]).element_size()
    call = f"qkv.MultiHeadAttention({E}, {H}" + (f", num_kv_heads={G}" if G != H else "") + ")"
    lines = [
        f"One multi-head self-attention call, {call}(x):",
        f"B={B} batch, L={L} positions, E={E} features, H={H} heads of D=E/H={D}, "
        + (f"G={G} key/value heads, " if G != H else "")
        + f"{w.dtype} ({size} bytes per number)",
        "",
    ]
    if not w.by_torch:
        lines.append(
            "shapes by arithmetic: the (B, H, L, L) scores would have "
            f"{w.scores_bytes // size:.3g} elements, more than a torch tensor holds (2**63 - 1)"
        )
    wide = max(22, *(len(_tuple(s.shape)) for s in w.steps))
    lines.append(
        f"{'step':<14} {'what it computes':<39} {'shape':<{wide}} {'FLOPs':>9}  {'memory'}"
    )
    for s in w.steps:
        flops = human_count(s.flops) if s.flops else "-"
        memory = human_bytes(s.bytes) + (" (view)" if s.view else "")
        shape = _tuple(s.shape)
        lines.append(f"{s.name:<14} {s.code:<39} {shape:<{wide}} {flops:>9}  {memory}")
    scores, total, one_head = w.scores_bytes, w.flops, 2 * B * L * L * E
    lines += [
        "",
        f"total: {total:,} FLOPs ({human_count(total)}), parameters: {w.params:,} "
        f"({human_bytes(w.params * size)})",
        f"the (B, H, L, L) scores would take {scores:,} bytes ({human_bytes(scores)}) if stored;",
        "they grow with L², which is why qkv's fused and tiled kernels never store them.",
        "",
        "Why heads split the feature axis (E = H·D), not the sequence axis:",
        f"- same cost: the scores of {H} heads of D={D} take 2·B·H·L²·D = {one_head:,} FLOPs,",
        f"  exactly as many as one head of D=E={E} (2·B·L²·E = {one_head:,});",
        f"- {H} attention patterns instead of one: each head has its own slice of the",
        "  projections, so each can look somewhere else for every position;",
        "- every head still sees all L positions; split along the sequence axis, each head",
        "  would see only part of the sentence (pitfall 6, docs/pitfalls.md).",
    ]
    if G != H:
        lines.append(
            f"- with G={G} key/value heads, k, v and a KV cache are {H // G}x smaller; the "
            "scores stay (B, H, L, L)."
        )
    return "\n".join(lines)


def max_length(budget_bytes: int, batch: int, heads: int, dtype: str = "float32") -> int:
    """The longest L whose materialised (B, H, L, L) scores fit in `budget_bytes`."""
    size = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return math.isqrt(budget_bytes // (batch * heads * size))
