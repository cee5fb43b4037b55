"""Run a tile plan's jobs through torch's fused CPU kernel, many tiles per call.

(float32 forward jobs of evenly spaced blocks run on qkv's native kernel instead, which
takes the same strided windows and writes straight into the output slabs; see
native.py.)

Letters: B batch, H query heads, T lengths, W head width (after padding), n blocks in a
job, r rows per block, k keys per block.

Each `Job` (see tiles.py) is n query blocks, each with its own span of k keys. Set side
by side along the batch axis they make one fused call instead of n. When the blocks are
evenly spaced (a sliding window: block i reads keys from i·r + c on), the key spans are
overlapping *views* of the key tensor (`as_strided`), so nothing is copied; otherwise
they are gathered. The windows are views of the inputs in whatever layout they come in
((B, H, T, W) or token-major (B, T, H, W) storage): the fused kernel reads both through
their strides. Results are written token-major, the layout the kernel returns.
"""

from __future__ import annotations

import torch

from .._types import plain_tensors
from . import native
from .fused import POISON_BELOW_KEYS, poison
from .merge import merge
from .plan import Jobs, job_mask
from .tiles import Job
from .tiles import steps as _steps

__all__ = ["backward", "forward"]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _rows(x: torch.Tensor, b: int, start: int, length: int, step: int, n: int):
    """n row blocks x[b, start + i·step : start + i·step + length] of a (B, T, ...) tensor
    as one (n, length, ...) view (the blocks must not overlap when it is written to)."""
    st, rest = x.stride(1), x.stride()[2:]
    offset = x.storage_offset() + b * x.stride(0) + start * st
    return x.as_strided((n, length, *x.shape[2:]), (step * st, st, *rest), offset)


def _windows(x: torch.Tensor, b: int, start: int, length: int, step: int, n: int):
    """n windows x[b, :, start + i·step : start + i·step + length] of a (B, H, T, W) tensor
    as (n, H, length, W).

    A view, never a copy, whatever the strides of x: windows of a sliding-window job
    overlap in memory.
    """
    return _rows(x.transpose(1, 2), b, start, length, step, n).transpose(1, 2)


def _indices(starts: tuple[int, ...], length: int, device) -> torch.Tensor:
    """(n·length,) positions: starts[i] + 0..length-1 for each block, block-major."""
    base = torch.tensor(starts, device=device)[:, None]  # (n, 1)
    return (base + torch.arange(length, device=device)).flatten()


def _gather(x: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, T, W), n blocks of positions -> (B·n, H, len, W) (a token-major copy)."""
    B, H, _, W = x.shape
    g = x.transpose(1, 2).index_select(1, idx)  # (B, n·len, H, W), contiguous
    return g.view(B * n, -1, H, W).transpose(1, 2)  # (B·n, H, len, W)


def _additive(allowed: torch.Tensor, dtype, device):
    """Float mask (0 / -inf) for the fused kernel, and the rows that see a key (or None)."""
    allowed = allowed.to(device)
    add = torch.zeros(allowed.shape, dtype=dtype, device=device)
    add.masked_fill_(~allowed, float("-inf"))
    rows = allowed.any(-1)
    return add, (None if bool(rows.all()) else rows)


def _calls(x, job: Job, B: int):
    """The fused calls of one job: (q, k, v, additive mask, rows, write-back) per call.

    A job of one block is one call on slices of every batch element (decoding: one query
    block against a long cache); other regular jobs make one call per batch element on
    views; the rest one gathered call.
    """
    n, r, k = len(job.q_starts), job.rows, job.keys
    allowed = job_mask(job)  # (Bm, n|1, Hm, r, k) or None
    device = x.q.device
    if n == 1:
        q0, k0 = job.q_starts[0], job.k_starts[0]
        add = rows = None
        if allowed is not None:
            add, rows = _additive(allowed[:, 0], x.q.dtype, device)  # (Bm, Hm, r, k)
        q = x.q[:, :, q0 : q0 + r]  # (B, H, r, W)
        kk, vv = x.k[:, :, k0 : k0 + k], x.v[:, :, k0 : k0 + k]  # (B, H, k, W)
        yield q, kk, vv, add, rows, ("single", q0, k0)
        return
    steps = _steps(job)
    if steps is not None:
        (sq, sk), q0, k0 = steps, job.q_starts[0], job.k_starts[0]
        for b in range(B):
            q = _windows(x.q, b, q0, r, sq, n)  # (n, H, r, W)
            kk = _windows(x.k, b, k0, k, sk, n)  # (n, H, k, W), overlapping views
            vv = _windows(x.v, b, k0, k, sk, n)
            add = rows = None
            if allowed is not None:
                add, rows = _additive(allowed[min(b, allowed.shape[0] - 1)], x.q.dtype, device)
            yield q, kk, vv, add, rows, ("regular", b, sq, sk)
        return
    q_idx, k_idx = _indices(job.q_starts, r, device), _indices(job.k_starts, k, device)
    q = _gather(x.q, q_idx, n)  # (B·n, H, r, W)
    kk, vv = _gather(x.k, k_idx, n), _gather(x.v, k_idx, n)  # (B·n, H, k, W)
    add = rows = None
    if allowed is not None:
        if allowed.shape[0] != 1 or allowed.shape[1] != 1:
            # the gathered batch index is b·n + i: expand the mask to match
            allowed = allowed.expand(B, n, *allowed.shape[2:])
        add, rows = _additive(allowed.flatten(0, 1), x.q.dtype, device)  # (B·n|1, Hm, r, k)
    yield q, kk, vv, add, rows, ("gathered", q_idx, k_idx)


def _native_ready(x, jobs: Jobs, dtype) -> bool:
    """Whether native.cpp may run jobs of this call: float32 on the CPU, plain tensors, and
    a job of at least native.min_rows() queries to run (only then is it built, right before
    its first call). Asked once per call: the check reads the machine's state."""
    return (
        dtype == torch.float32
        and x.q.dtype == torch.float32
        and x.q.device.type == "cpu"
        and plain_tensors(x.q, x.k, x.v)  # first: the checks below read the machine
        and any(job.rows >= native.min_rows() and job.keys > 0 for job in jobs.fine)
        and native.unavailable() is None
    )


