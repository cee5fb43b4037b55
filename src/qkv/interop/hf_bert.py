"""Load a Hugging Face BERT checkpoint into a model built from qkv's own encoder layers.

Letters: B batch, T length, E hidden size, H heads, F intermediate size, V vocabulary,
L layers.

BERT (Devlin et al. 2019) is a post-norm Transformer encoder with exact (erf) GELU, learned
position embeddings and a token-type (segment) embedding; its layers map one-to-one onto
`qkv.nn.TransformerEncoderLayer(norm_first=False, activation="gelu")`:

    HF name (under encoder.layer.{i}.)     qkv name (under encoder.layers.{i}.)
    attention.self.query / key / value     self_attn.q_proj / k_proj / v_proj
    attention.output.dense                 self_attn.out_proj
    attention.output.LayerNorm             norm1
    intermediate.dense                     ffn.linear1
    output.dense                           ffn.linear2
    output.LayerNorm                       norm2

Nothing is downloaded: `path` is a local directory as written by `save_pretrained`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..nn.layers import TransformerEncoder, TransformerEncoderLayer

__all__ = ["Bert", "BertConfig", "load_hf_bert"]

# Hugging Face's names for the activations qkv has: "gelu" is the exact erf form in both.
_ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}


@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face `config.json` that the encoder needs (BERT-base defaults)."""

    vocab_size: int = 30522  # V
    hidden_size: int = 768  # E
    num_hidden_layers: int = 12  # L
    num_attention_heads: int = 12  # H
    intermediate_size: int = 3072  # F, feed-forward width
    hidden_act: str = "gelu"  # exact erf GELU
    max_position_embeddings: int = 512  # longest input
    type_vocab_size: int = 2  # segments A/B
    layer_norm_eps: float = 1e-12  # BERT's LayerNorm epsilon (not torch's 1e-5)
    hidden_dropout_prob: float = 0.1  # on embeddings and sublayer outputs
    attention_probs_dropout_prob: float = 0.1  # on the attention weights
    pad_token_id: int = 0  # padding token

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """From a parsed config.json: known fields are read, the others ignored."""
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"config.json describes a {model_type!r} model, not 'bert'")
        position_type = d.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"position_embedding_type={position_type!r} is not supported (only 'absolute')"
            )
        if d.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(
                f"hidden_act={d['hidden_act']!r} is not supported; qkv has {sorted(_ACTIVATIONS)}"
            )
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        return cls(**values)


