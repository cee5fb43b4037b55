"""qkv.demo: a translation task built in (written dates -> ISO 8601) and the `qkv demo` run.

    from qkv.demo import run_demo
    metrics = run_demo("runs/demo")        # trains, evaluates, writes checkpoint and heatmaps
    run_demo("runs/demo", resume=True)     # continues from runs/demo/train_state.pt
    run_demo("runs/rnn", config=DemoConfig(arch="rnn"))  # the GRU + additive attention model

The same call runs data-parallel under `torchrun --nproc-per-node N -m qkv demo` (see
docs/training.md). Modules: `dates` (the task: written forms, split by date, vocabularies),
`train` (length buckets, resumable batch stream, schedule, training loop, KV-cache
evaluation), `rnn` (the GRU encoder-decoder with additive attention that the Transformer
replaced, `--arch rnn`), `checkpoint` (atomic save, checked load, training state), `heatmaps`
(PNG attention maps and index.html), `shapes` (the `qkv shapes` walk). tqdm and matplotlib are
imported only when training and plotting.
"""

from __future__ import annotations

import json
import os
import time
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from ..distributed import ddp
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    TrainState,
    atomic_write,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
)
from .dates import FORMS, UnknownCharacterError, Vocab
from .train import (
    QUICK,
    DemoConfig,
    TrainingInterrupted,
    available_cores,
    check_resumable,
    evaluate,
    prepare,
    set_threads,
    train,
    translate,
)

__all__ = [
    "FORMS",
    "QUICK",
    "TRAIN_STATE",
    "Checkpoint",
    "CheckpointError",
    "DemoConfig",
    "TrainState",
    "TrainingInterrupted",
    "UnknownCharacterError",
    "Vocab",
    "display_width",
    "load_checkpoint",
    "load_train_state",
    "pad",
    "run_demo",
    "save_checkpoint",
    "translate",
]

TRAIN_STATE = "train_state.pt"  # in the output directory: what --resume continues from

# Forms whose attention maps are drawn: a weekday to ignore, Chinese numerals to combine,
# a numeric form whose order comes from its separator, and an ordinal.
HEATMAP_FORMS = ("weekday_month_day", "zh_numerals", "mdy_slash_padded", "ordinal_of_month")
SAMPLE_FORMS = (  # one sample translation printed for each
    "ymd_compact", "mdy_slash", "mdy_slash_yy", "dmy_dot", "dmy_dash", "day_month", "mon_day",
    "month_ordinal", "weekday_month_day", "rfc2822", "lower_weekday_ordinal", "dd_mon_yy",
    "zh_digits", "zh_numerals",
)  # fmt: skip
MISTAKES = 5  # wrong held-out translations printed, if any


def display_width(text: str) -> int:
    """Terminal columns `text` takes: East Asian wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad(text: str, width: int) -> str:
    """`text` padded with spaces to `width` terminal columns."""
    return text + " " * max(0, width - display_width(text))


def _pick(examples, forms, predictions):
    """The first held-out example of each form in `forms`, with the model's prediction."""
    chosen = []
    for form in forms:
        for ex, pred in zip(examples, predictions, strict=True):
            if ex.form == form:
                chosen.append((ex, pred))
                break
    return chosen


def run_demo(
    out: str | os.PathLike = "runs/demo",
    *,
    quick: bool = False,
    config: DemoConfig | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    resume: bool = False,
    checkpoint_every: int = 200,
) -> dict:
    """Train on the date task, evaluate, and write everything under `out`; returns metrics.

    Writes out/train_state.pt every `checkpoint_every` steps and at the end (what `resume`
    continues from, bit for bit), then out/model.pt, out/metrics.json, out/heatmaps/*.png
    and out/index.html, each atomically. Ctrl-C or SIGTERM while training saves the state
    after the step under way and raises TrainingInterrupted; `resume` with a config that
    trains differently raises CheckpointError.

    Under torchrun (RANK, WORLD_SIZE, ... set) it joins the process group and trains
    data-parallel; only rank 0 prints, evaluates and writes files; the other ranks return
    {"rank", "world_size", "steps", "final_loss"}. Each process then uses one torch thread
    unless `config.threads` says otherwise. torch's thread count is restored afterwards.
    """
    import torch
    import torch.distributed as dist

    config = config or (QUICK if quick else DemoConfig())
    out = Path(out)
    joined = not (dist.is_available() and dist.is_initialized())  # then we leave it too
    here = ddp.setup_from_env()
    if here.distributed and config.threads is None:
        # N processes with one thread each already fill N cores; more threads per process
        # would oversubscribe them (OpenMP threads spin waiting for descheduled peers).
        config = replace(config, threads=1)
    if here.is_main:
        out.mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    try:
        if config.threads is not None:
            set_threads(config.threads)
        return _run(out, config, quick, progress, echo, resume, checkpoint_every, here)
    finally:
        torch.set_num_threads(previous)
        if joined:
            ddp.cleanup()


def _thread_note(config: DemoConfig, cores: int, here: ddp.DistInfo) -> str:
    if here.distributed:
        return f"{config.threads} in each of {here.world_size} processes (data-parallel)"
    if config.threads or cores == 1:
        return str(config.threads or 1)
    return f"1 or {cores}, whichever runs faster (timed every 200 steps)"


