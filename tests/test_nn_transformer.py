"""Transformer layers, stacks and models: equal to torch's layers, causal, masks propagate.

Letters: B batch, S source length, T target length, E width, H heads, F feed-forward width.
float64 and eval mode throughout, so that torch and qkv must agree to rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import randn64 as _randn
from qkv.nn import (
    DecoderLM,
    DecoderLMConfig,
    MultiHeadAttention,
    Transformer,
    TransformerConfig,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

F64 = torch.float64
TIGHT = {"atol": 1e-10, "rtol": 1e-10}
E, H, F = 12, 3, 20


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere, LayerNorm and biases included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype) + (p.dim() == 1))
    return module


def _copy_from_torch(ours: nn.Module, theirs: nn.Module) -> None:
    """Load a torch Transformer{Encoder,Decoder}Layer's weights into qkv's equivalent."""
    attn_names = [("self_attn", "self_attn"), ("cross_attn", "multihead_attn")]
    for mine, torch_name in attn_names:
        if hasattr(ours, mine):
            mha = MultiHeadAttention.from_torch(getattr(theirs, torch_name))
            getattr(ours, mine).load_state_dict(mha.state_dict())
    ours.ffn.linear1.load_state_dict(theirs.linear1.state_dict())
    ours.ffn.linear2.load_state_dict(theirs.linear2.state_dict())
    for name in ("norm1", "norm2", "norm3"):
        if hasattr(theirs, name):
            getattr(ours, name).load_state_dict(getattr(theirs, name).state_dict())


def _right_padding(lengths, T):
    """torch's key_padding_mask (True = ignore) for right-padded rows of these lengths."""
    return torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]  # (B, T)


def _torch_named(name: str) -> str:
    """qkv's parameter name -> torch's (q/k/v projections become slices of in_proj)."""
    name = name.replace("cross_attn.", "multihead_attn.").replace("ffn.", "")
    for part in ("q_proj", "k_proj", "v_proj"):
        name = name.replace(f"{part}.weight", "in_proj_weight").replace(
            f"{part}.bias", "in_proj_bias"
        )
    return name


def _assert_same_gradients(ours, theirs, inputs, got, want) -> None:
    """Input gradients and every parameter gradient of qkv's layer equal torch's."""
    dout = _randn(*got.shape, seed=9)
    g_ours = torch.autograd.grad(got, [*inputs, *ours.parameters()], dout)
    g_theirs = torch.autograd.grad(want, [*inputs, *theirs.parameters()], dout)
    n = len(inputs)
    for g, w in zip(g_ours[:n], g_theirs[:n], strict=True):
        torch.testing.assert_close(g, w, **TIGHT)
    torch_grads = dict(zip([k for k, _ in theirs.named_parameters()], g_theirs[n:], strict=True))
    grouped: dict[str, list[torch.Tensor]] = {}
    for (name, _), g in zip(ours.named_parameters(), g_ours[n:], strict=True):
        grouped.setdefault(_torch_named(name), []).append(g)  # q, k, v in that order
    assert set(grouped) == set(torch_grads)
    for name, parts in grouped.items():
        torch.testing.assert_close(torch.cat(parts), torch_grads[name], **TIGHT, msg=name)


LAYER_CASES = [(False, "relu"), (True, "relu"), (False, "gelu"), (True, "gelu")]


@pytest.mark.parametrize(("norm_first", "activation"), LAYER_CASES)
def test_encoder_layer_equals_torch(norm_first, activation):
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(
        E, H, dim_feedforward=F, activation=activation, batch_first=True,
        norm_first=norm_first, dtype=F64,
    ).eval()  # fmt: skip
    _randomise(theirs)
    ours = TransformerEncoderLayer(
        E, H, ffn_dim=F, activation=activation, norm_first=norm_first, dtype=F64
    ).eval()
    _copy_from_torch(ours, theirs)
    x = _randn(2, 6, E, seed=1).requires_grad_()
    ignore = _right_padding([6, 4], 6)
    want = theirs(x, src_key_padding_mask=ignore)
    got = ours(x, mask=~ignore)  # qkv: True = real token
    torch.testing.assert_close(got, want, **TIGHT)
    _assert_same_gradients(ours, theirs, [x], got, want)


