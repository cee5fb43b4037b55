"""The six pitfalls of the seed notes (DESIGN.md), each caught by qkv's references.

For each: the buggy variant, written as the notes would, disagrees with qkv; the correct
variant agrees. The truth is the float64 NumPy implementation or torch's own modules.
"""

from __future__ import annotations

import numpy as np
import torch

import qkv
from conftest import make_qkv, numpy_truth


def _close(a, b, atol=1e-9) -> bool:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return bool(torch.isfinite(a).all()) and torch.allclose(a, b, atol=atol, rtol=0)


def test_1_softmax_with_one_global_max_instead_of_per_row():
    q, k, v = make_qkv((1, 1, 1, 4, 6, 8, 8), torch.float64)
    q = q.detach().clone()
    q[0, 0, 0] = 300.0 * k[0, 0, 0].detach()  # row 0 scores ~1e3 above every other row's
    q.requires_grad_()
    truth = numpy_truth(q, k, v)["out"]

    s = q @ k.transpose(-2, -1) / 8**0.5
    e = torch.exp(s - s.max())  # BUG: one max for the whole matrix
    buggy = (e / e.sum(-1, keepdim=True)) @ v  # rows far below the max underflow: 0/0
    assert not _close(buggy, truth)

    e = torch.exp(s - s.amax(-1, keepdim=True))  # correct: each row's own max
    assert _close((e / e.sum(-1, keepdim=True)) @ v, truth)
    assert _close(qkv.attention(q, k, v), truth)


def test_2_scaling_after_the_softmax():
    q, k, v = make_qkv((1, 2, 2, 5, 5, 16, 16), torch.float64)
    truth = numpy_truth(q, k, v)["out"]
    s = q @ k.transpose(-2, -1)
    buggy = (torch.softmax(s, -1) / 16**0.5) @ v  # BUG: scaled after normalising
    assert not _close(buggy, truth)
    assert _close(torch.softmax(s / 16**0.5, -1) @ v, truth)
    assert _close(qkv.attention(q, k, v), truth)


def _torch_mha(E, H, seed=0):
    torch.manual_seed(seed)
    return torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)


def _params_of(m):
    E = m.embed_dim
    w, b = m.in_proj_weight.detach().numpy(), m.in_proj_bias.detach().numpy()
    return qkv.numpy.MultiHeadParams(
        w_q=w[:E],
        b_q=b[:E],
        w_k=w[E : 2 * E],
        b_k=b[E : 2 * E],
        w_v=w[2 * E :],
        b_v=b[2 * E :],
        w_o=m.out_proj.weight.detach().numpy(),
        b_o=m.out_proj.bias.detach().numpy(),
    )


def test_3_projecting_keys_and_values_with_the_query_layer():
    E, H = 16, 4
    m = _torch_mha(E, H)
    x = torch.randn(2, 5, E, dtype=torch.float64)
    mem = torch.randn(2, 7, E, dtype=torch.float64)
    want, _ = m(x, mem, mem, need_weights=False)
    p = _params_of(m)
    good, _ = qkv.numpy.multi_head_attention_forward(x.numpy(), mem.numpy(), mem.numpy(), p, H)
    assert _close(good, want)
    bug = qkv.numpy.MultiHeadParams(  # BUG: keys and values through the query's layer
        w_q=p.w_q, b_q=p.b_q, w_k=p.w_q, b_k=p.b_q, w_v=p.w_q, b_v=p.b_q, w_o=p.w_o, b_o=p.b_o
    )
    buggy, _ = qkv.numpy.multi_head_attention_forward(x.numpy(), mem.numpy(), mem.numpy(), bug, H)
    assert not _close(buggy, want)


def test_4_all_false_mask_filled_with_minus_1e9_gives_uniform_weights():
    q, k, v = make_qkv((1, 1, 1, 3, 5, 8, 8), torch.float64)
    mask = torch.zeros(3, 5, dtype=torch.bool)  # nothing may be attended
    s = (q @ k.transpose(-2, -1) / 8**0.5).masked_fill(~mask, -1e9)  # BUG: magic fill
    buggy_w = torch.softmax(s, -1)
    assert torch.allclose(buggy_w, torch.full_like(buggy_w, 0.2))  # silently uniform
    res = qkv.attention(q, k, v, mask=mask, return_weights=True, return_lse=True)
    truth = numpy_truth(q, k, v, mask.expand(1, 1, 3, 5))
    assert _close(res.output, truth["out"]) and (res.output == 0).all()
    assert (res.weights == 0).all() and torch.isneginf(res.lse).all()
    assert not _close(buggy_w @ v, truth["out"])


def test_5_a_decoder_without_causal_mask_sees_the_future():
    """A 'decoder' built from encoder layers lets position t read tokens after t."""
    T = 6
    q, k, v = make_qkv((1, 2, 2, T, T, 8, 8), torch.float64)
    t = 2

    def future_grad(causal):
        for x in (q, k, v):
            x.grad = None
        out = qkv.attention(q, k, v, causal=causal)
        out[0, :, t].sum().backward()
        return k.grad[0, :, t + 1 :].abs().sum() + v.grad[0, :, t + 1 :].abs().sum()

    assert future_grad(causal=False) > 0  # BUG: the future leaks
    assert future_grad(causal=True) == 0  # exactly zero through qkv's causal attention
    # cross-attention (decoder queries, encoder keys) must see every source position
    src_k, src_v = k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    qkv.attention(q, src_k, src_v)[0, :, t].sum().backward()
    assert (src_v.grad[0].abs().sum(-1) > 0).all()


def test_6_splitting_heads_on_the_sequence_axis():
    B, T, E, H = 2, 8, 16, 4
    m = _torch_mha(E, H, seed=1)
    x = torch.randn(B, T, E, dtype=torch.float64)
    want, _ = m(x, x, x, need_weights=False)
    p = _params_of(m)
    good, _ = qkv.numpy.multi_head_attention_forward(x.numpy(), x.numpy(), x.numpy(), p, H)
    assert _close(good, want)

    def proj(w, b):
        return torch.from_numpy(x.numpy() @ w.T + b)  # (B, T, E)

    qp, kp, vp = proj(p.w_q, p.b_q), proj(p.w_k, p.b_k), proj(p.w_v, p.b_v)
    # BUG: (B, T, E) -> (B, H, T/H, E): each "head" holds a quarter of the sentence
    split = [t.reshape(B, H, T // H, E) for t in (qp, kp, vp)]
    heads = qkv.attention(*split)  # (B, H, T/H, E)
    merged = heads.reshape(B, T, E)
    buggy = merged @ torch.from_numpy(p.w_o).T + torch.from_numpy(p.b_o)
    assert not _close(buggy, want)
    # correct: split the feature axis, (B, T, E) -> (B, H, T, E/H)
    split = [t.view(B, T, H, E // H).transpose(1, 2) for t in (qp, kp, vp)]
    merged = qkv.attention(*split).transpose(1, 2).reshape(B, T, E)
    good = merged @ torch.from_numpy(p.w_o).T + torch.from_numpy(p.b_o)
    assert _close(good, want)
    assert np.isfinite(buggy.numpy()).all()
