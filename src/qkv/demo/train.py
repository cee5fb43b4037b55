"""Training and evaluation for the date-translation demo.

Letters: B batch, S source length (characters + EOS), T = 11 decoder positions (BOS and
the 10 characters go in, the 10 characters and EOS come out), V vocabulary size, N examples.

What makes it fast on two CPU cores:
- batches of one source length (`LengthBuckets`): no padding at all, so no work is spent on
  pad tokens and every attention call takes torch's fused kernel (no weights, no dropout);
- a small model (174k parameters: width 64, 4 heads, 2 + 2 layers, rotary positions) at
  a high learning rate: AdamW, linear warm-up, cosine decay to a tenth (`lr_at`);
- the thread count chosen while training, by timing real steps (`ThreadChooser`).

A fixed number of steps, so a seed fixes the run: with a fixed thread count (`threads`,
`--deterministic`) it is bit-identical, as the ThreadChooser's switches only change the
order of float sums. Nothing is lost to an interruption: the training state (weights,
optimiser moments, the `BatchStream` position, RNG) is saved every N steps and on Ctrl-C,
and resuming from it gives the same weights, bit for bit, as a run never stopped. Under
torchrun the same loop is data-parallel (`shard_batch`, DistributedDataParallel); see
docs/training.md.

Evaluation decodes greedily with a KV cache (`qkv.nn.generate.greedy`) and counts exact
matches of the whole ISO string.

`DemoConfig(arch="rnn")` trains the model the Transformer replaced on the same task, with the
same data, schedule and evaluation: a GRU encoder-decoder with additive attention
(`qkv.demo.rnn`, 175k parameters), for docs/transformer-vs-rnn.md.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..distributed import ddp
from ..nn import Transformer, TransformerConfig, beam_search, greedy
from .checkpoint import CheckpointError, TrainState, save_train_state
from .dates import Example, Vocab, make_examples, source_vocab, split_dates, target_vocab
from .rnn import RNNConfig, RNNEncoderDecoder

__all__ = [
    "QUICK",
    "RESUME_MAY_CHANGE",
    "BatchStream",
    "DemoConfig",
    "EvalResult",
    "LengthBuckets",
    "ThreadChooser",
    "TrainResult",
    "TrainingInterrupted",
    "available_cores",
    "build_model",
    "check_resumable",
    "evaluate",
    "lr_at",
    "prepare",
    "set_threads",
    "shard_batch",
    "train",
    "translate",
]

TARGET_LEN = 10  # "YYYY-MM-DD"
ARCHS = ("transformer", "rnn")  # DemoConfig.arch


@dataclass(frozen=True)
class DemoConfig:
    """Everything `qkv demo` decides; the defaults are the full demo."""

    seed: int = 0  # dates split, examples, initialisation and batch order
    # "transformer", or "rnn": the GRU encoder-decoder with additive attention (qkv.demo.rnn)
    arch: str = "transformer"
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
    # The RNN's decoder state (54 per encoder direction): 174,987 parameters with E = 64,
    # as close as an even size gets to the Transformer's 173,632.
    rnn_hidden: int = 108
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
        if self.arch not in ARCHS:
            raise ValueError(f"DemoConfig.arch must be one of {ARCHS}; got {self.arch!r}")
        for name in ("train_examples", "eval_examples", "steps", "batch_size", "rnn_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoConfig.{name} must be an int >= 1; got {value!r}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.lr <= 0:
            raise ValueError("DemoConfig needs lr > 0, warmup_steps >= 0, min_lr_ratio in [0, 1]")


# A seconds-long run for tests: a tiny model and a few steps (exact match may be low).
QUICK = DemoConfig(
    train_examples=4_000, eval_examples=200, embed_dim=32, num_heads=2, num_encoder_layers=1,
    num_decoder_layers=1, ffn_dim=64, rnn_hidden=36, steps=40, batch_size=64, warmup_steps=10,
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


def build_model(config: DemoConfig, src: Vocab, tgt: Vocab) -> Transformer | RNNEncoderDecoder:
    """The model `config.arch` names, sized by `config`, seeded: the qkv encoder-decoder
    Transformer, or the GRU encoder-decoder with additive attention."""
    torch.manual_seed(config.seed)
    if config.arch == "rnn":
        return RNNEncoderDecoder(
            RNNConfig(
                src_vocab_size=len(src), tgt_vocab_size=len(tgt), embed_dim=config.embed_dim,
                hidden_dim=config.rnn_hidden, pad_id=Vocab.pad_id, bos_id=Vocab.bos_id,
                eos_id=Vocab.eos_id,
            )
        )  # fmt: skip
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

    def stream(self, batch_size: int, generator: torch.Generator) -> BatchStream:
        """Endless batches drawn with `generator` (see BatchStream)."""
        return BatchStream(self, batch_size, generator)


class BatchStream:
    """Endless (src (B, S), tgt (B, T+1)) batches whose position can be saved and restored.

    Each epoch shuffles every bucket, cuts it into batches of `batch_size` (the last one of
    a bucket is smaller) and shuffles the order of all the batches, every draw from
    `generator`. The position is the generator's state when the epoch began and the number
    of batches taken since: restoring it replays the epoch's draws, so the batches, and the
    generator after them, continue exactly as in a run that was never stopped.
    """

    def __init__(self, buckets: LengthBuckets, batch_size: int, generator: torch.Generator):
        self.buckets, self.batch_size, self.generator = buckets, batch_size, generator
        self.epoch = 0  # epochs begun
        self.position = 0  # batches of the current epoch taken
        self._epoch_rng = generator.get_state()
        self._plan: list[tuple[int, torch.Tensor]] = []  # this epoch: (S, row ids) per batch

    def _begin_epoch(self) -> None:
        self._epoch_rng = self.generator.get_state()
        plan = []
        for length, (src, _) in self.buckets.buckets.items():
            order = torch.randperm(src.shape[0], generator=self.generator)
            plan += [
                (length, order[i : i + self.batch_size])
                for i in range(0, len(order), self.batch_size)
            ]
        self._plan = [plan[j] for j in torch.randperm(len(plan), generator=self.generator).tolist()]
        self.epoch += 1
        self.position = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position == len(self._plan):
            self._begin_epoch()
        length, idx = self._plan[self.position]
        self.position += 1
        src, tgt = self.buckets.buckets[length]
        return src[idx], tgt[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "epoch_rng": self._epoch_rng}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a stream over the same buckets and batch size."""
        epoch, position = state["epoch"], state["position"]
        if not isinstance(epoch, int) or not isinstance(position, int) or epoch < 0:
            raise ValueError(f"epoch and position must be ints; got {epoch!r}, {position!r}")
        self.generator.set_state(state["epoch_rng"])
        self.epoch, self.position, self._plan = 0, 0, []
        if epoch > 0:  # replay the draws of the epoch under way
            self._begin_epoch()
            self.epoch = epoch
            if not 0 <= position <= len(self._plan):
                raise ValueError(f"position {position} is outside an epoch of {len(self._plan)}")
            self.position = position
        elif position != 0:
            raise ValueError(f"position {position} before the first epoch")