@pytest.mark.parametrize(("norm_first", "activation"), LAYER_CASES)
def test_decoder_layer_equals_torch(norm_first, activation):
    torch.manual_seed(0)
    theirs = nn.TransformerDecoderLayer(
        E, H, dim_feedforward=F, activation=activation, batch_first=True,
        norm_first=norm_first, dtype=F64,
    ).eval()  # fmt: skip
    _randomise(theirs, seed=1)
    ours = TransformerDecoderLayer(
        E, H, ffn_dim=F, activation=activation, norm_first=norm_first, dtype=F64
    ).eval()
    _copy_from_torch(ours, theirs)
    S, T = 7, 5
    x = _randn(2, T, E, seed=2).requires_grad_()
    memory = _randn(2, S, E, seed=3).requires_grad_()
    tgt_ignore, mem_ignore = _right_padding([5, 3], T), _right_padding([7, 4], S)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # torch: True = may NOT attend
    want = theirs(
        x, memory, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=tgt_ignore,
        memory_key_padding_mask=mem_ignore,
    )  # fmt: skip
    got = ours(x, memory, causal=True, self_mask=~tgt_ignore, memory_mask=~mem_ignore)
    torch.testing.assert_close(got, want, **TIGHT)
    _assert_same_gradients(ours, theirs, [x, memory], got, want)


def test_stacks_equal_torch_stacks_with_final_norm():
    torch.manual_seed(0)
    t_enc_layer = nn.TransformerEncoderLayer(E, H, F, batch_first=True, norm_first=True, dtype=F64)
    t_dec_layer = nn.TransformerDecoderLayer(E, H, F, batch_first=True, norm_first=True, dtype=F64)
    t_enc = nn.TransformerEncoder(
        t_enc_layer, 2, norm=nn.LayerNorm(E, dtype=F64), enable_nested_tensor=False
    )
    t_dec = nn.TransformerDecoder(t_dec_layer, 2, norm=nn.LayerNorm(E, dtype=F64))
    _randomise(t_enc.eval(), seed=2)
    _randomise(t_dec.eval(), seed=3)
    layer = TransformerEncoderLayer(E, H, ffn_dim=F, norm_first=True, dtype=F64)
    enc = TransformerEncoder(layer, 2, norm=nn.LayerNorm(E, dtype=F64)).eval()
    dlayer = TransformerDecoderLayer(E, H, ffn_dim=F, norm_first=True, dtype=F64)
    dec = TransformerDecoder(dlayer, 2, norm=nn.LayerNorm(E, dtype=F64)).eval()
    for ours, theirs in ((enc, t_enc), (dec, t_dec)):
        for mine, their in zip(ours.layers, theirs.layers, strict=True):
            _copy_from_torch(mine, their)
        ours.norm.load_state_dict(theirs.norm.state_dict())
    src, tgt = _randn(2, 6, E, seed=4), _randn(2, 4, E, seed=5)
    ignore = _right_padding([6, 3], 6)
    memory = enc(src, mask=~ignore)
    torch.testing.assert_close(memory, t_enc(src, src_key_padding_mask=ignore), **TIGHT)
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)  # torch: True = may NOT attend
    want = t_dec(tgt, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=ignore)
    torch.testing.assert_close(dec(tgt, memory, memory_mask=~ignore), want, **TIGHT)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_has_no_future_leak_and_sees_every_source_position(norm_first):
    """d out[t] / d x[t'] is exactly 0 for every t' > t, through the whole stack, while the
    cross-attention reaches every real source position and no padded one (pitfall 5)."""
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(E, H, ffn_dim=F, norm_first=norm_first, dtype=F64)
    dec = TransformerDecoder(layer, 2, norm=nn.LayerNorm(E, dtype=F64)).eval()
    B, S, T = 2, 6, 5
    x = _randn(B, T, E, seed=1).requires_grad_()
    memory = _randn(B, S, E, seed=2).requires_grad_()
    real = ~_right_padding([6, 4], S)  # (B, S) True = real source token
    out = dec(x, memory, memory_mask=real)
    probe = _randn(B, E, seed=3)  # not .sum(): the sum of a LayerNorm output is constant
    for t in range(T):
        score = (out[:, t] * probe).sum()
        gx, gm = torch.autograd.grad(score, (x, memory), retain_graph=True)
        per_position = gx.abs().sum(-1)  # (B, T)
        assert torch.equal(per_position[:, t + 1 :], torch.zeros_like(per_position[:, t + 1 :]))
        assert bool((per_position[:, : t + 1] > 0).all())
        seen = gm.abs().sum(-1) > 0  # (B, S)
        assert torch.equal(seen, real)


