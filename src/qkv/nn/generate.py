"""Greedy and beam-search decoding with a KV cache, for `Transformer` and `DecoderLM`.

Letters: B batch (sources or prompts), K beams, P prefix length, N new tokens, V vocabulary.

Both models hand out a `DecodingSession` (`model.start_decoding(inputs, num_beams=K)`): the
prefix to start from (the BOS token for the encoder-decoder, the prompt for the language
model) and a `step(tokens)` that feeds tokens through the model against its `KVCache` and
returns the next-token logits. The functions here only choose tokens.

Cost. The prefix goes through once (O(P²·E) per layer); each new token then costs O(E²)
for its projections plus O(t·E) to attend over the t cached positions, so N tokens cost
O(N·E² + (P + N)·N·E) per layer per row, instead of O(N·(P + N)²·E) when every step
recomputes the whole sequence. Beam search multiplies the rows by K and reorders the cache
rows after each step (an O(K·t·E) copy per layer).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .cache import KVCache

__all__ = ["BeamSearchResult", "DecodingSession", "Seq2Seq", "beam_search", "greedy"]


class DecodingSession:
    """One batch being decoded incrementally.

    Args:
        prefix: (B', P) tokens every sequence starts with (B' = B·K with K beams).
        cache: the model's KVCache for these rows.
        decode: decode(tokens (B', t), cache, context) -> logits (B', t, V).
        context: what `decode` needs besides the cache (the encoder output), reordered along
            with the cache; an object with `index_select(index)`, or None.
        eos_id, pad_id: the model's end and padding tokens (eos None: never stops early).
    """

    def __init__(
        self,
        *,
        prefix: torch.Tensor,
        cache: KVCache,
        decode: Callable[[torch.Tensor, KVCache, Any], torch.Tensor],
        context: Any = None,
        eos_id: int | None = None,
        pad_id: int = 0,
    ) -> None:
        if not isinstance(prefix, torch.Tensor) or prefix.dim() != 2 or not _is_int(prefix):
            got = (
                f"{prefix.dtype} {tuple(prefix.shape)}"
                if isinstance(prefix, torch.Tensor)
                else type(prefix).__name__
            )
            raise TypeError(f"prefix must be a (B', P) integer tensor of token ids; got {got}")
        if not isinstance(cache, KVCache):
            raise TypeError(
                f"cache must be the model's KVCache (from new_cache()); got {type(cache).__name__}"
            )
        if not callable(decode):
            raise TypeError(
                f"decode must be callable as decode(tokens, cache, context); got "
                f"{type(decode).__name__}"
            )
        if context is not None and not callable(getattr(context, "index_select", None)):
            raise TypeError(
                f"context must be None or have an index_select(index) method; got "
                f"{type(context).__name__}"
            )
        _check_token_id(eos_id, "eos_id", optional=True)
        _check_token_id(pad_id, "pad_id", optional=False)
        self.prefix, self.cache, self.context = prefix, cache, context
        self._decode = decode
        self.eos_id, self.pad_id = eos_id, pad_id

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens (B', t) after everything fed so far; logits (B', V) of the last one."""
        return self._decode(tokens, self.cache, self.context)[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        """Row r continues the sequence of row index[r] (beam search)."""
        self.cache.reorder(index)
        if self.context is not None:
            self.context = self.context.index_select(index)


class Decodable(Protocol):
    def start_decoding(
        self, inputs: torch.Tensor, *, num_beams: int = 1, capacity: int | None = None
    ) -> DecodingSession: ...


def _is_int(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_token_id(token, name: str, *, optional: bool) -> None:
    """An int token id (any int: an id outside the vocabulary, like -1, never matches)."""
    if token is None and optional:
        return
    if isinstance(token, bool) or not isinstance(token, numbers.Integral):
        allowed = "None or an int" if optional else "an int"
        raise TypeError(f"{name} must be {allowed} (a token id); got {token!r}")


def _check_model(model) -> None:
    if not callable(getattr(model, "start_decoding", None)):
        raise TypeError(
            f"model must be a Transformer or a DecoderLM (anything with start_decoding); got "
            f"{type(model).__name__}"
        )


def _check_arguments(inputs, n: int) -> int:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.is_floating_point():
        got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a (B, S) or (B, P) tensor of token ids; got {got}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0; got {n!r}")
    return n


@torch.no_grad()
def greedy(
    model: Decodable, inputs: torch.Tensor, *, max_new_tokens: int, eos_id: int | None = None
) -> torch.Tensor:
    """Pick the most likely next token until every row has produced `eos_id` or N tokens.

    Args:
        model: a `Transformer` (inputs: source tokens (B, S)) or a `DecoderLM` (inputs:
            prompts (B, P), all of one length).
        max_new_tokens: N, the most tokens to generate per row.
        eos_id: the end token (default: the model's config; an id outside the vocabulary,
            such as -1, never stops). Rows that have ended are padded with the model's pad id.

    Returns:
        (B, P + n) tokens, n <= N: the prefix (BOS, or the prompt) then the generated tokens.
    """
    _check_model(model)
    max_new_tokens = _check_arguments(inputs, max_new_tokens)
    _check_token_id(eos_id, "eos_id", optional=True)
    # The prefix is at most as long as the inputs: room for all of it, no regrowth.
    session = model.start_decoding(inputs, capacity=inputs.shape[-1] + max_new_tokens)
    eos = session.eos_id if eos_id is None else eos_id
    tokens = session.prefix  # (B, P)
    if max_new_tokens == 0:
        return tokens
    B = tokens.shape[0]
    finished = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    logits = session.step(tokens)  # (B, V): the whole prefix in one call
    for n in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (B,)
        nxt = torch.where(finished, torch.full_like(nxt, session.pad_id), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)  # (B, P + n + 1)
        if eos is not None:
            finished |= nxt == eos
        if bool(finished.all()) or n == max_new_tokens - 1:
            break
        logits = session.step(nxt[:, None])  # (B, V)
    return tokens


@dataclass(frozen=True)
class BeamSearchResult:
    """tokens (B, P + n): the best hypothesis per row, padded; scores (B,): its sum of
    log-probabilities divided by length**length_penalty (n counts the end token)."""

    tokens: torch.Tensor
    scores: torch.Tensor


@torch.no_grad()
def beam_search(
    model: Decodable,
    inputs: torch.Tensor,
    *,
    max_new_tokens: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
) -> BeamSearchResult:
    """Keep the K most likely partial sequences per row; return the best finished one.

    Follows fairseq (Ott et al. 2019): at each step the 2K best continuations of the K
    beams are ranked; an end token ranked among the first K finishes a hypothesis, the
    best K others carry on. A row is done once it has K finished hypotheses; at
    `max_new_tokens` the open beams count as finished. Hypotheses are compared by
    sum(log p) / n**length_penalty (n generated tokens): 0 compares raw log-probabilities
    (favouring short outputs), 1 the mean per token. With K = 1 this is exactly `greedy`.

    Args as for `greedy`, plus num_beams (K) and length_penalty.
    """
    _check_model(model)
    max_new_tokens = _check_arguments(inputs, max_new_tokens)
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1; got {num_beams!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real):
        raise TypeError(
            f"length_penalty must be a real number; got {type(length_penalty).__name__}"
        )
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite; got {length_penalty}")
    _check_token_id(eos_id, "eos_id", optional=True)
    K = num_beams
    session = model.start_decoding(inputs, num_beams=K, capacity=inputs.shape[-1] + max_new_tokens)
    eos = session.eos_id if eos_id is None else eos_id
    tokens = session.prefix  # (B*K, P): each prefix repeated K times
    BK, P = tokens.shape
    B, device = BK // K, tokens.device
    if max_new_tokens == 0:
        return BeamSearchResult(tokens[::K], torch.zeros(B, device=device))

    # Only the first beam of each row is live at the start: the K copies are identical.
    beam_scores = torch.full((B, K), float("-inf"), dtype=torch.float64, device=device)
    beam_scores[:, 0] = 0.0
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)[:, None] * K  # (B, 1) first row of each source

    def normalised(score: float, n: int) -> float:
        return score / (n**length_penalty)

    logits = session.step(tokens)  # (B*K, V)
    for n in range(1, max_new_tokens + 1):
        logp = torch.log_softmax(logits.to(torch.float64), dim=-1)  # (B*K, V)
        V = logp.shape[-1]
        cand = (beam_scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)  # (B, K*V)
        top_scores, top_index = cand.topk(min(2 * K, K * V), dim=1)  # (B, 2K)
        top_beam, top_token = top_index // V, top_index % V  # (B, 2K) each
        is_eos = (
            top_token == eos if eos is not None else torch.zeros_like(top_token, dtype=torch.bool)
        )
        # Hypotheses that end here: an end token among the first K ranks, in a live row.
        ranks = torch.arange(top_index.shape[1], device=device)  # (2K,)
        ends = is_eos & (ranks < K) & torch.isfinite(top_scores) & ~done[:, None]
        for b, j in ends.nonzero().tolist():
            if len(finished[b]) < K:
                seq = torch.cat([tokens[rows[b, 0] + top_beam[b, j]], top_token[b, j, None]])
                finished[b].append((normalised(float(top_scores[b, j]), n), seq))
        done |= torch.tensor([len(f) >= K for f in finished], device=device)
        if bool(done.all()) or n == max_new_tokens:
            break
        # The K best continuations that do not end carry on (a stable sort keeps rank order).
        order = torch.argsort(is_eos.to(torch.int8), dim=1, stable=True)[:, :K]  # (B, K)
        beam_scores = top_scores.gather(1, order)  # (B, K)
        source = (rows + top_beam.gather(1, order)).view(-1)  # (B*K,) rows they extend
        nxt = top_token.gather(1, order).view(-1)  # (B*K,)
        tokens = torch.cat([tokens.index_select(0, source), nxt[:, None]], dim=1)
        session.reorder(source)
        logits = session.step(nxt[:, None])  # (B*K, V)

    # Rows short of K finished hypotheses also consider their open beams.
    if not bool(done.all()):
        for b in range(B):
            for j in range(top_index.shape[1]):
                if len(finished[b]) >= K:
                    break
                if is_eos[b, j] or not torch.isfinite(top_scores[b, j]):
                    continue
                seq = torch.cat([tokens[rows[b, 0] + top_beam[b, j]], top_token[b, j, None]])
                finished[b].append((normalised(float(top_scores[b, j]), n), seq))

    best = [max(f, key=lambda item: item[0]) for f in finished]
    length = max(seq.shape[0] for _, seq in best)
    out = torch.full((B, length), session.pad_id, dtype=tokens.dtype, device=device)
    for b, (_, seq) in enumerate(best):
        out[b, : seq.shape[0]] = seq
    scores = torch.tensor([s for s, _ in best], dtype=torch.float64, device=device)
    return BeamSearchResult(out, scores)


def check_tokens(tokens, name: str) -> None:
    """A (B, T) integer tensor of token ids, else TypeError/ValueError naming `name`."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int):
        got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise TypeError(f"{name} must be an integer tensor (B, T); got {got}")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T); got {tuple(tokens.shape)}")


class Seq2Seq:
    """What the encoder-decoders share (the Transformer, the demo's GRU model): `forward`
    with teacher forcing and `start_decoding`, given the module's `encode(src, src_mask=)`
    (returning something with `.memory` and `.repeat_interleave`), `decode(tokens, encoded,
    cache=)`, `new_cache(capacity=)` and a `config` with bos/eos/pad ids."""

    def forward(
        self, src: torch.Tensor, tgt: torch.Tensor, *, src_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """src (B, S), tgt (B, T) -> logits (B, T, V_tgt)."""
        check_tokens(src, "src")
        check_tokens(tgt, "tgt")
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(
                f"src (B, S) and tgt (B, T) must have the same batch size B; got src "
                f"{tuple(src.shape)} and tgt {tuple(tgt.shape)}"
            )
        return self.decode(tgt, self.encode(src, src_mask=src_mask))  # type: ignore[attr-defined]

    def start_decoding(
        self,
        src: torch.Tensor,
        *,
        src_mask: torch.Tensor | None = None,
        num_beams: int = 1,
        capacity: int | None = None,
    ) -> DecodingSession:
        """Encode src (B, S) once; rows repeated per beam; every prefix is [BOS]."""
        encoded = self.encode(src, src_mask=src_mask)  # type: ignore[attr-defined]
        if num_beams > 1:
            encoded = encoded.repeat_interleave(num_beams)  # (B*K, S, ...)
        rows = encoded.memory.shape[0]
        config = self.config  # type: ignore[attr-defined]
        prefix = torch.full((rows, 1), config.bos_id, dtype=torch.long, device=src.device)
        return DecodingSession(
            prefix=prefix, cache=self.new_cache(capacity=capacity),  # type: ignore[attr-defined]
            context=encoded,
            decode=lambda tokens, cache, enc: self.decode(tokens, enc, cache=cache),  # type: ignore[attr-defined]
            eos_id=config.eos_id, pad_id=config.pad_id,
        )  # fmt: skip
