"""Incremental decoding: the KV cache equals full recomputation; greedy and beam search.

Letters: B batch, K beams, P prompt length, N new tokens, V vocabulary, E width, H heads.
Every equivalence is checked in float64 to 1e-10: a cache bug (wrong position, wrong
row after a beam reorder, a stale key) shows up as an O(1) difference, not rounding.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import randn64 as _randn
from qkv.nn import (
    ALiBi,
    DecoderLM,
    DecoderLMConfig,
    Encoded,
    MultiHeadAttention,
    RotaryEmbedding,
    Transformer,
    TransformerConfig,
    generate,
)

F64 = torch.float64
TIGHT = {"atol": 1e-10, "rtol": 1e-10}
POSITIONAL = ["sinusoidal", "learned", "rope", "alibi"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(B, T, V, seed=0, low=3):
    return torch.randint(low, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _seq2seq(positional="sinusoidal", **overrides) -> Transformer:
    options = dict(
        src_vocab_size=13, tgt_vocab_size=9, embed_dim=16, num_heads=4, num_kv_heads=2,
        num_encoder_layers=2, num_decoder_layers=2, ffn_dim=24, dropout=0.0,
        positional=positional,
    )  # fmt: skip
    torch.manual_seed(0)
    return Transformer(TransformerConfig(**{**options, **overrides})).double().eval()


def _lm(positional="rope", **overrides) -> DecoderLM:
    options = dict(
        vocab_size=9, embed_dim=16, num_heads=4, num_layers=2, ffn_dim=24, dropout=0.0,
        positional=positional,
    )  # fmt: skip
    torch.manual_seed(0)
    return DecoderLM(DecoderLMConfig(**{**options, **overrides})).double().eval()


CHUNKS = [3, 1, 1, 2, 1]  # a prefill, then single tokens, then a two-token step


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"num_kv_heads": 2, "rotary": RotaryEmbedding(4)},
        {"alibi": ALiBi(4)},
        {"score": "cosine", "num_kv_heads": 1},
    ],
    ids=["mha", "gqa+rope", "alibi", "cosine+mqa"],
)
def test_module_cache_equals_full_causal_attention(options):
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 4, dtype=F64, **options).eval()
    x = _randn(2, sum(CHUNKS), 16, seed=1)
    full, full_w = m(x, causal=True, need_weights=True)
    cache = m.new_cache(capacity=2)  # tiny on purpose: the buffers must double twice
    start = 0
    for n in CHUNKS:
        out, w = m(x[:, start : start + n], causal=True, need_weights=True, cache=cache)
        start += n
        torch.testing.assert_close(out, full[:, start - n : start], **TIGHT)
        torch.testing.assert_close(w, full_w[:, :, start - n : start, :start], **TIGHT)
    assert cache.length == sum(CHUNKS) and cache.capacity >= cache.length


def test_cross_attention_cache_is_filled_once_and_reused():
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 4, kdim=6, vdim=5, dtype=F64).eval()
    memory = _randn(2, 7, 6, seed=1), _randn(2, 7, 5, seed=2)
    q = _randn(2, 3, 16, seed=3)
    cache = m.new_cache(cross=True)
    first = m(q[:, :1], *memory, cache=cache)
    stored = cache.keys()
    later = m(q[:, 1:], cache=cache)  # no key/value: they come from the cache
    assert cache.keys() is stored or torch.equal(cache.keys(), stored)
    torch.testing.assert_close(torch.cat([first, later], 1), m(q, *memory), **TIGHT)


@pytest.mark.parametrize("positional", POSITIONAL)
def test_seq2seq_cached_decoding_equals_full_recomputation(positional):
    model = _seq2seq(positional, norm_first=positional != "learned")
    src = _tokens(2, 6, 13, seed=1)
    src[1, 4:] = 0  # padding in row 1
    tgt = torch.cat([torch.ones(2, 1, dtype=torch.long), _tokens(2, 7, 9, seed=2)], 1)
    encoded = model.encode(src)
    full = model.decode(tgt, encoded)  # (B, T, V): one pass, causal mask
    cache = model.new_cache()
    start = 0
    for n in [*CHUNKS, len(tgt[0]) - sum(CHUNKS)]:
        step = model.decode(tgt[:, start : start + n], encoded, cache=cache)
        torch.testing.assert_close(step, full[:, start : start + n], **TIGHT)
        start += n
        # Cross-attention keys/values were computed from the memory at the first step and
        # are reused: a poisoned memory from now on must change nothing.
        encoded = Encoded(torch.full_like(encoded.memory, float("nan")), encoded.mask)
    assert len(cache) == tgt.shape[1]
    assert all(layer.cross_attn.length == 6 for layer in cache.layers)  # S source keys


@pytest.mark.parametrize("positional", POSITIONAL)
def test_decoder_lm_cached_decoding_equals_full_recomputation(positional):
    model = _lm(positional, num_kv_heads=2 if positional == "rope" else None)
    tokens = _tokens(2, 9, 9, seed=3)
    full = model(tokens)
    cache = model.new_cache(capacity=4)
    start = 0
    for n in [*CHUNKS, 1]:
        step = model(tokens[:, start : start + n], cache=cache)
        torch.testing.assert_close(step, full[:, start : start + n], **TIGHT)
        start += n


def _greedy_by_recomputation(model, src, steps):
    """Greedy decoding with no cache: re-run the whole prefix every step."""
    tgt = torch.ones(src.shape[0], 1, dtype=torch.long)
    for _ in range(steps):
        logits = model(src, tgt)[:, -1]
        tgt = torch.cat([tgt, logits.argmax(-1, keepdim=True)], 1)
    return tgt


def test_greedy_equals_greedy_without_cache():
    model = _seq2seq("rope", eos_id=None)
    src = _tokens(3, 5, 13, seed=4)
    got = generate.greedy(model, src, max_new_tokens=6)
    assert torch.equal(got, _greedy_by_recomputation(model, src, 6))


def _eos_that_appears(model, inputs, prefix_len):
    """A token greedy decoding emits at step 2 of row 0: use it as EOS so rows end early."""
    tokens = generate.greedy(model, inputs, max_new_tokens=3, eos_id=-1)
    return int(tokens[0, prefix_len + 1])


@pytest.mark.parametrize("kind", ["seq2seq", "lm"])
def test_beam_search_with_one_beam_is_greedy(kind):
    if kind == "seq2seq":
        model, inputs, P = _seq2seq("alibi"), _tokens(3, 5, 13, seed=5), 1
    else:
        model, inputs, P = _lm("rope"), _tokens(3, 4, 9, seed=5), 4
    eos = _eos_that_appears(model, inputs, P)
    want = generate.greedy(model, inputs, max_new_tokens=8, eos_id=eos)
    assert bool((want == eos).any())  # at least one row really stopped early
    for penalty in (0.0, 1.0):
        got = generate.beam_search(
            model, inputs, max_new_tokens=8, num_beams=1, eos_id=eos, length_penalty=penalty
        )
        assert torch.equal(got.tokens, want)


def _sequence_log_prob(model, inputs, tokens, P, eos):
    """Sum of log p of the generated tokens, computed in one full pass (no cache)."""
    if isinstance(model, Transformer):
        logits = model(inputs, tokens[:, :-1])
    else:
        logits = model(tokens[:, :-1])
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]  # (B, T-1)
    generated = tokens[:, P:]
    keep = torch.ones_like(generated, dtype=torch.bool)
    for b in range(generated.shape[0]):  # count up to and including the first EOS
        ends = (generated[b] == eos).nonzero() if eos is not None else []
        if len(ends):
            keep[b, int(ends[0]) + 1 :] = False
    return (logp[:, P - 1 :] * keep).sum(-1), keep.sum(-1)


@pytest.mark.parametrize("stop", ["no-eos", "eos"])
@pytest.mark.parametrize("kind", ["seq2seq", "lm"])
def test_beam_scores_equal_recomputed_log_probabilities(kind, stop):
    """The reported score of each best hypothesis equals its log-probability recomputed
    without any cache: the cache rows were reordered with their beams correctly."""
    if kind == "seq2seq":
        model, inputs, P = _seq2seq("rope", eos_id=None), _tokens(2, 5, 13, seed=6), 1
    else:
        model, inputs, P = _lm("alibi"), _tokens(2, 3, 9, seed=6), 3
    eos = _eos_that_appears(model, inputs, P) if stop == "eos" else None
    result = generate.beam_search(
        model, inputs, max_new_tokens=7, num_beams=3, eos_id=eos, length_penalty=1.0
    )
    total, lengths = _sequence_log_prob(model, inputs, result.tokens, P, eos)
    torch.testing.assert_close(result.scores, total / lengths.double(), **TIGHT)
    assert bool((lengths < 7).any()) == (eos is not None)


def test_wide_beam_search_finds_the_best_sequence():
    """With K = V^(N-1) beams no prefix is ever dropped: beam search is exact search."""
    model = _lm("sinusoidal", vocab_size=4, eos_id=None)
    prompts, N, V = _tokens(2, 2, 4, seed=7, low=1), 3, 4
    result = generate.beam_search(
        model, prompts, max_new_tokens=N, num_beams=V ** (N - 1), length_penalty=0.0
    )
    every = torch.tensor(list(itertools.product(range(V), repeat=N)))  # (V^N, N)
    for b in range(2):
        seqs = torch.cat([prompts[b].expand(len(every), -1), every], 1)  # (V^N, P + N)
        logp = torch.log_softmax(model(seqs[:, :-1]), -1)
        scores = logp.gather(-1, seqs[:, 1:, None])[..., 0][:, 1:].sum(-1)  # (V^N,)
        assert torch.equal(result.tokens[b], seqs[scores.argmax()])
        torch.testing.assert_close(result.scores[b], scores.max(), **TIGHT)


def test_cache_from_another_model_raises():
    a, b = _seq2seq(), _seq2seq()
    src = _tokens(1, 4, 13)
    tgt = torch.ones(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="another model"):
        b.decode(tgt, b.encode(src), cache=a.new_cache())
    lm1, lm2 = _lm(), _lm()
    with pytest.raises(ValueError, match="another model"):
        lm2(_tokens(1, 2, 9), cache=lm1.new_cache())
    cache = lm1.new_cache()
    lm1(_tokens(1, 2, 9), cache=cache)
    with pytest.raises(ValueError, match="another batch"):
        lm1(_tokens(2, 1, 9), cache=cache)


def test_generation_arguments_are_checked():
    model = _lm()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate.greedy(model, _tokens(1, 2, 9), max_new_tokens=-1)
    with pytest.raises(ValueError, match="num_beams"):
        generate.beam_search(model, _tokens(1, 2, 9), max_new_tokens=2, num_beams=0)
    with pytest.raises(ValueError, match="prompt"):
        generate.greedy(model, torch.zeros(2, 0, dtype=torch.long), max_new_tokens=2)
