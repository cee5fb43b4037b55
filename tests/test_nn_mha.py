"""MultiHeadAttention: equal to torch.nn.MultiheadAttention and to the NumPy truth.

Letters: B batch, Tq/Tk lengths, E width, Ek/Ev key/value widths, H heads, D head dim.
Everything is float64 so that disagreements are bugs, not rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qkv
from conftest import randn64 as _randn
from qkv.nn import ALiBi, MultiHeadAttention, RotaryEmbedding

F64 = torch.float64
TIGHT = {"atol": 1e-10, "rtol": 1e-10}


pytestmark = pytest.mark.usefixtures("one_thread")


def _torch_mha(E, H, *, kdim=None, vdim=None, bias=True, batch_first=True, seed=0, **kw):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(
        E, H, kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first, dtype=F64, **kw
    )
    if bias:  # torch starts its biases at zero; random ones test that they are copied right
        with torch.no_grad():
            m.in_proj_bias.normal_()
            m.out_proj.bias.normal_()
    return m.eval()


def _torch_grads(m: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
    """torch's parameter gradients under qkv's names (in_proj split into q, k, v)."""
    E = m.embed_dim
    if m.in_proj_weight is not None:
        wq, wk, wv = m.in_proj_weight.grad.split(E)
    else:
        wq, wk, wv = m.q_proj_weight.grad, m.k_proj_weight.grad, m.v_proj_weight.grad
    grads = {"q_proj.weight": wq, "k_proj.weight": wk, "v_proj.weight": wv}
    grads["out_proj.weight"] = m.out_proj.weight.grad
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias.grad.split(E)
        grads.update({"q_proj.bias": bq, "k_proj.bias": bk, "v_proj.bias": bv})
        grads["out_proj.bias"] = m.out_proj.bias.grad
    return grads


# (kdim, vdim, bias, batch_first, mask kind)
CASES = [
    (None, None, True, True, None),
    (None, None, True, False, "padding"),
    (None, None, False, True, "causal"),
    (7, 5, True, True, "padding"),
    (7, 5, False, False, None),
    (None, None, True, True, "causal+padding"),
]


@pytest.mark.parametrize(("kdim", "vdim", "bias", "batch_first", "masking"), CASES)
def test_from_torch_matches_torch_outputs_weights_and_gradients(
    kdim, vdim, bias, batch_first, masking
):
    B, E, H = 2, 12, 3
    causal = masking is not None and "causal" in masking
    Tq = 5
    Tk = Tq if (causal or kdim is None) else 6
    ref = _torch_mha(E, H, kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first)
    ours = MultiHeadAttention.from_torch(ref)

    query = _randn(B, Tq, E, seed=1).requires_grad_()
    if kdim is None:
        key = value = query  # self-attention
    else:
        key = _randn(B, Tk, kdim, seed=2).requires_grad_()
        value = _randn(B, Tk, vdim, seed=3).requires_grad_()
    ignore = None  # torch's key_padding_mask: True = ignore this key
    if masking is not None and "padding" in masking:
        ignore = torch.arange(Tk)[None, :] >= torch.tensor([Tk, Tk - 2])[:, None]  # (B, Tk)
    attn_mask = torch.ones(Tq, Tk).triu(1).bool() if causal else None  # torch: True = forbid

    def as_torch(x):
        return x if batch_first else x.transpose(0, 1)  # (T, B, E) when not batch-first

    args = (as_torch(query), as_torch(key), as_torch(value))
    t_out, t_w = ref(
        *args, key_padding_mask=ignore, attn_mask=attn_mask, average_attn_weights=False
    )
    t_out = as_torch(t_out)  # (B, Tq, E)
    # qkv: True = may attend, so torch's padding mask flips at this edge.
    mask = None if ignore is None else ~ignore  # (B, Tk)
    kv = (None, None) if kdim is None else (key, value)
    out, w = ours(query, *kv, mask=mask, causal=causal, need_weights=True)
    torch.testing.assert_close(out, t_out, **TIGHT)
    torch.testing.assert_close(w, t_w, **TIGHT)  # (B, H, Tq, Tk), per head

    dout = _randn(B, Tq, E, seed=4)
    inputs = [query] if kdim is None else [query, key, value]
    ours_grads = torch.autograd.grad(out, inputs + list(ours.parameters()), dout)
    torch_grads = torch.autograd.grad(t_out, inputs + list(ref.parameters()), dout)
    for got, want in zip(ours_grads[: len(inputs)], torch_grads[: len(inputs)], strict=True):
        torch.testing.assert_close(got, want, **TIGHT)
    for p, g in zip(ref.parameters(), torch_grads[len(inputs) :], strict=True):
        p.grad = g
    named = dict(
        zip([n for n, _ in ours.named_parameters()], ours_grads[len(inputs) :], strict=True)
    )
    want = _torch_grads(ref)
    assert set(named) == set(want)
    for name, g in want.items():
        torch.testing.assert_close(named[name], g, **TIGHT, msg=name)


@pytest.mark.parametrize(("kdim", "vdim", "bias"), [(None, None, True), (7, 5, False)])
def test_to_torch_round_trip(kdim, vdim, bias):
    torch.manual_seed(0)
    ours = MultiHeadAttention(12, 4, kdim=kdim, vdim=vdim, bias=bias, dtype=F64).eval()
    theirs = ours.to_torch()
    assert theirs.batch_first
    q = _randn(2, 3, 12, seed=1)
    k = _randn(2, 6, kdim or 12, seed=2)
    v = _randn(2, 6, vdim or 12, seed=3)
    torch.testing.assert_close(ours(q, k, v), theirs(q, k, v)[0], **TIGHT)
    back = MultiHeadAttention.from_torch(theirs)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), back.named_parameters(), strict=True):
        assert n1 == n2
        assert torch.equal(p1, p2), n1


def test_from_torch_rejects_what_qkv_does_not_support():
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_zero_attn=True))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        MultiHeadAttention.from_torch(nn.Linear(8, 8))
    for kw in ({"num_kv_heads": 1}, {"score": "cosine"}, {"rotary": RotaryEmbedding(4)}):
        with pytest.raises(ValueError, match="to_torch"):
            MultiHeadAttention(8, 2, **kw).to_torch()


def test_matches_the_numpy_multi_head_truth():
    B, Tq, Tk, E, H = 2, 4, 6, 8, 2
    torch.manual_seed(3)
    m = MultiHeadAttention(E, H, kdim=5, vdim=3, dtype=F64)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    q, k, v = _randn(B, Tq, E, seed=1), _randn(B, Tk, 5, seed=2), _randn(B, Tk, 3, seed=3)
    keep = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # (B, Tk) True = real key
    fields = {}
    for short, proj in (("q", m.q_proj), ("k", m.k_proj), ("v", m.v_proj), ("o", m.out_proj)):
        fields[f"w_{short}"] = proj.weight.detach().numpy()
        fields[f"b_{short}"] = proj.bias.detach().numpy()
    params = qkv.numpy.MultiHeadParams(**fields)
    want, cache = qkv.numpy.multi_head_attention_forward(
        q.numpy(), k.numpy(), v.numpy(), params, H, mask=keep.numpy()[:, None, None, :]
    )
    out, w = m(q, k, v, mask=keep, need_weights=True)
    np.testing.assert_allclose(out.detach().numpy(), want, atol=1e-10)
    np.testing.assert_allclose(w.detach().numpy(), cache.weights, atol=1e-12)


def test_grouped_query_equals_multi_head_with_repeated_kv_projections():
    B, T, E, H, Hkv = 2, 5, 16, 4, 2
    D, group = E // H, H // Hkv
    torch.manual_seed(0)
    gqa = MultiHeadAttention(E, H, num_kv_heads=Hkv, dtype=F64)
    mha = MultiHeadAttention(E, H, dtype=F64)

    def repeat_heads(t: torch.Tensor) -> torch.Tensor:
        # rows of kv head g (D of them) serve query heads g*group .. g*group + group - 1
        return t.view(Hkv, D, *t.shape[1:]).repeat_interleave(group, 0).reshape(H * D, *t.shape[1:])

    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            small, big = getattr(gqa, name), getattr(mha, name)
            small.bias.normal_()
            big.weight.copy_(repeat_heads(small.weight))  # (Hkv*D, E) -> (H*D, E)
            big.bias.copy_(repeat_heads(small.bias))
    x = _randn(B, T, E, seed=1)
    out, w = gqa(x, causal=True, need_weights=True)
    want, want_w = mha(x, causal=True, need_weights=True)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(w, want_w, **TIGHT)
    assert gqa.k_proj.weight.shape == (Hkv * D, E)  # fewer key/value parameters
    mqa = MultiHeadAttention(E, H, num_kv_heads=1)  # multi-query: one key/value head
    assert mqa.k_proj.weight.shape == (D, E)


def test_cosine_scores_are_normalised_q_k_times_learned_temperature():
    B, T, E, H = 1, 4, 8, 2
    torch.manual_seed(0)
    m = MultiHeadAttention(E, H, score="cosine", cosine_scale=5.0, dtype=F64)
    with torch.no_grad():
        m.logit_scale.copy_(torch.tensor([1.0, 2.0], dtype=F64).view(H, 1, 1))
    x = _randn(B, T, E, seed=1)
    _, w = m(x, need_weights=True)
    q = m.q_proj(x).view(B, T, H, 4).transpose(1, 2)  # (B, H, T, D)
    k = m.k_proj(x).view(B, T, H, 4).transpose(1, 2)  # (B, H, T, D)
    cos = torch.nn.functional.cosine_similarity(q[:, :, :, None], k[:, :, None], dim=-1)
    want = torch.softmax(cos * torch.tensor([1.0, 2.0], dtype=F64).exp().view(H, 1, 1), -1)
    torch.testing.assert_close(w, want, **TIGHT)
    # the logits stay bounded by the temperature whatever the size of the activations
    _, w_big = m(1000.0 * x, need_weights=True)
    torch.testing.assert_close(w_big, w, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        {"score": "cosine"},
        {"num_kv_heads": 1, "rotary": RotaryEmbedding(2)},
        {"alibi": ALiBi(2)},
    ],
    ids=["cosine", "mqa+rope", "alibi"],
)
def test_gradcheck(options):
    torch.manual_seed(0)
    m = MultiHeadAttention(4, 2, dtype=F64, **options)
    x = _randn(1, 3, 4, seed=1).requires_grad_()
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        params = dict(zip(names, ps, strict=True))
        return torch.func.functional_call(m, params, (x,), {"causal": True})

    ps = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    assert torch.autograd.gradcheck(f, (x, *ps))


def test_mask_forms_agree():
    B, Tq, Tk, E = 2, 3, 5, 8
    torch.manual_seed(0)
    m = MultiHeadAttention(E, 2, dtype=F64)
    q, kv = _randn(B, Tq, E, seed=1), _randn(B, Tk, E, seed=2)
    lengths = torch.tensor([5, 2])
    keep = torch.arange(Tk)[None, :] < lengths[:, None]  # (B, Tk) True = real key
    want = m(q, kv, mask=qkv.masks.padding(lengths))
    for mask in (keep, keep[:, None, :].expand(B, Tq, Tk), keep[:, None, None, :]):
        torch.testing.assert_close(m(q, kv, mask=mask), want, **TIGHT)
    # a padded key really is ignored: changing it changes nothing
    kv2 = kv.clone()
    kv2[1, 2:] = 100.0
    torch.testing.assert_close(m(q, kv2, mask=keep), want, **TIGHT)


def test_dropout_only_while_training():
    torch.manual_seed(0)
    m = MultiHeadAttention(8, 2, dropout=0.5, dtype=F64)
    x = _randn(2, 6, 8, seed=1)
    m.eval()
    torch.testing.assert_close(m(x), m(x), atol=0, rtol=0)
    m.train()
    assert not torch.allclose(m(x), m.eval()(x))
    m.train()
    _, w = m(x, need_weights=True)  # weights are reported before dropout
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 6, dtype=F64), **TIGHT)


def test_heads_split_features_not_positions():
    # Pitfall 6: each head must see every position. Mask nothing, make one position's value
    # stand out, and every head of every query must weigh it.
    torch.manual_seed(0)
    m = MultiHeadAttention(8, 4, dtype=F64)
    x = _randn(1, 6, 8, seed=1)
    _, w = m(x, need_weights=True)  # (1, 4, 6, 6)
    assert w.shape == (1, 4, 6, 6)
    assert bool((w > 0).all())


def test_keys_and_values_use_their_own_projections():
    # Pitfall 3: keys and values projected with the query's layer. Perturbing k_proj must
    # change the output, perturbing q_proj must not touch the keys.
    torch.manual_seed(0)
    m = MultiHeadAttention(8, 2, dtype=F64)
    assert len({id(p) for p in m.parameters()}) == 8  # q, k, v, out: weight + bias each
    x = _randn(1, 4, 8, seed=1)
    before = m(x)
    with torch.no_grad():
        m.k_proj.weight.add_(0.1)
    assert not torch.allclose(m(x), before)


# ---- errors: clear ValueError/TypeError naming the problem -------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"embed_dim": 10, "num_heads": 3}, ValueError, "divisible by num_heads"),
        ({"embed_dim": 12, "num_heads": 4, "num_kv_heads": 3}, ValueError, "must divide"),
        ({"embed_dim": 8, "num_heads": 2, "dropout": -0.1}, ValueError, "dropout"),
        ({"embed_dim": 8, "num_heads": 2, "dropout": 1.0}, ValueError, "dropout"),
        ({"embed_dim": 8, "num_heads": 0}, ValueError, "num_heads"),
        ({"embed_dim": 8.0, "num_heads": 2}, TypeError, "embed_dim"),
        ({"embed_dim": 8, "num_heads": 2, "score": "dotty"}, ValueError, "score"),
        ({"embed_dim": 8, "num_heads": 2, "rotary": RotaryEmbedding(2)}, ValueError, "head_dim"),
        ({"embed_dim": 8, "num_heads": 2, "alibi": ALiBi(4)}, ValueError, "alibi"),
    ],
)
def test_bad_configuration_raises(kwargs, error, match):
    E, H = kwargs.pop("embed_dim"), kwargs.pop("num_heads")
    with pytest.raises(error, match=match):
        MultiHeadAttention(E, H, **kwargs)


def test_bad_input_raises():
    m = MultiHeadAttention(8, 2, kdim=6, vdim=6, dtype=F64)
    q, k = _randn(2, 3, 8), _randn(2, 4, 6)
    with pytest.raises(ValueError, match=r"add a batch dimension.*unsqueeze\(0\)"):
        m(q[0], k[0])
    with pytest.raises(ValueError, match=r"shape \(B, T, E\)"):
        m(q[None], k)
    with pytest.raises(ValueError, match="query has 7 features but the module expects E=8"):
        m(_randn(2, 3, 7), k)
    with pytest.raises(ValueError, match="key has 8 features but the module expects Ek=6"):
        m(q, _randn(2, 4, 8))
    with pytest.raises(ValueError, match="kdim = vdim = embed_dim"):
        m(q)  # self-attention with kdim != E
    with pytest.raises(ValueError, match="must agree on B"):
        m(q, _randn(3, 4, 6))
    with pytest.raises(TypeError, match=r"float32 but the parameters are torch\.float64"):
        m(q.float(), k.float())
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        m(q.tolist(), k)
    with pytest.raises(ValueError, match=r"key padding mask \(B, Tk\)=\(2, 4\)"):
        m(q, k, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="True = may attend"):
        m(q, k, mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="broadcast"):
        m(q, k, mask=torch.ones(2, 3, 5, dtype=torch.bool))


def test_cache_from_another_module_raises():
    a, b = MultiHeadAttention(8, 2, dtype=F64), MultiHeadAttention(8, 2, dtype=F64)
    x = _randn(1, 1, 8)
    with pytest.raises(ValueError, match="another attention module"):
        b(x, cache=a.new_cache())
    with pytest.raises(TypeError, match="AttentionCache"):
        a(x, cache={"k": None})
    cache = a.new_cache()
    a(x, cache=cache)
    with pytest.raises(ValueError, match="another batch"):
        a(_randn(2, 1, 8), cache=cache)  # a cache holds one batch's rows
    rope = MultiHeadAttention(8, 2, rotary=RotaryEmbedding(4), dtype=F64)
    with pytest.raises(ValueError, match="self-attention"):
        rope(x, x, cache=rope.new_cache(cross=True))
