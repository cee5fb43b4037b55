"""The model the Transformer replaced: a GRU encoder-decoder with additive attention.

Letters: B batch, S source length, T target length, E embedding width, He encoder state per
direction, Hd decoder state (= 2 He), V vocabulary size, K beams.

Bahdanau, Cho & Bengio 2015 ("Neural Machine Translation by Jointly Learning to Align and
Translate"), the standard translator before 2018, with GRUs (Cho et al. 2014):

    src (B, S) -> embed -> bidirectional GRU -> h_1..h_S (B, S, 2 He)          (§3.2)
    s_0 = tanh(W_s ←h_1)                                                      (A.2.2)
    step i, given y_{i-1} and s_{i-1}:
        c_i, α_i = AdditiveAttention(s_{i-1}, h)    α_i (B, S): where to read    (§3.1)
        s_i = GRUCell([E y_{i-1}; c_i], s_{i-1})
        logits_i = head(tanh(W_o [s_i; c_i; E y_{i-1}]))

Every decoder step waits for the one before it: that is the sequential dependency the
Transformer removed (docs/transformer-vs-rnn.md measures what it costs).

The model offers the decoding interface of `qkv.nn.Transformer`: `encode`, `decode(tgt,
encoded, cache=...)`, `forward(src, tgt)`, `new_cache` and `start_decoding`, so `greedy`,
`beam_search` and the demo's `translate`/`evaluate` run it unchanged. Its "cache" is the
decoder state s_i (`RNNState`, a `KVCache` without layers): one (B, Hd) tensor, however
long the output, where the Transformer's cache grows by a key and a value per token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..nn import AdditiveAttention, KVCache
from ..nn.generate import Seq2Seq, check_tokens

__all__ = ["RNNConfig", "RNNEncoded", "RNNEncoderDecoder", "RNNState"]


@dataclass(frozen=True)
class RNNConfig:
    """The GRU encoder-decoder; the defaults are the date demo's (about the Transformer's
    parameter count, see DemoConfig.rnn_hidden)."""

    src_vocab_size: int  # source vocabulary size
    tgt_vocab_size: int  # target vocabulary size
    embed_dim: int = 64  # E: token embeddings, the attention's hidden size and the output
    hidden_dim: int = 112  # Hd: the decoder state; the encoder has Hd/2 per direction
    pad_id: int = 0  # padding token in both vocabularies
    bos_id: int = 1  # first target token of every translation
    eos_id: int | None = 2  # end of a translation (None: decode to max length)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_size", "_dim")) and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"RNNConfig.{f.name} must be an int >= 1; got {value!r}")
        if self.hidden_dim % 2:
            raise ValueError(
                f"RNNConfig.hidden_dim must be even (half per encoder direction); got "
                f"{self.hidden_dim}"
            )
        vocab = min(self.src_vocab_size, self.tgt_vocab_size)
        for name in ("pad_id", "bos_id", "eos_id"):
            token = getattr(self, name)
            if token is None and name == "eos_id":
                continue
            if isinstance(token, bool) or not (isinstance(token, int) and 0 <= token < vocab):
                raise ValueError(f"{name} must be a token id in [0, {vocab}); got {token!r}")


@dataclass(frozen=True)
class RNNEncoded:
    """The encoder's output: states (B, S, Hd), the source mask (B, S) True = real token,
    and the decoder's first state s_0 (B, Hd)."""

    memory: torch.Tensor
    mask: torch.Tensor | None
    initial: torch.Tensor

    def index_select(self, index: torch.Tensor) -> RNNEncoded:
        """Rows `index` (beam search reorders its rows)."""
        mask = None if self.mask is None else self.mask.index_select(0, index)
        return RNNEncoded(
            self.memory.index_select(0, index), mask, self.initial.index_select(0, index)
        )

    def repeat_interleave(self, n: int) -> RNNEncoded:
        """Each row n times in a row: (B, ...) -> (B·n, ...), for n beams per source."""
        mask = None if self.mask is None else self.mask.repeat_interleave(n, dim=0)
        return RNNEncoded(
            self.memory.repeat_interleave(n, dim=0), mask, self.initial.repeat_interleave(n, dim=0)
        )


class RNNState(KVCache):
    """The decoder state s_t (B, Hd) between decoding calls: an RNN's whole "cache".

    A `KVCache` with no attention layers, so `DecodingSession`, `greedy` and `beam_search`
    take it as they take the Transformer's; `len()` counts the tokens fed so far.
    """

    def __init__(self, owner: nn.Module) -> None:
        super().__init__(owner, [])
        self.state: torch.Tensor | None = None  # (B, Hd) once a token has been fed
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def reorder(self, index: torch.Tensor) -> None:
        """Row r continues the hypothesis of row index[r] (beam search)."""
        if self.state is not None:
            self.state = self.state.index_select(0, index.to(self.state.device))

    def __repr__(self) -> str:
        shape = None if self.state is None else tuple(self.state.shape)
        return f"RNNState(length={self.length}, state={shape})"


