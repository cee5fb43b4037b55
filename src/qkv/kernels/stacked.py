"""Run a tile plan's jobs through torch's fused CPU kernel, many tiles per call.

Letters: B batch, H query heads, T lengths, W head width (after padding), n blocks in a
job, r rows per block, k keys per block.

Each `Job` (see tiles.py) is n query blocks, each with its own span of k keys. Set side
by side along the batch axis they make one fused call instead of n. When the blocks are
evenly spaced (a sliding window: block i reads keys from i·r + c on), the key spans are
overlapping *views* of the key tensor (`as_strided`), so nothing is copied; otherwise
they are gathered. Everything is token-major ((B, T, H, W) storage), the layout the fused
kernel reads fastest.
"""

from __future__ import annotations

import torch

from .fused import POISON_BELOW_KEYS, poison
from .tiles import Job

__all__ = ["backward", "forward", "merge"]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _key_step(job: Job) -> int | None:
    """The constant shift between the key spans of consecutive blocks, or None.

    Regular jobs have consecutive query blocks (q_i = q_0 + i·r) and key spans that shift
    by a constant: r for a sliding window, 0 when every block reads the same keys.
    """
    n, r = len(job.q_starts), job.rows
    step = job.k_starts[1] - job.k_starts[0] if n > 1 else r
    regular = step >= 0 and all(
        job.q_starts[i] == job.q_starts[0] + i * r and job.k_starts[i] == job.k_starts[0] + i * step
        for i in range(n)
    )
    return step if regular else None


def _windows(x_tm: torch.Tensor, b: int, start: int, length: int, step: int, n: int):
    """n windows x_tm[b, start + i·step : start + i·step + length] as (n, H, length, W).

    A view, never a copy: windows of a sliding-window job overlap in memory.
    """
    _, _, H, W = x_tm.shape
    s = x_tm.stride()
    view = x_tm.as_strided(
        (n, length, H, W),
        (step * s[1], s[1], s[2], s[3]),
        x_tm.storage_offset() + b * s[0] + start * s[1],
    )
    return view.transpose(1, 2)  # (n, H, length, W)


def _indices(starts: tuple[int, ...], length: int, device) -> torch.Tensor:
    """(n·length,) positions: starts[i] + 0..length-1 for each block, block-major."""
    base = torch.tensor(starts, device=device)[:, None]  # (n, 1)
    return (base + torch.arange(length, device=device)).flatten()


def _gather(x_tm: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, H, W) storage, n blocks of positions -> (B·n, H, len, W) (a copy)."""
    B, _, H, W = x_tm.shape
    g = x_tm.index_select(1, idx)  # (B, n·len, H, W)
    return g.view(B * n, -1, H, W).transpose(1, 2)  # (B·n, H, len, W)


def _allowed(job: Job) -> torch.Tensor | None:
    """The job's bool mask as (Bm, n|1, Hm, r, k): one pattern if all blocks share it."""
    if job.masks is None:
        return None
    first = job.masks[0]  # (Bm, Hm, r, k)
    if all(m is first or torch.equal(m, first) for m in job.masks[1:]):
        return first[:, None]  # (Bm, 1, Hm, r, k)
    return torch.stack(job.masks, dim=1)  # (Bm, n, Hm, r, k)


def _additive(allowed: torch.Tensor, dtype, device):
    """Float mask (0 / -inf) for the fused kernel, and the rows that see a key (or None)."""
    allowed = allowed.to(device)
    add = torch.zeros(allowed.shape, dtype=dtype, device=device)
    add.masked_fill_(~allowed, float("-inf"))
    rows = allowed.any(-1)
    return add, (None if bool(rows.all()) else rows)


def _calls(x, job: Job, B: int):
    """The fused calls of one job: (q, k, v, additive mask, rows, write-back) per call.

    Regular jobs make one call per batch element on views; others one gathered call.
    """
    n, r, k = len(job.q_starts), job.rows, job.keys
    allowed = _allowed(job)  # (Bm, n|1, Hm, r, k) or None
    device = x.q_tm.device
    step = _key_step(job)
    if step is not None:
        q0, k0 = job.q_starts[0], job.k_starts[0]
        for b in range(B):
            q = _windows(x.q_tm, b, q0, r, r, n)  # (n, H, r, W)
            kk = _windows(x.k_tm, b, k0, k, step, n)  # (n, H, k, W), overlapping views
            vv = _windows(x.v_tm, b, k0, k, step, n)
            add = rows = None
            if allowed is not None:
                add, rows = _additive(allowed[min(b, allowed.shape[0] - 1)], x.q_tm.dtype, device)
            yield q, kk, vv, add, rows, ("regular", b, step)
        return
    q_idx, k_idx = _indices(job.q_starts, r, device), _indices(job.k_starts, k, device)
    q = _gather(x.q_tm, q_idx, n)  # (B·n, H, r, W)
    kk, vv = _gather(x.k_tm, k_idx, n), _gather(x.v_tm, k_idx, n)  # (B·n, H, k, W)
    add = rows = None
    if allowed is not None:
        if allowed.shape[0] != 1 or allowed.shape[1] != 1:
            # the gathered batch index is b·n + i: expand the mask to match
            allowed = allowed.expand(B, n, *allowed.shape[2:])
        add, rows = _additive(allowed.flatten(0, 1), x.q_tm.dtype, device)  # (B·n|1, Hm, r, k)
    yield q, kk, vv, add, rows, ("gathered", q_idx, k_idx)


