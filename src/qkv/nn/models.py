"""Whole models: the encoder-decoder `Transformer` and a decoder-only `DecoderLM`.

Letters: B batch, S source length, T target length, E model width, V vocabulary size,
K beams.

    Transformer (Vaswani et al. 2017)
        src (B, S) -> Embeddings -> TransformerEncoder -> memory (B, S, E)
        tgt (B, T) -> Embeddings -> TransformerDecoder(·, memory) -> head -> logits (B, T, V)
    DecoderLM (GPT, Radford et al. 2018)
        tokens (B, T) -> Embeddings -> causal blocks -> head -> logits (B, T, V)

Positions (`positional=`): "sinusoidal" (the paper) or "learned" are added to the token
embeddings; "rope" rotates queries and keys in every self-attention (Su et al. 2021);
"alibi" biases every self-attention's scores by distance (Press et al. 2022); "none".
Cross-attention gets no positions: it relates two sequences, and the memory carries the
source positions already.

Padding. The source padding mask (B, S), True = real token, defaults to `src != pad_id`; it
masks the encoder's self-attention *and* the decoder's cross-attention, so padded source
positions influence nothing. Targets are padded on the right: causal self-attention already
keeps every real position from seeing the padding after it.

Decoding: `start_decoding` prepares a `DecodingSession` (cache + prefix) for
`qkv.nn.generate.greedy` / `beam_search`. Call `model.eval()` first: dropout stays active
in training mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from .cache import KVCache
from .generate import DecodingSession, Seq2Seq, check_tokens
from .layers import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from .positional import (
    ALiBi,
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)

__all__ = [
    "DecoderLM",
    "DecoderLMConfig",
    "Embeddings",
    "Encoded",
    "Transformer",
    "TransformerConfig",
]

_POSITIONAL = ("sinusoidal", "learned", "rope", "alibi", "none")


@dataclass(frozen=True)
class TransformerConfig:
    """The encoder-decoder Transformer; defaults are the paper's base model (Table 3)."""

    src_vocab_size: int  # source vocabulary size
    tgt_vocab_size: int  # target vocabulary size
    embed_dim: int = 512  # E = d_model
    num_heads: int = 8  # H; E must be divisible by H
    num_kv_heads: int | None = None  # None = num_heads; fewer = grouped-query attention
    num_encoder_layers: int = 6  # N
    num_decoder_layers: int = 6  # N
    ffn_dim: int = 2048  # d_ff, the feed-forward hidden width
    dropout: float = 0.1  # P_drop, on sublayer outputs, embeddings and attention weights
    activation: str = "relu"  # "relu" (the paper) or "gelu"
    norm_first: bool = True  # pre-norm (Xiong et al. 2020): stabler than the paper's post-norm
    positional: str = "sinusoidal"  # "sinusoidal" | "learned" | "rope" | "alibi" | "none"
    max_len: int = 1024  # positions a "learned" table holds (others extrapolate)
    scale_embeddings: bool = True  # embeddings times sqrt(E) (§3.4), init N(0, 1/E)
    tie_output: bool = True  # output head shares the target embedding (§3.4; Press & Wolf 2017)
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    pad_id: int = 0  # padding token in both vocabularies
    bos_id: int = 1  # first target token of every translation
    eos_id: int | None = 2  # end of a translation (None: decode to max length)

    def __post_init__(self) -> None:
        _check_config(self)


@dataclass(frozen=True)
class DecoderLMConfig:
    """A decoder-only (GPT-style) language model; defaults follow modern small LMs."""

    vocab_size: int  # V
    embed_dim: int = 512  # E
    num_heads: int = 8  # H
    num_kv_heads: int | None = None  # None = num_heads; fewer = grouped-query attention
    num_layers: int = 6  # L
    ffn_dim: int = 2048  # feed-forward hidden width
    dropout: float = 0.1  # on sublayer outputs, embeddings and attention weights
    activation: str = "gelu"  # GPT-2 uses GELU
    norm_first: bool = True  # pre-norm with a final LayerNorm, as GPT-2
    positional: str = "rope"  # "sinusoidal" | "learned" | "rope" | "alibi" | "none"
    max_len: int = 1024  # positions a "learned" table holds
    scale_embeddings: bool = False  # GPT-2 does not scale; embeddings init N(0, 0.02²)
    tie_output: bool = True  # output head shares the token embedding (Press & Wolf 2017)
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    pad_id: int = 0  # padding token (used after the end token when generating)
    eos_id: int | None = None  # end token (None: generate to max length)

    def __post_init__(self) -> None:
        _check_config(self)


