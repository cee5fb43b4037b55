"""attn_implementation="qkv" inside transformers equals "eager" on tiny random models.

Letters: B batch, H heads, Tq/Tk query/key lengths. Models are built from configs (hidden
size 32, 2 layers, vocabulary 100; nothing is downloaded). Each family runs the same
weights with "eager" (transformers' own, everything materialised) and "qkv".

Rows of padding tokens see no key at all under left padding: qkv gives them 0 where eager
averages every value, so outputs are compared on real tokens (which never read those rows).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
masking_utils = pytest.importorskip("transformers.masking_utils")

import qkv  # noqa: E402
from qkv.interop import transformers as qkv_hf  # noqa: E402

NAME = qkv_hf.register()
VOCAB, T = 100, 12
ATOL = 1e-4  # float32 logits / hidden states (the spec's bound)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _decoder_common():
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                pad_token_id=0)  # fmt: skip


def _config(family: str):
    if family == "llama":  # grouped-query attention: 4 query heads share 2 kv heads
        return transformers.LlamaConfig(**_decoder_common())
    if family == "mistral":  # every layer a sliding window of 4 keys
        return transformers.MistralConfig(**_decoder_common(), sliding_window=4)
    if family == "qwen2":  # layer 0 full attention, layer 1 a window of 5 (per-layer types)
        return transformers.Qwen2Config(
            **_decoder_common(), use_sliding_window=True, sliding_window=5, max_window_layers=1
        )
    if family == "gemma3":  # per-layer sliding and full layers; scaling 1/4, not 1/sqrt(8)
        common = {**_decoder_common(), "hidden_size": 32}
        return transformers.Gemma3TextConfig(
            **common, head_dim=8, sliding_window=4, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                       n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, pad_token_id=0)  # fmt: skip
    if family == "bert":
        return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=48,
                                       max_position_embeddings=64, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0)  # fmt: skip
    raise AssertionError(family)


DECODERS = ["llama", "mistral", "qwen2", "gemma3", "gpt2"]
FAMILIES = [*DECODERS, "bert"]
_MODELS: dict = {}


def _model(family: str):
    """One tiny random model per family (seeded), shared by the tests, in eval mode."""
    if family not in _MODELS:
        torch.manual_seed(0)
        config = _config(family)
        config._attn_implementation = "eager"
        cls = transformers.BertModel if family == "bert" else transformers.AutoModelForCausalLM
        model = cls(config) if family == "bert" else cls.from_config(config)
        _MODELS[family] = model
    model = _MODELS[family]
    model.eval()
    return model


def _with(model, impl: str):
    model.set_attn_implementation(impl)
    return model


def _batch(family: str):
    """(input_ids, attention_mask): left padding for decoders, right padding for BERT."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    if family == "bert":
        mask[1, 8:] = 0
        mask[2, 3:] = 0
    else:
        mask[1, :5] = 0
        mask[2, :2] = 0
    ids[mask == 0] = 0
    return ids, mask


def _outputs(model, ids, mask, **kw):
    out = model(input_ids=ids, attention_mask=mask, **kw)
    main = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
    return main, out.attentions


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_and_attention_weights_equal_eager(family):
    model = _model(family)
    ids, mask = _batch(family)
    with torch.no_grad():
        want, want_w = _outputs(_with(model, "eager"), ids, mask, output_attentions=True)
        got, got_w = _outputs(_with(model, NAME), ids, mask, output_attentions=True)
        plain, none_w = _outputs(model, ids, mask)  # without weights: the fused/tiled path
    real = mask.bool()
    assert (got - want)[real].abs().max() <= ATOL
    assert (plain - want)[real].abs().max() <= ATOL
    assert none_w is None
    assert len(got_w) == len(want_w) == 2
    for g, w in zip(got_w, want_w, strict=True):
        assert g.shape == w.shape  # (B, H, Tq, Tk): every query head, GQA included
        rows = real[:, None, :, None].expand_as(w)
        assert (g - w)[rows].abs().max() <= 1e-5


@pytest.mark.parametrize("family", DECODERS)
def test_greedy_generate_left_padded_equals_eager(family):
    model = _model(family)
    ids, mask = _batch(family)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = _with(model, "eager").generate(input_ids=ids, attention_mask=mask, **kw)
        got = _with(model, NAME).generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)