def _native(x, jobs: Jobs, i: int, ready: bool) -> bool:
    """Whether fine job i runs on native.cpp (evenly spaced blocks of at least
    native.min_rows() queries): where it is built, it was faster than torch's fused kernel
    on every such job of the plans measured (windows, documents, causal)."""
    job = jobs.fine[i]
    return (
        ready
        and job.keys > 0
        and job.rows >= native.min_rows()
        and jobs.native_job(i)[0] is not None  # evenly spaced blocks
    )


def _native_forward(x, jobs: Jobs, i: int, scale: float, slab_o, slab_l) -> None:
    """Fine job i on native.cpp, written straight into the slabs."""
    job = jobs.fine[i]
    n, r, k = len(job.q_starts), job.rows, job.keys
    (sq, sk), mask_t = jobs.native_job(i)
    native.forward(
        x.q, x.k, x.v, slab_o, slab_l, q0=job.q_starts[0], k0=job.k_starts[0], sq=sq, sk=sk,
        n=n, rows=r, keys=k, scale=scale, mask_t=mask_t,
    )  # fmt: skip


def _slabs(jobs: Jobs, ordinal: int, shape, dtype, device):
    """Output (B, T, H, W) and lse (B, T, H) buffers for the jobs of one ordinal: rows no
    job writes hold 0 / -inf, the others are left for the jobs to fill (no zero pass)."""
    B, T, H, W = shape
    slab_o = torch.empty(B, T, H, W, dtype=dtype, device=device)
    slab_l = torch.empty(B, T, H, dtype=dtype, device=device)
    idle = jobs.idle_rows(ordinal, T, device)
    if idle is not None:
        slab_o[:, idle] = 0
        slab_l[:, idle] = float("-inf")
    return slab_o, slab_l