def _run(out: Path, config: DemoConfig, quick: bool, progress: bool, echo, resume: bool,
         checkpoint_every: int, here: ddp.DistInfo) -> dict:  # fmt: skip
    import torch

    import qkv

    from .heatmaps import write_heatmaps, write_index

    say = echo if here.is_main else (lambda _: None)
    cores = available_cores()
    state_path = out / TRAIN_STATE
    state = load_train_state(state_path) if resume else None
    if state is not None:  # before the data is built: a wrong config fails at once
        check_resumable(state.demo_config, config, str(state_path))
    start = time.perf_counter()
    train_set, heldout, src, tgt = prepare(config)
    prepare_seconds = time.perf_counter() - start
    say(
        f"qkv demo: {len(train_set):,} training examples ({len(FORMS)} written forms), "
        f"{len(heldout):,} held out on unseen dates; torch threads: "
        + _thread_note(config, cores, here)
    )
    if state is not None:
        say(f"resuming from {state_path} at step {state.step:,} of {config.steps:,}")
    elif state_path.exists():
        say(f"note: {state_path} will be overwritten (pass --resume to continue that run)")
    result = train(config, train_set, src, tgt, progress=progress, state_path=state_path,
                   checkpoint_every=checkpoint_every, resume=state)  # fmt: skip
    if not here.is_main:
        ddp.barrier()  # wait while rank 0 evaluates and writes
        return {"rank": here.rank, "world_size": here.world_size, "steps": result.steps,
                "final_loss": result.final_loss}  # fmt: skip
    model = result.model
    params = sum(p.numel() for p in model.parameters())
    kind = "GRU encoder-decoder" if config.arch == "rnn" else "Transformer"
    say(
        f"trained a {kind} of {params:,} parameters in {result.seconds:.1f} s "
        f"({result.steps:,} steps)"
    )

    ev = evaluate(model, heldout, src, tgt)
    say(
        f"exact match on {ev.total:,} held-out examples: {ev.exact_match:.2%} "
        f"({ev.correct:,}/{ev.total:,}, greedy decoding, {ev.seconds:.1f} s)"
    )
    summary = {
        "arch": config.arch,
        "exact_match": ev.exact_match,
        "train_seconds": result.seconds,
        "parameters": params,
    }
    meta = {**summary, "demo_config": asdict(config)}
    checkpoint = save_checkpoint(out / "model.pt", model, src, tgt, meta=meta)

    shown = _pick(heldout, HEATMAP_FORMS[: config.heatmap_examples], ev.predictions)
    figures = write_heatmaps(model, [e for e, _ in shown], [p for _, p in shown], src, tgt, out)
    samples = [
        {"source": e.source, "prediction": p, "target": e.target, "form": e.form,
         "correct": p == e.target}
        for e, p in _pick(heldout, SAMPLE_FORMS, ev.predictions)
    ]  # fmt: skip
    metrics = {
        "task": "written dates -> ISO 8601 (qkv.demo.dates)",
        **summary,
        "correct": ev.correct,
        "eval_examples": ev.total,
        "eval_seconds": ev.seconds,
        "prepare_seconds": prepare_seconds,
        "steps": result.steps,
        "examples_seen": result.examples_seen,
        "examples_per_second": result.examples_seen / max(result.seconds, 1e-9),
        "final_loss": result.final_loss,
        "final_token_accuracy": result.final_token_accuracy,
        "threads": {"fixed": config.threads, "cores": cores, "chosen": result.thread_choices},
        "processes": here.world_size,
        "resumed_from_step": result.resumed_from,
        "quick": quick,
        "config": {"demo": asdict(config), "model": asdict(model.config)},
        "exact_match_by_form": ev.by_form,
        "checkpoint": checkpoint.name,
        "train_state": state_path.name,
        "heatmaps": figures,
        "samples": samples,
        "history": result.history,
        "versions": {"qkv": qkv.__version__, "torch": torch.__version__},
    }
    text = json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out / "metrics.json", lambda f: f.write(text.encode("utf-8")))
    index = write_index(out, metrics, figures, samples)

    say("\nsample translations (held-out dates):")
    width = max((display_width(s["source"]) for s in samples), default=0)
    for s in samples:
        mark = "ok" if s["correct"] else f"WRONG, expected {s['target']}"
        say(f"  {pad(s['source'], width)}  ->  {s['prediction']:<10}  {mark}")
    wrong = [(e, p) for e, p in zip(heldout, ev.predictions, strict=True) if p != e.target]
    if wrong:
        say(f"\n{len(wrong)} held-out mistakes, for example:")
        for e, p in wrong[:MISTAKES]:
            say(f"  {e.source}  ->  {p}  (expected {e.target}, form {e.form})")
    pngs = sum(1 + bool(f["decoder_self"]) for f in figures)
    say(f"\nwrote {out / 'metrics.json'}, {checkpoint}, {pngs} heatmaps, {index}")
    say(f"try: qkv translate '21 November 2026' --checkpoint {checkpoint}")
    ddp.barrier()  # the other ranks wait here until everything is written
    return metrics