def _loss(model, family, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    if family == "bert":
        # a fixed random projection (a sum of squares after LayerNorm is nearly constant)
        w = torch.randn(out.last_hidden_state.shape, generator=torch.Generator().manual_seed(5))
        return (out.last_hidden_state * w * mask[..., None]).sum()
    # next-token loss from real tokens only (transformers' labels= would also score the last
    # padding position, whose row sees nothing, predicting the first real token)
    both = (mask[:, :-1] * mask[:, 1:]).bool()
    return torch.nn.functional.cross_entropy(out.logits[:, :-1][both], ids[:, 1:][both])


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gradients_equal_eager(family):
    model = _model(family)
    ids, mask = _batch(family)
    grads = {}
    for impl in ("eager", NAME):
        _with(model, impl).train()
        model.zero_grad(set_to_none=True)
        _loss(model, family, ids, mask).backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.eval()
    assert grads["eager"].keys() == grads[NAME].keys()
    for n, want in grads["eager"].items():
        err = (grads[NAME][n] - want).abs().max()
        assert err <= 1e-5 + 1e-4 * want.abs().max(), n


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_training_step_gradients_equal_eager(family, seen):
    """Packed sequences (position ids restart per document, no padding) in model.train()."""
    model = _model(family)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(1, VOCAB, (2, 20), generator=g)
    pos = torch.cat([torch.cat([torch.arange(n) for n in lens])[None] for lens in ([7, 13], [20])])
    grads = {}
    for impl in ("eager", NAME):
        _with(model, impl).train()
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
        ).backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.eval()
    assert seen and all("document(" in repr(m) for m, *_ in seen)  # the documents reached qkv
    for n, want in grads["eager"].items():
        assert (grads[NAME][n] - want).abs().max() <= 1e-5 + 1e-4 * want.abs().max(), n


def test_dropout_follows_torch_seed():
    config = _config("llama")
    config.attention_dropout = 0.5
    config._attn_implementation = NAME
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).train()
    ids, mask = _batch("llama")
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(model(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def _tensors(mask):
    """Every tensor a qkv mask holds (walking its combinations)."""
    found = []
    for name in ("lengths", "ids", "kv_ids", "tensor"):
        if isinstance(getattr(mask, name, None), torch.Tensor):
            found.append(getattr(mask, name))
    for part in getattr(mask, "parts", ()):
        found += _tensors(part)
    for name in ("inner", "mask"):  # Not's inner mask, a TilePlan's mask
        if isinstance(getattr(mask, name, None), qkv.masks.Mask):
            found += _tensors(getattr(mask, name))
    return found


@pytest.fixture
def seen(monkeypatch):
    """The masks reaching qkv.attention from the backend, with the call's sizes."""
    calls = []
    real = qkv_hf.attention

    def spy(q, k, v, **kw):
        calls.append((kw["mask"], kw["causal"], q.shape[2], k.shape[2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(qkv_hf, "attention", spy)
    return calls


@pytest.mark.parametrize(
    "family, case",
    [("llama", "causal"), ("mistral", "window"), ("llama", "padding"), ("llama", "packed"),
     ("qwen2", "padding"), ("bert", "padding")],
)  # fmt: skip
def test_masks_reaching_qkv_are_structured(family, case, seen):
    model = _model(family)
    B, L = 2, 40  # long enough that a (Tq, Tk) tensor could not hide among O(T) ones
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask, kw = None, {}
    if case == "padding":
        mask = torch.ones(B, L, dtype=torch.long)
        mask[1, :7] = 0  # left padding
        if family == "bert":
            mask = mask.flip(1)  # right padding
    if case == "packed":  # three documents in row 0, two in row 1: positions restart
        kw["use_cache"] = False  # transformers looks for documents only without a cache
        kw["position_ids"] = torch.cat(
            [torch.cat([torch.arange(n) for n in lens])[None] for lens in ([10, 20, 10], [25, 15])]
        )
    with torch.no_grad():
        got = _outputs(_with(model, NAME), ids, mask, **kw)[0]
        want = _outputs(_with(model, "eager"), ids, mask, **kw)[0]
    real = torch.ones(B, L, dtype=torch.bool) if mask is None else mask.bool()
    assert (got - want)[real].abs().max() <= ATOL
    assert len(seen) == 2  # one call per layer
    # built once per forward per kind of layer (Qwen2 here has a full and a sliding one)
    kinds = len(set(getattr(model.config, "layer_types", None) or ["full_attention"]))
    assert len({id(m) for m, *_ in seen}) == kinds
    for m, causal, Tq, Tk in seen:
        assert (Tq, Tk) == (L, L)
        if case == "causal":
            assert m is None and causal  # qkv's own causal kernels
            continue
        assert m is not None and not causal
        assert "from_dense" not in repr(m)
        if case in ("padding", "packed"):
            assert _tensors(m)  # the walk reaches the lengths / ids
        for t in _tensors(m):
            assert t.dim() <= 2 and t.numel() <= B * L, (case, tuple(t.shape))


def test_the_tile_plan_is_built_once_per_forward(monkeypatch):
    pad = torch.ones(2, 600, dtype=torch.long)
    pad[1, :77] = 0
    prepared = qkv_hf.build_mask(batch_size=2, q_length=600, kv_length=600, attention_mask=pad)
    plan = prepared.mask
    assert isinstance(plan, qkv.kernels.TilePlan) and (plan.Tq, plan.Tk) == (600, 600)
    inner = plan.mask  # causal() & ~padding([0, 77])
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 600, 16, generator=g) for _ in range(3))
    want = qkv.attention(q, k, v, mask=inner)
    calls = []
    for name in ("block_kinds", "region_kinds", "submask"):
        real = getattr(inner, name)
        monkeypatch.setattr(inner, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    for _layer in range(3):  # every layer runs the plan: the mask is not evaluated again
        assert (qkv.attention(q, k, v, mask=plan) - want).abs().max() <= 1e-6
    assert calls == []


def _eager_attention(module, q, k, v, mask4d):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward(module, q, k, v, mask4d, scaling=q.shape[-1] ** -0.5)[0]


def test_unrecognised_mask_function_still_gives_eagers_answer():
    config = _config("llama")
    module = _model("llama").model.layers[0].self_attn
    B, H, Hkv, L, D = 2, 4, 2, 20, 8
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (H, Hkv, Hkv))
    embeds = torch.zeros(B, L, 32)
    pad = torch.ones(B, L, dtype=torch.long)
    pad[0, :3] = 0

    def every_third(b, h, q_idx, kv_idx):  # a mask_function transformers was given by a model
        return kv_idx % 3 != 1

    made = {}
    for impl in ("eager", NAME):
        config._attn_implementation = impl
        made[impl] = masking_utils.create_causal_mask(
            config=config, inputs_embeds=embeds, attention_mask=pad, cache=None,
            and_mask_function=every_third,
        )  # fmt: skip
    prepared = made[NAME]
    assert isinstance(prepared, qkv_hf.PreparedMask) and not prepared.structured
    got = qkv_hf.attention_forward(module, q, k, v, prepared, scaling=D**-0.5)[0]
    want = _eager_attention(module, q, k, v, made["eager"])
    assert (got - want)[pad.bool()].abs().max() <= 1e-5


def _dense_reference(**kw):
    return masking_utils.sdpa_mask(allow_is_causal_skip=False, **kw)  # (B, 1, Tq, Tk) bool


def _as_dense(prepared, B, Tq, Tk):
    if prepared.causal:
        return qkv.masks.causal().to_dense(B, 1, Tq, Tk)
    if prepared.mask is None:
        return torch.ones(B, 1, Tq, Tk, dtype=torch.bool)
    return prepared.mask.to_dense(B, 1, Tq, Tk)


mu = masking_utils
_LEFT = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 12])
_HOLES = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 12])