def test_decoder_lm_has_no_future_leak():
    torch.manual_seed(0)
    config = DecoderLMConfig(
        vocab_size=11, embed_dim=E, num_heads=H, num_kv_heads=1, num_layers=2, ffn_dim=F,
        dropout=0.0, positional="rope",
    )  # fmt: skip
    lm = DecoderLM(config).double().eval()
    captured = {}

    def keep_embeddings(module, args, out):
        out.retain_grad()
        captured["x"] = out

    lm.embed.register_forward_hook(keep_embeddings)
    tokens = torch.randint(1, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    logits = lm(tokens)  # (B, T, V)
    probe = _randn(2, 11, seed=2)
    for t in range(6):
        captured["x"].grad = None
        (logits[:, t] * probe).sum().backward(retain_graph=True)
        per_position = captured["x"].grad.abs().sum(-1)  # (B, T)
        assert torch.equal(per_position[:, t + 1 :], torch.zeros_like(per_position[:, t + 1 :]))
        assert bool((per_position[:, : t + 1] > 0).all())


def _tiny_transformer(**overrides) -> Transformer:
    options = dict(
        src_vocab_size=13, tgt_vocab_size=11, embed_dim=E, num_heads=H, num_encoder_layers=2,
        num_decoder_layers=2, ffn_dim=F, dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return Transformer(TransformerConfig(**{**options, **overrides})).double().eval()


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rope", "alibi", "none"])
def test_transformer_source_padding_is_invisible(positional):
    model = _tiny_transformer(positional=positional, norm_first=positional != "none")
    src = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])  # pad_id 0 at the end of row 1
    tgt = torch.tensor([[1, 4, 5, 6], [1, 4, 5, 6]])
    logits = model(src, tgt)
    assert logits.shape == (2, 4, 11)
    assert bool(torch.isfinite(logits).all())
    # Replace the padding by real-looking tokens, but keep them masked: nothing may change.
    noisy = src.clone()
    noisy[1, 3:] = torch.tensor([12, 3])
    torch.testing.assert_close(model(noisy, tgt, src_mask=src != 0), logits, **TIGHT)
    # A real source token changes every target position (cross-attention sees it) ...
    changed = src.clone()
    changed[:, 0] = 10
    differs = (model(changed, tgt) - logits).abs().amax(-1)  # (B, T)
    assert bool((differs > 1e-9).all())
    # ... while a later target token changes no earlier position.
    tgt2 = tgt.clone()
    tgt2[:, 2] = 9
    torch.testing.assert_close(model(src, tgt2)[:, :2], logits[:, :2], **TIGHT)


def test_transformer_output_head_is_tied_and_embeddings_scaled():
    model = _tiny_transformer()
    assert model.head.weight is model.tgt_embed.token.weight
    assert model.tgt_embed.scale == pytest.approx(E**0.5)
    untied = _tiny_transformer(tie_output=False, scale_embeddings=False)
    assert untied.head.weight is not untied.tgt_embed.token.weight
    assert untied.tgt_embed.scale == 1.0
    assert torch.equal(model.src_embed.token.weight[0], torch.zeros(E, dtype=F64))  # pad row


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"embed_dim": 10}, "divisible by num_heads"),
        ({"num_kv_heads": 2}, "must divide num_heads"),
        ({"dropout": 1.5}, "dropout"),
        ({"positional": "bogus"}, "positional"),
        ({"num_encoder_layers": 0}, "num_encoder_layers"),
        ({"embed_dim": 6, "num_heads": 2}, "even head dim"),
        ({"eos_id": 11}, "eos_id"),
    ],
)
def test_bad_transformer_config_raises(overrides, match):
    options = dict(src_vocab_size=13, tgt_vocab_size=11, embed_dim=12, num_heads=3)
    options["positional"] = "rope" if "even" in match else "sinusoidal"
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**{**options, **overrides})


def test_bad_layer_input_raises():
    layer = TransformerEncoderLayer(E, H, ffn_dim=F, dtype=F64)
    with pytest.raises(ValueError, match="add a batch dimension"):
        layer(_randn(5, E))
    with pytest.raises(ValueError, match="activation"):
        TransformerEncoderLayer(E, H, activation="swish")
    with pytest.raises(ValueError, match="dropout"):
        TransformerDecoderLayer(E, H, dropout=-0.5)
    model = _tiny_transformer()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 13\)"):
        model(torch.tensor([[13]]), torch.tensor([[1]]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 2), torch.tensor([[1]]))


def test_a_few_training_steps_learn_to_copy():
    """End to end: the loss of a tiny copy task falls (gradients reach every part)."""
    model = _tiny_transformer(positional="rope").float().train()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, 11, (16, 6), generator=g)  # ids valid in both vocabularies
    tgt = torch.cat([torch.ones(16, 1, dtype=torch.long), src], 1)  # BOS + copy
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        logits = model(src, tgt[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 11), tgt[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