class RNNEncoderDecoder(Seq2Seq, nn.Module):
    """GRU encoder-decoder with Bahdanau attention for sequence-to-sequence tasks.

    forward(src (B, S), tgt (B, T)) -> logits (B, T, V_tgt): position t predicts tgt[:, t+1]
    (teacher forcing: tgt starts with BOS), as `qkv.nn.Transformer`.
    """

    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        if not isinstance(config, RNNConfig):
            raise TypeError(f"config must be an RNNConfig; got {type(config).__name__}")
        self.config = c = config
        E, Hd = c.embed_dim, c.hidden_dim
        self.src_embed = nn.Embedding(c.src_vocab_size, E, padding_idx=c.pad_id)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, E, padding_idx=c.pad_id)
        self.encoder = nn.GRU(E, Hd // 2, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(Hd // 2, Hd)  # W_s: s_0 from the backward state at position 1
        self.attention = AdditiveAttention(Hd, Hd, E)  # query s (Hd), keys h (Hd), hidden E
        self.cell = nn.GRUCell(E + Hd, Hd)
        self.out = nn.Linear(Hd + Hd + E, E)  # W_o [s; c; E y]
        self.head = nn.Linear(E, c.tgt_vocab_size)

    def encode(self, src: torch.Tensor, *, src_mask: torch.Tensor | None = None) -> RNNEncoded:
        """src (B, S) -> RNNEncoded(memory (B, S, Hd), mask (B, S), initial (B, Hd)).

        The mask defaults to src != pad. Sources are right-padded: padded rows go through
        the GRU packed, so each direction reads only the real tokens.
        """
        check_tokens(src, "src")
        if src_mask is None:
            src_mask = src != self.config.pad_id  # (B, S) True = real token
        if src_mask.shape != src.shape or src_mask.dtype != torch.bool:
            raise ValueError(
                f"src_mask must be a bool tensor shaped like src {tuple(src.shape)}; got "
                f"{src_mask.dtype} {tuple(src_mask.shape)}"
            )
        x = self.src_embed(src)  # (B, S, E)
        lengths = src_mask.sum(1)  # (B,)
        if bool((lengths == src.shape[1]).all()):  # no padding (the demo's length buckets)
            memory, h_n = self.encoder(x)  # (B, S, Hd), (2, B, Hd/2)
        else:
            packed = pack_padded_sequence(
                x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
            )
            out, h_n = self.encoder(packed)
            memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        initial = torch.tanh(self.bridge(h_n[1]))  # (B, Hd): from ←h_1, as Bahdanau A.2.2
        return RNNEncoded(memory, src_mask, initial)

    def decode(
        self,
        tgt: torch.Tensor,
        encoded: RNNEncoded,
        *,
        cache: RNNState | None = None,
        need_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tgt (B, T) -> logits (B, T, V), one decoder step per position.

        With a cache, tgt holds only the new tokens and the state continues from it. With
        `need_weights`, also the attention weights (B, T, S) of every step.
        """
        check_tokens(tgt, "tgt")
        if not isinstance(encoded, RNNEncoded):
            raise TypeError(
                f"encoded must be the RNNEncoded that encode() returns; got "
                f"{type(encoded).__name__}"
            )
        B = tgt.shape[0]
        if encoded.memory.shape[0] != B:
            raise ValueError(
                f"tgt (B, T) and the encoded source (B, S, Hd) must have the same batch size B; "
                f"got tgt {tuple(tgt.shape)} and memory {tuple(encoded.memory.shape)}"
            )
        if cache is not None:
            if not isinstance(cache, RNNState):
                raise TypeError(f"cache must be this model's new_cache(); got {type(cache)}")
            cache.check_owner(self, 0)
        s = encoded.initial if cache is None or cache.state is None else cache.state  # (B, Hd)
        mask = None if encoded.mask is None else encoded.mask[:, None, :]  # (B, 1, S)
        y = self.tgt_embed(tgt)  # (B, T, E)
        outputs, weights = [], []
        for t in range(tgt.shape[1]):  # sequential: step t needs s_{t-1}
            context, alpha = self.attention(s[:, None, :], encoded.memory, mask=mask)
            context = context[:, 0]  # (B, Hd); alpha (B, 1, S)
            s = self.cell(torch.cat([y[:, t], context], dim=-1), s)  # (B, Hd)
            outputs.append(torch.tanh(self.out(torch.cat([s, context, y[:, t]], dim=-1))))
            weights.append(alpha)
        if cache is not None:
            cache.state, cache.length = s, cache.length + tgt.shape[1]
        h = torch.stack(outputs, dim=1) if outputs else y.new_zeros(B, 0, y.shape[-1])
        logits = self.head(h)  # (B, T, V)
        if need_weights:
            S = encoded.memory.shape[1]
            return logits, torch.cat(weights, dim=1) if weights else y.new_zeros(B, 0, S)
        return logits

    def new_cache(self, *, capacity: int | None = None) -> RNNState:
        """An empty decoder state (`capacity` is accepted for the Transformer's signature:
        an RNN's state does not grow)."""
        return RNNState(self)
