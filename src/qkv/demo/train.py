"""Training and evaluation for the date-translation demo.

Letters: B batch, S source length (characters + EOS), T = 11 decoder positions (BOS and
the 10 characters go in, the 10 characters and EOS come out), V vocabulary size, N examples.

What makes it fast on two CPU cores:
- batches of one source length (`LengthBuckets`): no padding at all, so no work is spent on
  pad tokens and every attention call takes torch's fused kernel (no weights, no dropout);
- a small model (174k parameters: width 64, 4 heads, 2 + 2 layers, rotary positions) at
  a high learning rate: AdamW, linear warm-up, cosine decay to a tenth (`lr_at`);
- the thread count chosen while training, by timing real steps (`ThreadChooser`);
- a fixed number of steps, so the run is reproducible under a seed (up to float
  non-associativity across thread counts).

Evaluation decodes greedily with a KV cache (`qkv.nn.generate.greedy`) and counts exact
matches of the whole ISO string.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..nn import Transformer, TransformerConfig, beam_search, greedy
from .dates import Example, Vocab, make_examples, source_vocab, split_dates, target_vocab

__all__ = [
    "QUICK",
    "DemoConfig",
    "EvalResult",
    "LengthBuckets",
    "ThreadChooser",
    "TrainResult",
    "available_cores",
    "build_model",
    "evaluate",
    "lr_at",
    "prepare",
    "set_threads",
    "train",
    "translate",
]

TARGET_LEN = 10  # "YYYY-MM-DD"


@dataclass(frozen=True)
class DemoConfig:
    """Everything `qkv demo` decides; the defaults are the full demo."""

    seed: int = 0  # dates split, examples, initialisation and batch order
    heldout_fraction: float = 0.1  # share of calendar dates never seen in training
    train_examples: int = 200_000  # pool the batches are drawn from (dates x forms)
    eval_examples: int = 2_000  # held-out examples scored by exact match
    embed_dim: int = 64  # E: small, the task needs little capacity
    num_heads: int = 4  # H: head dim 16
    num_encoder_layers: int = 2  # reads the date's fields out of its written form
    num_decoder_layers: int = 2  # copies digits; cross-attention does the alignment
    # Rotary positions (relative: "the digits after the first dot" wherever the string
    # starts) learn this task faster than sinusoids: 92% vs 73% exact match after 300 steps.
    positional: str = "rope"
    ffn_dim: int = 128  # 2 E, half the paper's 4 E: the largest matmuls, little need here
    steps: int = 800  # optimiser steps (about one pass over the pool)
    batch_size: int = 256  # examples per step (one source length per batch)
    lr: float = 5e-3  # peak learning rate; small pre-norm models take a high one
    warmup_steps: int = 150  # linear warm-up from 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01  # AdamW, on matrices only
    label_smoothing: float = 0.0  # the task is noise-free: nothing to smooth
    grad_clip: float = 1.0  # global gradient norm clip
    threads: int | None = None  # torch threads; None: chosen while training (ThreadChooser)
    heatmap_examples: int = 4  # held-out examples whose attention is drawn (up to 4)

    def __post_init__(self) -> None:
        for name in ("train_examples", "eval_examples", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoConfig.{name} must be an int >= 1; got {value!r}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.lr <= 0:
            raise ValueError("DemoConfig needs lr > 0, warmup_steps >= 0, min_lr_ratio in [0, 1]")


# A seconds-long run for tests: a tiny model and a few steps (exact match may be low).
QUICK = DemoConfig(
    train_examples=4_000, eval_examples=200, embed_dim=32, num_heads=2, num_encoder_layers=1,
    num_decoder_layers=1, ffn_dim=64, steps=40, batch_size=64, warmup_steps=10,
    heatmap_examples=2, threads=1,
)  # fmt: skip


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Use `threads` torch threads (None: the cores this process may run on)."""
    torch.set_num_threads(max(1, available_cores() if threads is None else threads))
    return torch.get_num_threads()


