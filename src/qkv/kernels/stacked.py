"""Run a tile plan's jobs through torch's fused CPU kernel, many tiles per call.

Letters: B batch, H query heads, T lengths, W head width (after padding), n blocks in a
job, r rows per block, k keys per block.

Each `Job` (see tiles.py) is n query blocks, each with its own span of k keys. Gathering
the blocks side by side along the batch axis turns them into one fused call of batch
B·n; the results are merged back into the output through the log-sum-exp. Everything is
kept token-major ((B, T, H, W) storage), the layout the fused kernel reads fastest.
"""

from __future__ import annotations

import torch

from .tiles import Job

__all__ = ["backward", "forward"]

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _indices(starts: tuple[int, ...], length: int, device) -> torch.Tensor:
    """(n·length,) positions: starts[i] + 0..length-1 for each block, block-major."""
    base = torch.tensor(starts, device=device)[:, None]  # (n, 1)
    return (base + torch.arange(length, device=device)).flatten()


def _gather(x_tm: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, H, W) storage, n blocks of positions -> (B·n, H, len, W) token-major."""
    B, _, H, W = x_tm.shape
    g = x_tm[:, idx]  # (B, n·len, H, W)
    return g.view(B * n, -1, H, W).transpose(1, 2)  # (B·n, H, len, W)


def _job_mask(job: Job, B: int, dtype, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Additive float mask for a job's B·n batch, and which rows see any key (or None)."""
    if job.masks is None:
        return None, None
    first = job.masks[0]  # (Bm, Hm, r, k)
    if all(m is first or torch.equal(m, first) for m in job.masks[1:]):
        allowed = first[:, None]  # (Bm, 1, Hm, r, k): one pattern shared by every block
    else:
        allowed = torch.stack(job.masks, dim=1)  # (Bm, n, Hm, r, k)
    n = len(job.q_starts)
    if allowed.shape[0] == 1 and allowed.shape[1] == 1:
        allowed = allowed[0]  # (1, Hm, r, k) broadcasts over the B·n batch
    else:
        # the fused call's batch index is b·n + i: expand the mask to match
        allowed = allowed.expand(B, n, *allowed.shape[2:]).flatten(0, 1)  # (B·n, Hm, r, k)
    add = torch.zeros(allowed.shape, dtype=dtype, device=device)
    add.masked_fill_(~allowed.to(device), float("-inf"))
    rows = allowed.any(-1)  # (·, Hm, r)
    return add, (None if bool(rows.all()) else rows.to(device))


def forward(x, jobs: list[Job], scale: float, out_tm: torch.Tensor, lse_tm: torch.Tensor):
    """Accumulate every job into out_tm (B, Tq, H, W) and lse_tm (B, Tq, H), float32+."""
    B, _, H, W = out_tm.shape
    for job in jobs:
        n = len(job.q_starts)
        q_idx = _indices(job.q_starts, job.rows, out_tm.device)  # (n·r,)
        k_idx = _indices(job.k_starts, job.keys, out_tm.device)  # (n·k,)
        q = _gather(x.q_tm, q_idx, n)  # (B·n, H, r, W)
        k, v = _gather(x.k_tm, k_idx, n), _gather(x.v_tm, k_idx, n)  # (B·n, H, k, W)
        add, rows = _job_mask(job, B, q.dtype, q.device)
        o, l = _flash(q, k, v, 0.0, False, attn_mask=add, scale=scale)
        if rows is not None:  # the fused kernel reports lse 0, not -inf, for empty rows
            l = torch.where(rows, l, float("-inf"))
        o = o.transpose(1, 2).reshape(B, n * job.rows, H, W)  # token-major again
        l = l.view(B, n, H, job.rows).transpose(2, 3).reshape(B, n * job.rows, H)
        # merge with what earlier jobs computed for these rows (disjoint keys)
        prev_o, prev_l = out_tm[:, q_idx], lse_tm[:, q_idx]
        new_l = torch.logaddexp(prev_l, l)  # (B, n·r, H)
        live = torch.isfinite(new_l)
        w_prev = torch.where(live, torch.exp(prev_l - new_l), 0.0)[..., None]
        w_new = torch.where(live, torch.exp(l - new_l), 0.0)[..., None]
        out_tm[:, q_idx] = prev_o * w_prev + o.to(out_tm.dtype) * w_new
        lse_tm[:, q_idx] = new_l


def backward(x, jobs: list[Job], scale: float, dout_tm, out_tm, lse_tm, grads):
    """Accumulate dq, dk, dv (token-major float32+ buffers in `grads`) over every job.

    lse_tm (B, Tq, H) must already hold +inf for rows that see nothing, so that the
    recomputed probabilities exp(S − lse) are 0 there.
    """
    B, _, H, W = dout_tm.shape
    for job in jobs:
        n = len(job.q_starts)
        q_idx = _indices(job.q_starts, job.rows, dout_tm.device)
        k_idx = _indices(job.k_starts, job.keys, dout_tm.device)
        q, do, o = (_gather(t, q_idx, n) for t in (x.q_tm, dout_tm, out_tm))  # (B·n, H, r, W)
        k, v = _gather(x.k_tm, k_idx, n), _gather(x.v_tm, k_idx, n)  # (B·n, H, k, W)
        l = lse_tm[:, q_idx].view(B * n, job.rows, H).transpose(1, 2).contiguous()
        add, _ = _job_mask(job, B, q.dtype, q.device)
        dq, dk, dv = _flash_backward(do, q, k, v, o, l, 0.0, False, attn_mask=add, scale=scale)
        dq = dq.transpose(1, 2).reshape(B, n * job.rows, H, W)
        grads["q"].index_add_(1, q_idx, dq.to(grads["q"].dtype))
        for name, d in (("k", dk), ("v", dv)):
            d = d.transpose(1, 2).reshape(B, n * job.keys, H, W)  # spans may overlap
            grads[name].index_add_(1, k_idx, d.to(grads[name].dtype))
