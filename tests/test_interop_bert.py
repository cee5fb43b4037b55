"""load_hf_bert equals transformers.BertModel on a tiny random BERT saved by the test itself.

Letters: B batch, T length, E hidden size. Nothing is fetched from a hub (HF_HUB_OFFLINE).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from qkv.interop import load_hf_bert  # noqa: E402

VOCAB, E = 40, 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids contention on a shared machine (and is faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**overrides):
    options = dict(
        vocab_size=VOCAB, hidden_size=E, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=24, max_position_embeddings=20, type_vocab_size=2,
        layer_norm_eps=1e-3, attn_implementation="eager",  # not torch's 1e-5: must be read
    )  # fmt: skip
    return transformers.BertConfig(**{**options, **overrides})


def _randomise(model, seed=0):
    """BERT's init leaves biases at 0 and LayerNorms at 1: make every weight matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (p.dim() == 1))
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0  # right padding
    attention_mask[2, 3:] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = (torch.arange(9) >= 4).long().expand(3, 9).contiguous()  # segments A, B
    return input_ids, attention_mask, token_type_ids


def _bert_model(task: str):
    torch.manual_seed(0)
    if task == "base":
        model = transformers.BertModel(_config())
        return _randomise(model).eval(), model
    model = transformers.BertForMaskedLM(_config())  # weights saved as "bert.*" plus "cls.*"
    _randomise(model)
    return model.eval(), model.bert.eval()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("task", ["base", "masked-lm"])
def test_load_hf_bert_equals_transformers(tmp_path, fmt, task):
    saved, encoder = _bert_model(task)
    if fmt == "safetensors":
        saved.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").is_file()
    else:
        saved.config.to_json_file(tmp_path / "config.json")
        state = saved.state_dict()
        state["bert.embeddings.position_ids" if task != "base" else "embeddings.position_ids"] = (
            torch.arange(20)[None]  # an integer buffer, as older checkpoints carry
        )
        torch.save(state, tmp_path / "pytorch_model.bin")
    keys = list(json.loads((tmp_path / "config.json").read_text()))
    assert "hidden_size" in keys

    ours = load_hf_bert(tmp_path)
    input_ids, attention_mask, token_type_ids = _inputs()
    with torch.no_grad():
        want = encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        got = ours(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # defaults: no mask, segment 0 everywhere
        plain = encoder(input_ids=input_ids).last_hidden_state
        torch.testing.assert_close(ours(input_ids), plain, atol=1e-5, rtol=1e-5)
    assert not ours.training


def test_padding_tokens_change_nothing(tmp_path):
    _, encoder = _bert_model("base")
    encoder.save_pretrained(tmp_path)
    ours = load_hf_bert(tmp_path)
    input_ids, attention_mask, _ = _inputs()
    other = input_ids.clone()
    other[attention_mask == 0] = 7  # different ids behind the padding
    with torch.no_grad():
        a = ours(input_ids, attention_mask=attention_mask)
        b = ours(other, attention_mask=attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=0)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf_bert(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf_bert(tmp_path)
    _, encoder = _bert_model("base")
    encoder.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors or pytorch_model\.bin"):
        load_hf_bert(tmp_path)

    state = encoder.state_dict()
    broken = dict(state)
    del broken["encoder.layer.1.output.dense.weight"]
    torch.save(broken, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing weights 'encoder\.layer\.1\.output\.dense"):
        load_hf_bert(tmp_path)

    broken = dict(state)
    broken["encoder.layer.0.attention.self.key.weight"] = torch.zeros(E, E + 1)
    torch.save(broken, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.attention\.self\.key\.weight'.*"):
        load_hf_bert(tmp_path)

    torch.save(state, tmp_path / "pytorch_model.bin")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "position_embedding_type": "relative_key"})
    )
    with pytest.raises(ValueError, match="position_embedding_type"):
        load_hf_bert(tmp_path)