class ThreadChooser:
    """Chooses torch's thread count during training by timing real training steps.

    Measured on a 2-core machine with this model: when the machine was otherwise idle, two
    threads ran a step 1.6x faster than one; while other processes used the cores, 5x
    slower (OpenMP threads wait for each other when one of them is descheduled). So at the
    start of every `every` steps, `probe` steps run with each candidate count, and the
    fastest, in seconds per token (batches differ in length), is kept until the next
    round. The probe steps are ordinary training steps: nothing is wasted.
    """

    def __init__(self, candidates: Sequence[int], *, probe: int = 4, every: int = 200) -> None:
        self.candidates = sorted(set(candidates))
        self.probe, self.every = probe, every
        self.best = self.candidates[0]
        self.choices: list[tuple[int, int]] = []  # (step, threads chosen from then on)
        self._timings: dict[int, list[float]] = {}

    def threads_for(self, step: int) -> int:
        i = (step % self.every) // self.probe
        return self.candidates[i] if i < len(self.candidates) else self.best

    def record(self, step: int, threads: int, seconds_per_token: float) -> None:
        phase, span = step % self.every, self.probe * len(self.candidates)
        if len(self.candidates) == 1 or phase >= span:
            return
        if phase % self.probe:  # the first step after a switch warms the thread pool up
            self._timings.setdefault(threads, []).append(seconds_per_token)
        if phase == span - 1:
            self.best = min(self._timings, key=lambda t: statistics.median(self._timings[t]))
            self.choices.append((step + 1, self.best))
            self._timings.clear()


def build_model(config: DemoConfig, src: Vocab, tgt: Vocab) -> Transformer:
    """The qkv encoder-decoder Transformer sized by `config`, seeded."""
    torch.manual_seed(config.seed)
    model_config = TransformerConfig(
        src_vocab_size=len(src), tgt_vocab_size=len(tgt), embed_dim=config.embed_dim,
        num_heads=config.num_heads, num_encoder_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers, ffn_dim=config.ffn_dim,
        dropout=0.0,  # dropout would leave the fused kernel, and nothing here overfits
        norm_first=True, positional=config.positional, max_len=64,
        pad_id=Vocab.pad_id, bos_id=Vocab.bos_id, eos_id=Vocab.eos_id,
    )  # fmt: skip
    return Transformer(model_config)


class LengthBuckets:
    """Examples grouped by source length, as tensors: batches need no padding.

    bucket[S] = (src (N_S, S) long, tgt (N_S, TARGET_LEN + 2) long: BOS, 10 chars, EOS).
    """

    def __init__(self, examples: Sequence[Example], src: Vocab, tgt: Vocab) -> None:
        by_len: dict[int, tuple[list, list]] = {}
        for ex in examples:
            s = src.encode(ex.source, eos=True)
            rows = by_len.setdefault(len(s), ([], []))
            rows[0].append(s)
            rows[1].append(tgt.encode(ex.target, bos=True, eos=True))
        self.buckets = {
            n: (torch.tensor(s, dtype=torch.long), torch.tensor(t, dtype=torch.long))
            for n, (s, t) in sorted(by_len.items())
        }

    def __len__(self) -> int:
        return sum(s.shape[0] for s, _ in self.buckets.values())

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple]:
        """Endless (src (B, S), tgt (B, T+1)) batches: each epoch shuffles every bucket,
        cuts it into batches and shuffles the order of all batches."""
        while True:
            epoch = []
            for src, tgt in self.buckets.values():
                order = torch.randperm(src.shape[0], generator=generator)
                for i in range(0, len(order), batch_size):
                    idx = order[i : i + batch_size]
                    epoch.append((src[idx], tgt[idx]))
            for j in torch.randperm(len(epoch), generator=generator).tolist():
                yield epoch[j]