def merge(acc_o, acc_l, o, l):
    """Merge two partial results over disjoint keys; rows empty in both stay 0 / -inf.

    out (..., R, W) and lse (..., R) for any leading shape: lse = logaddexp(lse₁, lse₂),
    out = out₁·exp(lse₁ − lse) + out₂·exp(lse₂ − lse).
    """
    new_l = torch.logaddexp(acc_l, l)  # (..., R)
    live = torch.isfinite(new_l)
    w_acc = torch.where(live, torch.exp(acc_l - new_l), 0.0)[..., None]
    w_new = torch.where(live, torch.exp(l - new_l), 0.0)[..., None]
    return acc_o * w_acc + o * w_new, new_l


def forward(x, jobs: list[Job], scale: float, shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every job; returns out (B, Tq, H, W) and lse (B, Tq, H) in `dtype` (float32+).

    The jobs of one ordinal (the i-th segment of each query block) cover each row at most
    once, so they write into one slab; slabs of successive ordinals are merged whole.
    """
    B, T, H, W = shape
    device = x.q_tm.device
    acc_o = acc_l = None
    i = 0
    while i < len(jobs):
        ordinal = jobs[i].ordinal
        slab_o = torch.zeros(B, T, H, W, dtype=dtype, device=device)
        slab_l = torch.full((B, T, H), float("-inf"), dtype=dtype, device=device)
        while i < len(jobs) and jobs[i].ordinal == ordinal:
            job = jobs[i]
            i += 1
            n, r = len(job.q_starts), job.rows
            for q, k, v, add, rows, where in _calls(x, job, B):
                o, l = _flash(q, k, v, 0.0, False, attn_mask=add, scale=scale)
                if rows is not None:  # the fused kernel reports lse 0, not -inf, there
                    l = torch.where(rows, l, float("-inf"))
                if add is None and job.keys < POISON_BELOW_KEYS:  # see fused.poison
                    nan = poison(q)  # (·, H, r, 1)
                    o, l = o + nan, l + nan[..., 0]
                o = o.transpose(1, 2)  # (·, r, H, W)
                l = l.transpose(1, 2)  # (·, r, H)
                if where[0] == "regular":
                    b, q0 = where[1], job.q_starts[0]
                    slab_o[b, q0 : q0 + n * r] = o.reshape(n * r, H, W)
                    slab_l[b, q0 : q0 + n * r] = l.reshape(n * r, H)
                else:
                    q_idx = where[1]
                    slab_o.index_copy_(1, q_idx, o.reshape(B, n * r, H, W).to(dtype))
                    slab_l.index_copy_(1, q_idx, l.reshape(B, n * r, H).to(dtype))
        if acc_o is None:
            acc_o, acc_l = slab_o, slab_l
        else:
            acc_o, acc_l = merge(acc_o, acc_l, slab_o, slab_l)
    if acc_o is None:  # no job at all: every row sees nothing
        acc_o = torch.zeros(B, T, H, W, dtype=dtype, device=device)
        acc_l = torch.full((B, T, H), float("-inf"), dtype=dtype, device=device)
    return acc_o, acc_l


def _add_windows(grad: torch.Tensor, b: int, start: int, step: int, d: torch.Tensor) -> None:
    """grad[b, start + i·step + j] += d[i, j] for overlapping windows d (n, len, H, W)."""
    n, length = d.shape[:2]
    if step == 0:  # every window read the same keys
        grad[b, start : start + length] += d.sum(0)
    elif length % step == 0:
        # a window of m steps adds to m consecutive blocks: m strided adds, no scatter
        m = length // step
        blocks = d.reshape(n, m, step, *d.shape[2:])  # (n, m, step, H, W)
        for c in range(m):
            lo = start + c * step
            grad[b, lo : lo + n * step] += blocks[:, c].reshape(n * step, *d.shape[2:])
    else:
        idx = _indices(tuple(start + i * step for i in range(n)), length, grad.device)
        grad[b].index_add_(0, idx, d.reshape(n * length, *d.shape[2:]).to(grad.dtype))


def backward(x, jobs: list[Job], scale: float, dout_tm, out_tm, lse_tm, grads):
    """Accumulate dq, dk, dv (token-major float32+ buffers in `grads`) over every job.

    lse_tm (B, Tq, H) must already hold +inf for rows that see nothing, so that the
    recomputed probabilities exp(S − lse) are 0 there.
    """
    B, _, H, W = dout_tm.shape
    for job in jobs:
        n, r, nk = len(job.q_starts), job.rows, job.keys
        for q, k, v, add, _, where in _calls(x, job, B):
            if where[0] == "regular":
                b, step, q0, k0 = where[1], where[2], job.q_starts[0], job.k_starts[0]
                do = _windows(dout_tm, b, q0, r, r, n)  # (n, H, r, W)
                o = _windows(out_tm, b, q0, r, r, n)
                l = lse_tm[b, q0 : q0 + n * r].view(n, r, H).transpose(1, 2).contiguous()
            else:
                q_idx = where[1]
                do, o = _gather(dout_tm, q_idx, n), _gather(out_tm, q_idx, n)
                l = lse_tm.index_select(1, q_idx).view(B * n, r, H).transpose(1, 2)
                l = l.contiguous()
            dq, dk, dv = _flash_backward(do, q, k, v, o, l, 0.0, False, attn_mask=add, scale=scale)
            dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))  # token-major
            if where[0] == "regular":
                grads["q"][b, q0 : q0 + n * r] += dq.reshape(n * r, H, W)
                _add_windows(grads["k"], b, k0, step, dk)
                _add_windows(grads["v"], b, k0, step, dv)
            else:
                q_idx, k_idx = where[1], where[2]
                grads["q"].index_add_(1, q_idx, dq.reshape(B, n * r, H, W).to(grads["q"].dtype))
                for name, d in (("k", dk), ("v", dv)):  # spans may overlap: add, not copy
                    d = d.reshape(B, n * nk, H, W).to(grads[name].dtype)
                    grads[name].index_add_(1, k_idx, d)