def forward(x, jobs: Jobs, scale: float, shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every forward job (`jobs.fine`); returns out (B, Tq, H, W) and lse (B, Tq, H)
    in `dtype` (float32+).

    The jobs of one ordinal (the i-th segment of each query block) cover each row at most
    once, so they write into one slab; slabs of successive ordinals are merged whole.
    """
    B, T, H, W = shape
    device = x.q.device
    acc_o = acc_l = None
    fine = jobs.fine
    ready = _native_ready(x, jobs, dtype)
    i = 0
    while i < len(fine):
        ordinal = fine[i].ordinal
        slab_o, slab_l = _slabs(jobs, ordinal, shape, dtype, device)
        while i < len(fine) and fine[i].ordinal == ordinal:
            job = fine[i]
            i += 1
            n, r = len(job.q_starts), job.rows
            if _native(x, jobs, i - 1, ready):
                _native_forward(x, jobs, i - 1, scale, slab_o, slab_l)
                continue
            for q, k, v, add, rows, where in _calls(x, job, B):
                o, l = _flash(q, k, v, 0.0, False, attn_mask=add, scale=scale)
                if rows is not None:  # the fused kernel reports lse 0, not -inf, there
                    l = torch.where(rows, l, float("-inf"))
                if add is None and job.keys < POISON_BELOW_KEYS:  # see fused.poison
                    nan = poison(q)  # (·, H, r, 1)
                    o, l = o + nan, l + nan[..., 0]
                o = o.transpose(1, 2)  # (·, r, H, W)
                l = l.transpose(1, 2)  # (·, r, H)
                if where[0] == "single":
                    slab_o[:, where[1] : where[1] + r] = o
                    slab_l[:, where[1] : where[1] + r] = l
                elif where[0] == "regular":
                    b, sq, q0 = where[1], where[2], job.q_starts[0]
                    _rows(slab_o, b, q0, r, sq, n).copy_(o)
                    _rows(slab_l, b, q0, r, sq, n).copy_(l)
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
    """grad[b, start + i·step + j] += d[i, j] for overlapping windows d (n, len, H, W).

    grad is (B, T, H, W). A window of len keys spans ⌈len / step⌉ steps: the c-th step of
    every window lands on keys no other window's c-th step touches, so each step is one
    strided in-place add over all windows (no scatter, no copy of d).
    """
    n, length = d.shape[:2]
    if step == 0:  # every window read the same keys
        grad[b, start : start + length] += d.sum(0)
        return
    for lo in range(0, length, step):
        width = min(step, length - lo)
        _rows(grad, b, start + lo, width, step, n).add_(d[:, lo : lo + width])


def backward(x, jobs: list[Job], scale: float, dout, out, lse, grads):
    """Accumulate dq, dk, dv (token-major float32+ buffers in `grads`) over every job.

    dout, out (B, H, Tq, W) in any layout; lse (B, H, Tq) must already hold +inf for rows
    that see nothing, so that the recomputed probabilities exp(S − lse) are 0 there.
    """
    B, H, _, W = dout.shape
    for job in jobs:
        n, r, nk = len(job.q_starts), job.rows, job.keys
        for q, k, v, add, _, where in _calls(x, job, B):
            if where[0] == "single":
                q0, k0 = where[1:]
                do, o = dout[:, :, q0 : q0 + r], out[:, :, q0 : q0 + r]  # (B, H, r, W)
                l = lse[:, :, q0 : q0 + r].contiguous()  # (B, H, r)
            elif where[0] == "regular":
                (b, sq, sk), q0, k0 = where[1:], job.q_starts[0], job.k_starts[0]
                do = _windows(dout, b, q0, r, sq, n)  # (n, H, r, W)
                o = _windows(out, b, q0, r, sq, n)
                l = _rows(lse.transpose(1, 2), b, q0, r, sq, n).transpose(1, 2).contiguous()
            else:
                q_idx = where[1]
                do, o = _gather(dout, q_idx, n), _gather(out, q_idx, n)
                l = lse.index_select(2, q_idx).view(B, H, n, r).transpose(1, 2)
                l = l.reshape(B * n, H, r)  # (B·n, H, r), contiguous
            dq, dk, dv = _flash_backward(do, q, k, v, o, l, 0.0, False, attn_mask=add, scale=scale)
            dq, dk, dv = (t.transpose(1, 2) for t in (dq, dk, dv))  # token-major
            if where[0] == "single":
                grads["q"][:, q0 : q0 + r] += dq
                grads["k"][:, k0 : k0 + nk] += dk
                grads["v"][:, k0 : k0 + nk] += dv
            elif where[0] == "regular":
                _rows(grads["q"], b, q0, r, sq, n).add_(dq)
                _add_windows(grads["k"], b, k0, sk, dk)
                _add_windows(grads["v"], b, k0, sk, dv)
            else:
                q_idx, k_idx = where[1], where[2]
                grads["q"].index_add_(1, q_idx, dq.reshape(B, n * r, H, W).to(grads["q"].dtype))
                for name, d in (("k", dk), ("v", dv)):  # spans may overlap: add, not copy
                    d = d.reshape(B, n * nk, H, W).to(grads[name].dtype)
                    grads[name].index_add_(1, k_idx, d)