def shard_batch(
    src_ids: torch.Tensor, tgt_ids: torch.Tensor, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank `rank`'s rows of a global batch of B rows, and the weight of its mean loss.

    Rank r takes rows [r B // W, (r + 1) B // W): every row once, B // W of them for a full
    batch, one more on some ranks when W does not divide B (a bucket's last batch). DDP
    averages the ranks' gradients, so rank r scales its mean loss by w_r = W b_r / B (b_r
    its rows, 1 when they are equal): the average is the gradient of the global batch's
    mean loss, what one process computes, up to float summation order. A rank left without
    rows (B < W) takes row 0 with weight 0: every rank must run the backward pass that DDP
    synchronises. (b_r, S), (b_r, T+1), w_r
    """
    B = src_ids.shape[0]
    lo, hi = rank * B // world_size, (rank + 1) * B // world_size
    if hi == lo:
        return src_ids[:1], tgt_ids[:1], 0.0
    return src_ids[lo:hi], tgt_ids[lo:hi], (hi - lo) * world_size / B


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

    model: Transformer | RNNEncoderDecoder  # the module itself, never its DDP wrapper
    seconds: float  # wall-clock training time (data preparation excluded; all sessions)
    steps: int
    examples_seen: int  # over all ranks
    final_loss: float  # mean over the last 50 steps
    final_token_accuracy: float  # mean over the last 50 steps
    thread_choices: list[tuple[int, int]]  # (step, torch threads used from then on)
    history: list[dict] = field(default_factory=list)  # every 50 steps: step, loss, acc, lr
    losses: list[float] = field(default_factory=list)  # every step, the mean over ranks
    resumed_from: int | None = None  # the step a resumed run started at


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped training after a whole step; the state is saved.

    A KeyboardInterrupt, so code that catches Exception lets it through."""

    def __init__(
        self, step: int, steps: int, path: str | os.PathLike | None, signum: int, is_main: bool
    ) -> None:
        super().__init__(f"training interrupted at step {step} of {steps}")
        self.step, self.steps, self.path, self.signum, self.is_main = (
            step, steps, path, signum, is_main,
        )  # fmt: skip


class _StopRequests:
    """While training, SIGINT and SIGTERM only ask the loop to stop after the current step.

    Raising KeyboardInterrupt wherever Ctrl-C lands could cut an optimiser step in half
    (some parameters updated, others not) and save that. A second signal acts as usual.
    Outside the main thread (where Python cannot set handlers) nothing is installed.
    """

    def __enter__(self) -> _StopRequests:
        self.signum: int | None = None
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._ask)
        return self

    def _ask(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


# DemoConfig fields a resumed run may change: they do not change what training computes
# (threads change the summation order, so bit-identity needs the same count).
RESUME_MAY_CHANGE = frozenset({"threads", "eval_examples", "heatmap_examples"})


def check_resumable(saved: dict, config: DemoConfig, where: str) -> None:
    """CheckpointError unless `config` trains as the saved run's DemoConfig fields did.

    A field the saved run does not list (it predates the field) had the field's default."""
    defaults = asdict(DemoConfig())
    diffs = [
        f"{name} {saved.get(name, defaults[name])!r} -> {value!r}"
        for name, value in asdict(config).items()
        if name not in RESUME_MAY_CHANGE and saved.get(name, defaults[name]) != value
    ]
    if diffs:
        raise CheckpointError(
            f"{where} was saved by a run with another config ({'; '.join(diffs[:4])}): resume "
            "with the options that run was started with, or train afresh in another --out"
        )


def _restore(state: TrainState, model, optimizer, stream, chooser, log, where: str) -> None:
    """Put the saved weights, optimiser moments, batch position and RNG back in place."""
    try:
        model.load_state_dict(state.model.state_dict())
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved_groups = [len(g["params"]) for g in state.optimizer["param_groups"]]
        if saved_groups != [len(g["params"]) for g in optimizer.param_groups]:
            raise ValueError(f"parameter groups of {saved_groups} parameters")
        for i, moments in state.optimizer["state"].items():
            for name, t in moments.items():
                if t.dim() and t.shape != params[i].shape:
                    raise ValueError(
                        f"{name} of parameter {i} is {tuple(t.shape)}, the parameter "
                        f"{tuple(params[i].shape)}"
                    )
        optimizer.load_state_dict(state.optimizer)
        stream.load_state_dict(state.data)
        torch.set_rng_state(state.rng)
        progress = state.progress
        for key in ("losses", "accuracies"):
            if len(progress[key]) != state.step:
                raise ValueError(f"{len(progress[key])} {key} for {state.step} steps")
            log[key] = [float(x) for x in progress[key]]
        log["seen"], log["seconds"] = int(progress["seen"]), float(progress["seconds"])
        if progress["best_threads"] in chooser.candidates:
            chooser.best = progress["best_threads"]
        chooser.choices = [(int(s), int(t)) for s, t in progress["thread_choices"]]
    except KeyError as e:
        raise CheckpointError(f"{where} is damaged: it has no {e}") from e
    except (TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{where} does not fit this model: {reason}") from e


def train(
    config: DemoConfig,
    examples: Sequence[Example],
    src: Vocab,
    tgt: Vocab,
    *,
    progress: bool = True,
    state_path: str | os.PathLike | None = None,
    checkpoint_every: int = 200,
    resume: TrainState | None = None,
    on_step: Callable[[int, float, torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train a fresh model (or continue `resume`) to `config.steps` steps; tqdm bar when
    `progress`.

    Inside an initialised process group (torchrun, see `run_demo`) training is
    data-parallel: every rank draws the same global batch of `config.batch_size` and trains
    on its `shard_batch`, DistributedDataParallel averages the gradients, and the logged
    loss is the global batch's: the run computes what one process would, batch for batch
    (up to float summation order). Rank 0 alone writes the training state to `state_path`: every
    `checkpoint_every` steps (0: not periodically), after the last step, and when SIGINT or
    SIGTERM asks to stop, which finishes the step under way, saves, then raises
    TrainingInterrupted on every rank.

    `on_step(steps_done, seconds, model)`, if given, is called after every step with the
    training seconds so far; the time it takes is not counted in them, and the model is put
    back in train mode after it (benchmarks/transformer_vs_rnn.py evaluates as it trains).
    """
    from tqdm import tqdm

    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
        raise TypeError(f"checkpoint_every must be an int; got {checkpoint_every!r}")
    if checkpoint_every < 0:
        raise ValueError(
            f"checkpoint_every must be >= 0 (0: only at the end); got {checkpoint_every}"
        )
    here = ddp.info()
    model = build_model(config, src, tgt)  # the same seed, so the same weights, on every rank
    optimizer = _optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    stream = LengthBuckets(examples, src, tgt).stream(config.batch_size, generator)
    fixed = [config.threads] if config.threads is not None else None
    chooser = ThreadChooser(fixed or [1, available_cores()])
    log: dict = {"losses": [], "accuracies": [], "seen": 0, "seconds": 0.0}
    where = str(state_path or "the training state")
    if resume is not None:
        check_resumable(resume.demo_config, config, where)
        if (resume.src_vocab, resume.tgt_vocab) != (src, tgt):
            raise CheckpointError(f"{where} was saved with other vocabularies (another qkv?)")
        _restore(resume, model, optimizer, stream, chooser, log, where)
    first = len(log["losses"])
    model.train()
    net = ddp.wrap(model)  # DistributedDataParallel when W > 1, else the model itself

    def save(steps_done: int) -> None:
        if state_path is None or not here.is_main:
            return
        progress = {**log, "best_threads": chooser.best, "thread_choices": chooser.choices,
                    "world_size": here.world_size}  # fmt: skip
        state = TrainState(
            steps_done, asdict(config), model, src, tgt, optimizer.state_dict(),
            stream.state_dict(), torch.get_rng_state(), progress,
        )  # fmt: skip
        save_train_state(state_path, state)

    bar = tqdm(total=config.steps, initial=first, desc="training", unit="step",
               disable=not (progress and here.is_main))  # fmt: skip
    start, earlier, seen_before = time.perf_counter(), log["seconds"], log["seen"]
    with _StopRequests() as stop:
        for step in range(first, config.steps):
            src_ids, tgt_ids = next(stream)  # the same global batch (B, S), (B, T+1) on every rank
            rows = src_ids.shape[0]
            src_ids, tgt_ids, weight = shard_batch(src_ids, tgt_ids, here.rank, here.world_size)
            threads = chooser.threads_for(step)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            tick = time.perf_counter()
            decoder_in, labels = tgt_ids[:, :-1], tgt_ids[:, 1:]  # (b, T) each
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            logits = net(src_ids, decoder_in)  # (b, T, V)
            loss = F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), label_smoothing=config.label_smoothing
            )
            if weight != 1.0:  # this rank's share of the global mean (see shard_batch)
                loss = loss * weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DDP: the gradients are averaged over the ranks here
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            tokens = src_ids.numel() + decoder_in.numel()
            chooser.record(step, threads, (time.perf_counter() - tick) / tokens)

            acc = (logits.detach().argmax(-1) == labels).float().mean().item() * weight
            asked = float(stop.signum is not None)  # one all-reduce: every rank stops together
            stats = torch.tensor([loss.item(), acc, asked], dtype=torch.float64)
            loss_value, acc, stopping = ddp.all_reduce_mean(stats).tolist()
            log["losses"].append(loss_value)
            log["accuracies"].append(acc)
            log["seen"] += rows
            log["seconds"] = earlier + time.perf_counter() - start
            done = step + 1
            if done % 10 == 0 or done == config.steps:
                rate = (log["seen"] - seen_before) / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{acc:.3f}", ex_s=f"{rate:,.0f}",
                                threads=threads)  # fmt: skip
            bar.update(1)
            periodic = checkpoint_every and done % checkpoint_every == 0
            if stopping or periodic or done == config.steps:
                save(done)
            if stopping:
                bar.close()
                ddp.barrier()  # rank 0 has saved: now every rank may exit
                signum = stop.signum or signal.SIGINT  # another rank may have got the signal
                raise TrainingInterrupted(done, config.steps, state_path, signum, here.is_main)
            if on_step is not None:
                paused = time.perf_counter()
                on_step(done, log["seconds"], model)
                model.train()
                start += time.perf_counter() - paused  # not training time
    bar.close()
    model.eval()
    losses, accs, n = log["losses"], log["accuracies"], config.steps
    history = [
        {"step": s, "loss": losses[s - 1], "token_accuracy": accs[s - 1],
         "lr": lr_at(s - 1, config)}
        for s in sorted({*range(50, n + 1, 50), n})
    ]  # fmt: skip
    return TrainResult(
        model, log["seconds"], n, log["seen"], statistics.fmean(losses[-50:]),
        statistics.fmean(accs[-50:]), chooser.choices, history, losses,
        resumed_from=None if resume is None else resume.step,
    )  # fmt: skip


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
    out = decode_ids(model, _encode_batch(texts, src), beam)  # (B, 1 + n)
    return [tgt.decode(row) for row in out.tolist()]


def decode_ids(model, tokens: torch.Tensor, beam: int) -> torch.Tensor:
    """Source ids (B, S) -> decoded ids (B, 1 + n), BOS first: greedy with a KV cache, or
    beam search with `beam` > 1; at most the ten characters of a date and EOS."""
    max_new = TARGET_LEN + 1
    if beam > 1:
        return beam_search(model, tokens, max_new_tokens=max_new, num_beams=beam).tokens
    return greedy(model, tokens, max_new_tokens=max_new)


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