@pytest.mark.parametrize(
    "what, fn, Tq, Tk, q_offset, kv_offset, pad",
    [
        ("prefill", mu.causal_mask_function, 12, 12, 0, 0, None),
        ("decode step", mu.causal_mask_function, 1, 12, 11, 0, _LEFT),
        ("chunked prefill", mu.causal_mask_function, 4, 12, 8, 0, _LEFT),
        ("static cache", mu.causal_mask_function, 3, 12, 5, 0, None),
        ("window prefill", mu.sliding_window_causal_mask_function(4), 12, 12, 0, 0, _LEFT),
        ("window cache", mu.sliding_window_causal_mask_function(4), 1, 4, 11, 8, _LEFT),
        ("window chunk", mu.sliding_window_causal_mask_function(4), 3, 6, 9, 6, None),
        ("bidirectional", mu.bidirectional_mask_function, 12, 12, 0, 0, _HOLES),
        ("local", mu.sliding_window_bidirectional_mask_function(2), 12, 12, 0, 0, None),
        ("chunked", mu.chunked_causal_mask_function(5, torch.tensor([2, 0])), 12, 12, 0, 0, _LEFT),
        ("blocks", mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(
            torch.tensor([[-1, -1, 0, 0, 0, -1, 1, 1, -1, -1, -1, -1]] * 2))), 12, 12, 0, 0, None),
    ],
)  # fmt: skip
def test_mask_translation_equals_transformers_dense_mask(
    what, fn, Tq, Tk, q_offset, kv_offset, pad
):
    B = 2
    kw = dict(batch_size=B, q_length=Tq, kv_length=Tk, q_offset=q_offset, kv_offset=kv_offset,
              mask_function=fn, attention_mask=None if pad is None else pad.bool())  # fmt: skip
    prepared = qkv_hf.build_mask(**kw)
    assert prepared.structured, (what, prepared.reason)
    assert torch.equal(_as_dense(prepared, B, Tq, Tk), _dense_reference(**kw).expand(B, 1, Tq, Tk))