def _check_config(config) -> None:
    for f in fields(config):
        value = getattr(config, f.name)
        sized = f.name.endswith(("_size", "_dim", "_heads", "_layers", "max_len"))
        if (
            sized
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, int) or value < 1)
        ):
            raise ValueError(f"{type(config).__name__}.{f.name} must be an int >= 1; got {value!r}")
    E, H = config.embed_dim, config.num_heads
    if E % H:
        raise ValueError(f"embed_dim ({E}) must be divisible by num_heads ({H})")
    if config.num_kv_heads is not None and H % config.num_kv_heads:
        raise ValueError(f"num_kv_heads ({config.num_kv_heads}) must divide num_heads ({H})")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1); got {config.dropout}")
    if config.positional not in _POSITIONAL:
        raise ValueError(f"positional must be one of {_POSITIONAL}; got {config.positional!r}")
    vocab = min(
        getattr(config, n)
        for n in ("src_vocab_size", "tgt_vocab_size", "vocab_size")
        if hasattr(config, n)
    )
    for name in ("pad_id", "bos_id", "eos_id"):
        if not hasattr(config, name):
            continue
        token = getattr(config, name)
        if token is None and name == "eos_id":
            continue  # no end token: decoding runs to its length limit
        if isinstance(token, bool) or not (isinstance(token, int) and 0 <= token < vocab):
            # pad_id pads the batches and bos_id starts every translation: both are needed
            raise ValueError(f"{name} must be a token id in [0, {vocab}); got {token!r}")
    if config.positional == "rope" and (E // H) % 2:
        raise ValueError(f"positional='rope' needs an even head dim; got E/H = {E // H}")


class Embeddings(nn.Module):
    """Token ids (B, T) -> vectors (B, T, E): lookup, optional sqrt(E) scale, positions, dropout.

    Scaling by sqrt(E) (Vaswani et al. §3.4) goes with an N(0, 1/E) initialisation, so the
    scaled embeddings have unit size, like the sinusoids added to them; without scaling the
    table starts at N(0, 0.02²) as in GPT-2. The padding row starts at zero and the lookup
    gives it no gradient.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        *,
        pad_id: int | None,
        scale: bool,
        positional: nn.Module | None,
        dropout: float,
    ) -> None:
        super().__init__()
        for name, size in (("vocab_size", vocab_size), ("embed_dim", embed_dim)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be an int >= 1; got {size!r}")
        if pad_id is not None and (
            isinstance(pad_id, bool) or not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size
        ):
            raise ValueError(
                f"pad_id must be None or a token id in [0, vocab_size={vocab_size}); got {pad_id!r}"
            )
        if not isinstance(scale, bool):
            raise TypeError(f"scale must be a bool; got {type(scale).__name__}")
        if positional is not None and not isinstance(positional, nn.Module):
            raise TypeError(
                f"positional must be None or an nn.Module; got {type(positional).__name__}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a float; got {type(dropout).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1); got {dropout}")
        self.token = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.scale = math.sqrt(embed_dim) if scale else 1.0
        nn.init.normal_(self.token.weight, std=embed_dim**-0.5 if scale else 0.02)
        if pad_id is not None:
            with torch.no_grad():
                self.token.weight[pad_id].zero_()
        self.positional = positional
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """tokens (B, T) long, the first at position `offset` -> (B, T, E)."""
        check_tokens(tokens, "tokens")
        V = self.token.num_embeddings
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
            raise ValueError(
                f"token ids must lie in [0, {V}); got min {int(tokens.min())}, max "
                f"{int(tokens.max())}"
            )
        x = self.token(tokens) * self.scale  # (B, T, E)
        if self.positional is not None:
            x = self.positional(x, offset=offset)  # (B, T, E)
        return self.dropout(x)


def _absolute_positions(kind: str, embed_dim: int, max_len: int) -> nn.Module | None:
    if kind == "sinusoidal":
        return SinusoidalPositionalEncoding(embed_dim, max_len=max_len)
    if kind == "learned":
        return LearnedPositionalEmbedding(max_len, embed_dim)
    return None


def _relative_positions(kind: str, config) -> dict:
    """The `rotary=` / `alibi=` options of the self-attention layers."""
    if kind == "rope":
        return {"rotary": RotaryEmbedding(config.embed_dim // config.num_heads)}
    if kind == "alibi":
        return {"alibi": ALiBi(config.num_heads)}
    return {}


def _layer_options(config) -> dict:
    return dict(
        ffn_dim=config.ffn_dim, dropout=config.dropout, activation=config.activation,
        norm_first=config.norm_first, layer_norm_eps=config.layer_norm_eps,
        num_kv_heads=config.num_kv_heads, **_relative_positions(config.positional, config),
    )  # fmt: skip


@dataclass(frozen=True)
class Encoded:
    """The encoder's output: memory (B, S, E) and the source mask (B, S), True = real."""

    memory: torch.Tensor
    mask: torch.Tensor | None

    def index_select(self, index: torch.Tensor) -> Encoded:
        """Rows `index` (beam search reorders its rows; beams of a source share these)."""
        mask = None if self.mask is None else self.mask.index_select(0, index)
        return Encoded(self.memory.index_select(0, index), mask)

    def repeat_interleave(self, n: int) -> Encoded:
        """Each row n times in a row: (B, ...) -> (B·n, ...), for n beams per source."""
        mask = None if self.mask is None else self.mask.repeat_interleave(n, dim=0)
        return Encoded(self.memory.repeat_interleave(n, dim=0), mask)


def _final_norm(config) -> nn.Module | None:
    return nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps) if config.norm_first else None