class Bert(nn.Module):
    """BERT's encoder on qkv layers: forward(input_ids, attention_mask, token_type_ids).

    Returns the last hidden state (B, T, E), like `transformers.BertModel(...)
    .last_hidden_state`. A row whose attention_mask is all zero (no real token) attends to
    nothing: qkv gives its attention output 0 where Hugging Face spreads it uniformly.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(
                f"config must be a BertConfig (BertConfig.from_dict(d) for a parsed "
                f"config.json); got {type(config).__name__}"
            )
        self.config = c = config
        E = c.hidden_size
        self.word_embeddings = nn.Embedding(c.vocab_size, E, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, E)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, E)
        self.embed_norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        layer = TransformerEncoderLayer(
            E, c.num_attention_heads, ffn_dim=c.intermediate_size,
            dropout=c.hidden_dropout_prob, attn_dropout=c.attention_probs_dropout_prob,
            activation=_ACTIVATIONS[c.hidden_act], norm_first=False,
            layer_norm_eps=c.layer_norm_eps,
        )  # fmt: skip
        layer.ffn.dropout = nn.Dropout(0.0)  # BERT has no dropout inside its feed-forward
        self.encoder = TransformerEncoder(layer, c.num_hidden_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T); attention_mask (B, T), 1 = real token, 0 = padding;
        token_type_ids (B, T), default 0. Returns (B, T, E)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
            raise ValueError(f"input_ids must be a (B, T) tensor; got {got}")
        B, T = input_ids.shape
        c = self.config
        if c.max_position_embeddings < T:
            raise ValueError(
                f"input_ids has T={T} tokens but the model knows "
                f"{c.max_position_embeddings} positions"
            )
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a (B, T) tensor or None; got {type(t).__name__}")
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must have shape (B, T)={(B, T)}; got {tuple(t.shape)}")
        _check_ids(input_ids, "input_ids", "vocab_size", c.vocab_size)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            _check_ids(token_type_ids, "token_type_ids", "type_vocab_size", c.type_vocab_size)
        positions = torch.arange(T, device=input_ids.device)  # (T,)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings(token_type_ids)
        )  # (B, T, E)
        x = self.dropout(self.embed_norm(x))
        # Hugging Face's 1 = real token becomes qkv's key padding mask, True = may attend.
        mask = None if attention_mask is None else attention_mask != 0  # (B, T)
        return self.encoder(x, mask=mask)  # (B, T, E)


def _check_ids(ids: torch.Tensor, name: str, size_name: str, size: int) -> None:
    """Integer ids in [0, size): nn.Embedding would fail on them with an opaque error."""
    if ids.dtype not in (torch.long, torch.int):
        raise TypeError(f"{name} must be an integer tensor (torch.long); got {ids.dtype}")
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())  # one pass each: cheap next to the encoder
    if low < 0 or high >= size:
        raise ValueError(f"{name} must lie in [0, {size_name}={size}); got min {low}, max {high}")


def _hf_name(name: str) -> str:
    """qkv parameter name -> the Hugging Face BertModel name (without a "bert." prefix)."""
    simple = {
        "word_embeddings.weight": "embeddings.word_embeddings.weight",
        "position_embeddings.weight": "embeddings.position_embeddings.weight",
        "token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
        "embed_norm.weight": "embeddings.LayerNorm.weight",
        "embed_norm.bias": "embeddings.LayerNorm.bias",
    }
    if name in simple:
        return simple[name]
    _, _, i, rest = name.split(".", 3)  # "encoder", "layers", i, "self_attn.q_proj.weight"
    module, param = rest.rsplit(".", 1)
    layer = {
        "self_attn.q_proj": "attention.self.query",
        "self_attn.k_proj": "attention.self.key",
        "self_attn.v_proj": "attention.self.value",
        "self_attn.out_proj": "attention.output.dense",
        "norm1": "attention.output.LayerNorm",
        "ffn.linear1": "intermediate.dense",
        "ffn.linear2": "output.dense",
        "norm2": "output.LayerNorm",
    }[module]
    return f"encoder.layer.{i}.{layer}.{param}"


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: model.safetensors first, then pytorch_model.bin (either
    possibly sharded with an index.json)."""
    for name, loader in (
        ("model.safetensors", _load_safetensors),
        ("pytorch_model.bin", _load_bin),
    ):
        index = directory / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(loader(directory / shard))
            return state
        if (directory / name).is_file():
            return loader(directory / name)
    raise FileNotFoundError(
        f"no weights in {directory}: expected model.safetensors or pytorch_model.bin"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: a checkpoint is data, never code to unpickle.
    return torch.load(path, map_location="cpu", weights_only=True)


def _normalise_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the "bert." prefix of task models, rename TF-era LayerNorm gamma/beta, and keep
    floating-point tensors only (position_ids and other integer buffers are not weights)."""
    out = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        name = key.removeprefix("bert.")
        if "LayerNorm." in name:
            name = name.replace("LayerNorm.gamma", "LayerNorm.weight")
            name = name.replace("LayerNorm.beta", "LayerNorm.bias")
        out[name] = tensor
    return out


def load_hf_bert(path: str | Path) -> Bert:
    """Build a qkv `Bert` from a local Hugging Face BERT directory; returned in eval mode.

    Args:
        path: a directory with config.json and model.safetensors (or pytorch_model.bin).
            Weight names may carry a "bert." prefix (BertForMaskedLM and other task models);
            pooler.*, task heads (cls.*), position_ids and other extra entries are ignored.

    Raises:
        FileNotFoundError: the directory, config.json or the weights are missing.
        ValueError: a weight the encoder needs is missing or has the wrong shape (the message
            names the key), or the config describes something other than an absolute-position
            BERT.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike directory; got {type(path).__name__}")
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"load_hf_bert: {directory} is not a directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"load_hf_bert: no config.json in {directory}")
    config = BertConfig.from_dict(json.loads(config_file.read_text()))
    weights = _normalise_names(_read_weights(directory))

    model = Bert(config)
    missing = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = _hf_name(name)
            if key not in weights:
                missing.append(key)
                continue
            tensor = weights[key]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"load_hf_bert: weight {key!r} has shape {tuple(tensor.shape)}, but "
                    f"config.json implies {tuple(param.shape)}"
                )
            param.copy_(tensor)
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"load_hf_bert: missing weights {shown}{more} in {directory}")
    return model.eval()