def test_mask_translation_on_random_descriptions():
    """Random offsets (consistent with a cache or not), windows, chunks and paddings."""
    g = torch.Generator().manual_seed(7)

    def pick(n):
        return int(torch.randint(n, (), generator=g))

    for case in range(60):
        B, Tq = 2, 1 + pick(9)
        Tk = Tq + pick(12)
        q_offset, kv_offset = pick(20), pick(20)
        w = 1 + pick(8)
        fn = [
            mu.causal_mask_function,
            mu.sliding_window_causal_mask_function(w),
            mu.bidirectional_mask_function,
            mu.sliding_window_bidirectional_mask_function(w),
            mu.chunked_causal_mask_function(w, torch.tensor([pick(3), 0])),
        ][case % 5]
        L = kv_offset + Tk - pick(3)  # sometimes shorter than the keys: the rest is padding
        pad = torch.ones(B, L, dtype=torch.bool)
        kind = pick(4)
        if kind == 1:
            pad[0, : pick(L)] = False  # left
        elif kind == 2:
            pad[1, L - pick(L) :] = False  # right
        elif kind == 3:
            pad = torch.rand(B, L, generator=g) > 0.3  # holes
        kw = dict(batch_size=B, q_length=Tq, kv_length=Tk, q_offset=q_offset,
                  kv_offset=kv_offset, mask_function=fn, attention_mask=pad)  # fmt: skip
        prepared = qkv_hf.build_mask(**kw)
        assert prepared.structured, (case, prepared.reason)
        want = _dense_reference(**kw).expand(B, 1, Tq, Tk)
        assert torch.equal(_as_dense(prepared, B, Tq, Tk), want), (case, kw, prepared)


def test_position_bias_is_added_like_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 4, 6, 6, generator=g)
    prepared = qkv_hf.build_mask(batch_size=2, q_length=6, kv_length=6)
    got = qkv_hf.attention_forward(module, q, k, v, prepared, position_bias=bias)[0]
    causal = mu.sdpa_mask(batch_size=2, q_length=6, kv_length=6, allow_is_causal_skip=False)
    want = sdpa_attention_forward(module, q, k, v, causal, position_bias=bias)[0]
    assert (got - want).abs().max() <= 1e-5


def test_unsupported_options_raise_naming_the_model_option():
    module = _model("llama").model.layers[0].self_attn
    q = k = v = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        qkv_hf.attention_forward(module, q, k, v, None, softcap=50.0)
    with pytest.raises(ValueError, match="sinks"):
        qkv_hf.attention_forward(module, q, k, v, None, s_aux=torch.zeros(4))
    with pytest.raises(TypeError, match="attention_mask"):
        qkv_hf.attention_forward(module, q, k, v, "causal")


def test_gemma2_logit_softcapping_is_refused_not_ignored():
    config = transformers.Gemma2Config(
        **_decoder_common(), head_dim=8, sliding_window=4, attn_logit_softcapping=50.0
    )
    config._attn_implementation = NAME
    model = transformers.Gemma2ForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"attn_logit_softcapping=50\.0"), torch.no_grad():
        model(input_ids=_batch("llama")[0])


def test_register_is_idempotent_and_refuses_transformers_names():
    assert qkv_hf.register() == qkv_hf.register() == "qkv"
    assert qkv_hf.register("qkv_other") == "qkv_other"
    assert "qkv_other" in transformers.AttentionInterface()
    assert "qkv_other" in masking_utils.AttentionMaskInterface()
    for bad in ("sdpa", "eager", "flash_attention_2"):
        with pytest.raises(ValueError, match="transformers' own"):
            qkv_hf.register(bad)
    with pytest.raises(TypeError, match="name"):
        qkv_hf.register("")


def test_register_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r'pip install "qkv\[transformers\]"'):
        qkv_hf.register()


def test_importing_qkv_interop_does_not_import_transformers():
    code = (
        "import sys, qkv.interop, qkv.interop.transformers; "
        "assert 'transformers' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_saved_checkpoint_loads_with_qkv(tmp_path):
    model = _with(_model("llama"), "eager")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=NAME)
    assert loaded.config._attn_implementation == NAME
    ids, mask = _batch("llama")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = loaded.eval()(input_ids=ids, attention_mask=mask).logits
    assert (got - want)[mask.bool()].abs().max() <= ATOL
