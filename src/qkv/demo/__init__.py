"""qkv.demo: a translation task built in (written dates -> ISO 8601) and the `qkv demo` run.

    from qkv.demo import run_demo
    metrics = run_demo("runs/demo")        # trains, evaluates, writes checkpoint and heatmaps

Modules: `dates` (the task: written forms, split by date, vocabularies), `train` (length
buckets, schedule, training loop, KV-cache evaluation), `checkpoint` (atomic save, checked
load), `heatmaps` (PNG attention maps and index.html), `shapes` (the `qkv shapes` walk).
tqdm and matplotlib are imported only when training and plotting.
"""

from __future__ import annotations

import json
import os
import time
import unicodedata
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .checkpoint import Checkpoint, CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from .dates import FORMS, UnknownCharacterError, Vocab
from .train import (
    QUICK,
    DemoConfig,
    available_cores,
    evaluate,
    prepare,
    set_threads,
    train,
    translate,
)

__all__ = [
    "FORMS",
    "QUICK",
    "Checkpoint",
    "CheckpointError",
    "DemoConfig",
    "UnknownCharacterError",
    "Vocab",
    "display_width",
    "load_checkpoint",
    "pad",
    "run_demo",
    "save_checkpoint",
    "translate",
]

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
) -> dict:
    """Train on the date task, evaluate, and write everything under `out`; returns metrics.

    Writes out/model.pt (atomically), out/metrics.json, out/heatmaps/*.png, out/index.html.
    torch's thread count (fixed by `config.threads`, else chosen while training) is
    restored afterwards.
    """
    import torch

    config = config or (QUICK if quick else DemoConfig())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    try:
        if config.threads is not None:
            set_threads(config.threads)
        return _run(out, config, quick, progress, echo)
    finally:
        torch.set_num_threads(previous)


def _run(out: Path, config: DemoConfig, quick: bool, progress: bool, echo) -> dict:
    import torch

    import qkv

    from .heatmaps import write_heatmaps, write_index

    cores = available_cores()
    start = time.perf_counter()
    train_set, heldout, src, tgt = prepare(config)
    prepare_seconds = time.perf_counter() - start
    echo(
        f"qkv demo: {len(train_set):,} training examples ({len(FORMS)} written forms), "
        f"{len(heldout):,} held out on unseen dates; torch threads: "
        + (
            str(config.threads or 1)
            if config.threads or cores == 1
            else f"1 or {cores}, whichever runs faster (timed every 200 steps)"
        )
    )
    result = train(config, train_set, src, tgt, progress=progress)
    model = result.model
    params = sum(p.numel() for p in model.parameters())
    echo(f"trained {params:,} parameters in {result.seconds:.1f} s ({result.steps:,} steps)")

    ev = evaluate(model, heldout, src, tgt)
    echo(
        f"exact match on {ev.total:,} held-out examples: {ev.exact_match:.2%} "
        f"({ev.correct:,}/{ev.total:,}, greedy decoding with a KV cache, {ev.seconds:.1f} s)"
    )
    summary = {
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
        "quick": quick,
        "config": {"demo": asdict(config), "model": asdict(model.config)},
        "exact_match_by_form": ev.by_form,
        "checkpoint": checkpoint.name,
        "heatmaps": figures,
        "samples": samples,
        "history": result.history,
        "versions": {"qkv": qkv.__version__, "torch": torch.__version__},
    }
    text = json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out / "metrics.json", lambda f: f.write(text.encode("utf-8")))
    index = write_index(out, metrics, figures, samples)

    echo("\nsample translations (held-out dates):")
    width = max((display_width(s["source"]) for s in samples), default=0)
    for s in samples:
        mark = "ok" if s["correct"] else f"WRONG, expected {s['target']}"
        echo(f"  {pad(s['source'], width)}  ->  {s['prediction']:<10}  {mark}")
    wrong = [(e, p) for e, p in zip(heldout, ev.predictions, strict=True) if p != e.target]
    if wrong:
        echo(f"\n{len(wrong)} held-out mistakes, for example:")
        for e, p in wrong[:MISTAKES]:
            echo(f"  {e.source}  ->  {p}  (expected {e.target}, form {e.form})")
    echo(f"\nwrote {out / 'metrics.json'}, {checkpoint}, {len(figures) * 2} heatmaps, {index}")
    echo(f"try: qkv translate '21 November 2026' --checkpoint {checkpoint}")
    return metrics