class Transformer(Seq2Seq, nn.Module):
    """The encoder-decoder Transformer for sequence-to-sequence tasks (translation).

    forward(src (B, S), tgt (B, T)) -> logits (B, T, V_tgt): position t predicts tgt[:, t+1]
    (teacher forcing: tgt starts with BOS).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig; got {type(config).__name__}")
        self.config = c = config
        E = c.embed_dim
        emb = dict(pad_id=c.pad_id, scale=c.scale_embeddings, dropout=c.dropout)
        pos = (c.positional, E, c.max_len)
        self.src_embed = Embeddings(
            c.src_vocab_size, E, positional=_absolute_positions(*pos), **emb
        )
        self.tgt_embed = Embeddings(
            c.tgt_vocab_size, E, positional=_absolute_positions(*pos), **emb
        )
        enc = TransformerEncoderLayer(E, c.num_heads, **_layer_options(c))
        dec = TransformerDecoderLayer(E, c.num_heads, **_layer_options(c))
        self.encoder = TransformerEncoder(enc, c.num_encoder_layers, norm=_final_norm(c))
        self.decoder = TransformerDecoder(dec, c.num_decoder_layers, norm=_final_norm(c))
        self.head = nn.Linear(E, c.tgt_vocab_size, bias=False)
        if c.tie_output:
            self.head.weight = self.tgt_embed.token.weight  # (V, E), shared

    def encode(self, src: torch.Tensor, *, src_mask: torch.Tensor | None = None) -> Encoded:
        """src (B, S) -> Encoded(memory (B, S, E), mask (B, S)); mask defaults to src != pad."""
        check_tokens(src, "src")
        if src_mask is None:
            src_mask = src != self.config.pad_id  # (B, S) True = real token
        memory = self.encoder(self.src_embed(src), mask=src_mask)  # (B, S, E)
        return Encoded(memory, src_mask)

    def decode(
        self, tgt: torch.Tensor, encoded: Encoded, *, cache: KVCache | None = None
    ) -> torch.Tensor:
        """tgt (B, T) -> logits (B, T, V). With a cache, tgt holds only the new tokens."""
        check_tokens(tgt, "tgt")
        if not isinstance(encoded, Encoded):
            raise TypeError(
                f"encoded must be the Encoded that encode() returns; got {type(encoded).__name__}"
            )
        if encoded.memory.shape[0] != tgt.shape[0]:
            raise ValueError(
                f"tgt (B, T) and the encoded source (B, S, E) must have the same batch size B; "
                f"got tgt {tuple(tgt.shape)} and memory {tuple(encoded.memory.shape)}"
            )
        offset = 0 if cache is None else len(cache)
        y = self.tgt_embed(tgt, offset=offset)  # (B, T, E)
        h = self.decoder(y, encoded.memory, memory_mask=encoded.mask, causal=True, cache=cache)
        return self.head(h)  # (B, T, V)

    def new_cache(self, *, capacity: int | None = None) -> KVCache:
        """An empty KVCache for this model's decoder (see `qkv.nn.cache`)."""
        return self.decoder.new_cache(capacity=capacity)