def lr_at(step: int, config: DemoConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer(model: Transformer, config: DemoConfig) -> torch.optim.Optimizer:
    # Weight decay on matrices only: decaying LayerNorm gains and biases only hurts.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-9)


@dataclass(frozen=True)
class TrainResult:
    """The trained model and what the run took."""

    model: Transformer
    seconds: float  # wall-clock training time (data preparation excluded)
    steps: int
    examples_seen: int
    final_loss: float  # mean over the last 50 steps
    final_token_accuracy: float  # mean over the last 50 steps
    thread_choices: list[tuple[int, int]]  # (step, torch threads used from then on)
    history: list[dict] = field(default_factory=list)  # every 50 steps: step, loss, acc, lr


def train(
    config: DemoConfig,
    examples: Sequence[Example],
    src: Vocab,
    tgt: Vocab,
    *,
    progress: bool = True,
) -> TrainResult:
    """Train a fresh model on `examples` for `config.steps` steps; tqdm bar when `progress`."""
    from tqdm import tqdm

    buckets = LengthBuckets(examples, src, tgt)
    model = build_model(config, src, tgt)
    model.train()
    optimizer = _optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    batches = buckets.batches(config.batch_size, generator)
    history: list[dict] = []
    recent: list[tuple[float, float]] = []
    seen = 0
    fixed = [config.threads] if config.threads is not None else None
    chooser = ThreadChooser(fixed or [1, available_cores()])
    bar = tqdm(total=config.steps, desc="training", unit="step", disable=not progress)
    start = time.perf_counter()
    for step in range(config.steps):
        src_ids, tgt_ids = next(batches)  # (B, S), (B, T+1)
        threads = chooser.threads_for(step)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        tick = time.perf_counter()
        decoder_in, labels = tgt_ids[:, :-1], tgt_ids[:, 1:]  # (B, T) each
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        logits = model(src_ids, decoder_in)  # (B, T, V)
        loss = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), label_smoothing=config.label_smoothing
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        tokens = src_ids.numel() + decoder_in.numel()
        chooser.record(step, threads, (time.perf_counter() - tick) / tokens)

        seen += src_ids.shape[0]
        loss_value = loss.item()
        acc = (logits.detach().argmax(-1) == labels).float().mean().item()
        recent = [*recent[-49:], (loss_value, acc)]
        if (step + 1) % 10 == 0 or step + 1 == config.steps:
            rate = seen / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(
                loss=f"{loss_value:.3f}", acc=f"{acc:.3f}", ex_s=f"{rate:,.0f}", threads=threads
            )
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            history.append(
                {"step": step + 1, "loss": loss_value, "token_accuracy": acc,
                 "lr": lr_at(step, config)}
            )  # fmt: skip
        bar.update(1)
    seconds = time.perf_counter() - start
    bar.close()
    model.eval()
    final_loss = sum(r[0] for r in recent) / len(recent)
    final_acc = sum(r[1] for r in recent) / len(recent)
    return TrainResult(
        model, seconds, config.steps, seen, final_loss, final_acc, chooser.choices, history
    )


def _encode_batch(texts: Sequence[str], src: Vocab) -> torch.Tensor:
    """Texts -> (B, S) ids with EOS, right-padded (the model masks the padding)."""
    ids = [src.encode(t, eos=True) for t in texts]
    width = max(len(i) for i in ids)
    return torch.tensor([i + [src.pad_id] * (width - len(i)) for i in ids], dtype=torch.long)


@torch.no_grad()
def translate(
    model: Transformer, texts: Sequence[str], src: Vocab, tgt: Vocab, *, beam: int = 1
) -> list[str]:
    """Translate written dates (greedy with a KV cache, or beam search with `beam` > 1).

    Raises UnknownCharacterError for characters outside `src`.
    """
    if not texts:
        return []
    model.eval()
    tokens = _encode_batch(texts, src)  # (B, S)
    max_new = TARGET_LEN + 1  # ten characters and EOS
    if beam > 1:
        out = beam_search(model, tokens, max_new_tokens=max_new, num_beams=beam).tokens
    else:
        out = greedy(model, tokens, max_new_tokens=max_new)  # (B, 1 + n)
    return [tgt.decode(row) for row in out.tolist()]


@dataclass(frozen=True)
class EvalResult:
    """Exact match over held-out examples, and every prediction."""

    exact_match: float
    correct: int
    total: int
    seconds: float
    predictions: list[str]
    by_form: dict[str, float]  # exact match per written form


def evaluate(
    model: Transformer, examples: Sequence[Example], src: Vocab, tgt: Vocab,
    *, batch_size: int = 500,
) -> EvalResult:  # fmt: skip
    """Greedy KV-cache decoding of every example; exact match of the full ISO string."""
    start = time.perf_counter()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].source))  # less padding
    predictions = [""] * len(examples)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        outs = translate(model, [examples[j].source for j in chunk], src, tgt)
        for j, pred in zip(chunk, outs, strict=True):
            predictions[j] = pred
    hits = [p == ex.target for p, ex in zip(predictions, examples, strict=True)]
    per_form: dict[str, list[bool]] = {}
    for ex, hit in zip(examples, hits, strict=True):
        per_form.setdefault(ex.form, []).append(hit)
    by_form = {name: sum(h) / len(h) for name, h in sorted(per_form.items())}
    correct = sum(hits)
    return EvalResult(
        correct / len(examples), correct, len(examples), time.perf_counter() - start,
        predictions, by_form,
    )  # fmt: skip


def prepare(config: DemoConfig) -> tuple[list[Example], list[Example], Vocab, Vocab]:
    """Training pool and held-out examples (disjoint dates) and the two vocabularies."""
    split = split_dates(config.seed, config.heldout_fraction)
    train_set = make_examples(split.train, config.train_examples, seed=config.seed)
    heldout = make_examples(split.heldout, config.eval_examples, seed=config.seed + 1)
    return train_set, heldout, source_vocab(), target_vocab()
