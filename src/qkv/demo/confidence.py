"""How sure the date translator is, and whether an input looks like what it learnt from.

Letters: B inputs, S source length, P decoding prefix (the BOS token), n generated tokens
(ten characters and EOS), V target vocabulary.

Confidence. At every step the decoder gives a distribution over the next character; the
confidence of a translation is the probability the model gave the whole decoded sequence,
the product over its steps of the probability of the token chosen there (end token
included). It is read back through the same `DecodingSession` that decoding uses
(`model.start_decoding`), by feeding the decoded tokens one by one, so it works for greedy
and beam outputs and for any model that offers that interface (the Transformer and the
GRU encoder-decoder). `LOW_CONFIDENCE` is the threshold below which held-out answers of
the trained demo model were mostly wrong: how it was chosen, with the numbers, is in
docs/translate.md.

Out of distribution. A confident answer to an input unlike every training input still
means nothing, so `input_warnings` also flags an input that is longer than any written
form of the task, one whose characters mostly sit where no training input has them
(`seen_at_position`), one whose characters mostly follow each other as in no training
input (`pairs_seen`: reversed or garbled text), and one with no digit and no month name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from functools import lru_cache
from itertools import pairwise

import torch

from .dates import CHINESE_DIGITS, FORMS, MONTHS, Example, Vocab
from .train import _encode_batch, decode_ids

__all__ = [
    "LOW_CONFIDENCE",
    "MAX_INPUT_CHARS",
    "Translation",
    "heldout_confidences",
    "input_warnings",
    "is_calendar_date",
    "longest_input",
    "pairs_seen",
    "seen_at_position",
    "token_probabilities",
    "translate_with_confidence",
]

# Chosen from the 102,256 held-out (date, form) pairs of the full demo model: 21 of its 23
# wrong answers lie below, and 0.2% of the right ones (docs/translate.md).
LOW_CONFIDENCE = 0.95
# Longer inputs are refused: a written date is under 30 characters, and the encoder's cost
# grows with the square of the length.
MAX_INPUT_CHARS = 10_000

_ISO = re.compile(r"\d{4}-\d{2}-\d{2}")
_NUMERALS = frozenset(CHINESE_DIGITS + "十")
_MONTH_WORDS = tuple(m.lower() for m in MONTHS) + tuple(m[:3].lower() for m in MONTHS)


@dataclass(frozen=True)
class Translation:
    """One translated input: what `qkv translate --json` prints for it."""

    input: str
    output: str  # the decoded ISO 8601 string (may be no date at all)
    valid_date: bool  # output is YYYY-MM-DD and a calendar date
    confidence: float  # probability of the decoded sequence, in [0, 1]
    warning: str | None  # why not to trust the output, or None

    def to_json(self) -> dict:
        return asdict(self)


def is_calendar_date(text: str) -> bool:
    """True for YYYY-MM-DD naming a real day (date.fromisoformat alone also takes 20190307)."""
    if not _ISO.fullmatch(text):
        return False
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _char_class(c: str) -> str:
    """Digits are interchangeable for where they may stand: '7' counts as '0', '七' as '〇'."""
    if "0" <= c <= "9":
        return "0"
    return "〇" if c in _NUMERALS else c


@lru_cache(maxsize=1)
def _task_inputs() -> tuple[str, ...]:
    """Every form of every day of 2000-2006: all (weekday, month, day) combinations, so
    with digits in one class (`_char_class`) every position any form can put a character at
    (years only change digits, and two- and four-digit years keep their widths)."""
    first, end = date(2000, 1, 1), date(2007, 1, 1)
    days = [first + timedelta(days=i) for i in range((end - first).days)]
    return tuple({form.render(d) for d in days for form in FORMS})


@lru_cache(maxsize=1)
def seen_at_position() -> tuple[frozenset[str], ...]:
    """seen[i]: the character classes some written form of the task has at index i."""
    seen: list[set[str]] = []
    for text in _task_inputs():
        for i, c in enumerate(text):
            if i == len(seen):
                seen.append(set())
            seen[i].add(_char_class(c))
    return tuple(frozenset(s) for s in seen)


@lru_cache(maxsize=1)
def pairs_seen() -> frozenset[tuple[str, str]]:
    """Pairs of character classes that stand side by side in some written form of the task."""
    return frozenset(
        (_char_class(a), _char_class(b)) for text in _task_inputs() for a, b in pairwise(text)
    )


def longest_input() -> int:
    """The most characters a written form of the task has (no training input is longer)."""
    return len(seen_at_position())


def input_warnings(text: str) -> list[str]:
    """Why `text` lies outside what the model was trained on; [] when it looks like a date."""
    warnings = []
    lowered = text.lower()
    has_digit = any(c.isdigit() or c in _NUMERALS for c in text)
    if not has_digit and "月" not in text and not any(m in lowered for m in _MONTH_WORDS):
        warnings.append("no digit and no month name: this does not look like a date")
    longest = longest_input()
    if len(text) > longest:
        warnings.append(f"{len(text):,} characters, longer than any training input ({longest})")
    seen = seen_at_position()
    unseen = sum(i >= len(seen) or _char_class(c) not in seen[i] for i, c in enumerate(text))
    if text and unseen * 2 > len(text):
        warnings.append(
            f"{unseen:,} of its {len(text):,} characters stand where no training input has them"
        )
    pairs, known = list(pairwise(text)), pairs_seen()
    odd = sum((_char_class(a), _char_class(b)) not in known for a, b in pairs)
    if pairs and odd * 2 >= len(pairs):
        warnings.append(
            f"{odd:,} of its {len(pairs):,} neighbouring characters never follow each other in "
            "training inputs"
        )
    return warnings


@torch.no_grad()
def token_probabilities(model, src_ids: torch.Tensor, out_ids: torch.Tensor) -> torch.Tensor:
    """The probability the model gives each decoded token, read through its DecodingSession.

    Args:
        model: anything with `start_decoding(src, capacity=...)` (qkv.nn.Transformer, the
            demo's RNNEncoderDecoder).
        src_ids: (B, S) source tokens, as given to `greedy` or `beam_search`.
        out_ids: (B, P + n) what they returned: the prefix, then the generated tokens,
            padded after the end token.

    Returns:
        (B, n) float64: p(token t | source, tokens before t); 1 after a row's end token (the
        padding was not chosen by the model).
    """
    session = model.start_decoding(src_ids, capacity=src_ids.shape[-1] + out_ids.shape[-1])
    prefix = session.prefix  # (B, P)
    if out_ids.shape[0] != prefix.shape[0] or not torch.equal(
        out_ids[:, : prefix.shape[1]], prefix
    ):
        raise ValueError(
            f"out_ids {tuple(out_ids.shape)} must start with the model's decoding prefix "
            f"{tuple(prefix.shape)}"
        )
    generated = out_ids[:, prefix.shape[1] :]  # (B, n)
    B, n = generated.shape
    probs = torch.ones(B, n, dtype=torch.float64)
    ended = torch.zeros(B, dtype=torch.bool)
    if n == 0:
        return probs
    logits = session.step(prefix)  # (B, V): the whole prefix in one call
    for t in range(n):
        token = generated[:, t]  # (B,)
        p = torch.softmax(logits.to(torch.float64), dim=-1)  # (B, V)
        chosen = p.gather(1, token[:, None])[:, 0]  # (B,)
        probs[:, t] = torch.where(ended, torch.ones_like(chosen), chosen)
        if session.eos_id is not None:
            ended |= token == session.eos_id
        if t < n - 1:
            logits = session.step(token[:, None])  # (B, V)
    return probs


@torch.no_grad()
def _decode(model, texts: Sequence[str], src: Vocab, beam: int) -> list[tuple[list[int], float]]:
    """(decoded ids, confidence) per text, decoded as one batch."""
    tokens = _encode_batch(texts, src)  # (B, S)
    out = decode_ids(model, tokens, beam)  # (B, 1 + n)
    confidence = token_probabilities(model, tokens, out).prod(dim=1)  # (B,)
    return list(zip(out.tolist(), confidence.tolist(), strict=True))


@torch.no_grad()
def translate_with_confidence(
    model, texts: Sequence[str], src: Vocab, tgt: Vocab, *, beam: int = 1,
    threshold: float = LOW_CONFIDENCE,
) -> list[Translation]:  # fmt: skip
    """Translate, and say how sure the model is (greedy, or beam search with `beam` > 1).

    A translation warns when its confidence is below `threshold`, and for inputs outside
    the training distribution (`input_warnings`). Raises UnknownCharacterError for
    characters outside `src`. Inputs of a date's length go as one batch, longer ones one
    by one (padding a batch to one long input would cost a masked (B, H, S, S) score
    matrix per layer instead of the fused kernel).
    """
    if not texts:
        return []
    model.eval()
    short = [i for i, t in enumerate(texts) if len(t) <= longest_input()]
    batches = [short] if short else []
    batches += [[i] for i, t in enumerate(texts) if len(t) > longest_input()]
    decoded: dict[int, tuple[list[int], float]] = {}
    for batch in batches:
        decoded.update(
            zip(batch, _decode(model, [texts[i] for i in batch], src, beam), strict=True)
        )
    results = []
    for i, text in enumerate(texts):
        row, c = decoded[i]
        output = tgt.decode(row)
        warnings = input_warnings(text)
        if c < threshold:
            warnings.insert(0, f"low confidence ({c:.1%} < {threshold:.0%})")
        results.append(
            Translation(text, output, is_calendar_date(output), c, "; ".join(warnings) or None)
        )
    return results


def heldout_confidences(
    model, examples: Sequence[Example], src: Vocab, tgt: Vocab, *, batch_size: int = 500
) -> list[tuple[float, bool]]:
    """(confidence, right) of the greedy translation of each example, in order: the numbers
    LOW_CONFIDENCE was chosen from (docs/translate.md)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].source))  # less padding
    result: list[tuple[float, bool]] = [(0.0, False)] * len(examples)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        done = translate_with_confidence(model, [examples[j].source for j in chunk], src, tgt)
        for j, t in zip(chunk, done, strict=True):
            result[j] = (t.confidence, t.output == examples[j].target)
    return result