class DecoderLM(nn.Module):
    """A decoder-only language model: forward(tokens (B, T)) -> logits (B, T, V).

    Its blocks are `TransformerEncoderLayer`s run with causal=True: without an encoder
    there is nothing to cross-attend to, and causal self-attention is what makes it a
    decoder (position t sees tokens 0..t only).
    """

    def __init__(self, config: DecoderLMConfig) -> None:
        super().__init__()
        if not isinstance(config, DecoderLMConfig):
            raise TypeError(f"config must be a DecoderLMConfig; got {type(config).__name__}")
        self.config = c = config
        E = c.embed_dim
        self.embed = Embeddings(
            c.vocab_size, E, pad_id=c.pad_id, scale=c.scale_embeddings, dropout=c.dropout,
            positional=_absolute_positions(c.positional, E, c.max_len),
        )  # fmt: skip
        block = TransformerEncoderLayer(E, c.num_heads, **_layer_options(c))
        self.blocks = TransformerEncoder(block, c.num_layers, norm=_final_norm(c))
        self.head = nn.Linear(E, c.vocab_size, bias=False)
        if c.tie_output:
            self.head.weight = self.embed.token.weight  # (V, E), shared

    def forward(
        self, tokens: torch.Tensor, *, mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """tokens (B, T) -> logits (B, T, V); `mask` as MultiHeadAttention takes it (keys
        include cached ones). With a cache, tokens holds only the new positions."""
        offset = 0 if cache is None else len(cache)
        x = self.embed(tokens, offset=offset)  # (B, T, E)
        h = self.blocks(x, mask=mask, causal=True, cache=cache)  # (B, T, E)
        return self.head(h)  # (B, T, V)

    def new_cache(self, *, capacity: int | None = None) -> KVCache:
        """An empty KVCache for this model (see `qkv.nn.cache`)."""
        return self.blocks.new_cache(capacity=capacity)

    def start_decoding(
        self, prompt: torch.Tensor, *, num_beams: int = 1, capacity: int | None = None
    ) -> DecodingSession:
        """Continue prompts (B, P) of one length; rows repeated per beam."""
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[1] < 1:
            shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt)
            raise ValueError(f"prompt must be a (B, P) token tensor with P >= 1; got {shape}")
        prefix = prompt.repeat_interleave(num_beams, dim=0)  # (B*K, P)
        return DecodingSession(
            prefix=prefix, cache=self.new_cache(capacity=capacity),
            decode=lambda tokens, cache, _: self(tokens, cache=cache),
            eos_id=self.config.eos_id, pad_id=self.config.pad_id,
        )  # fmt: skip
