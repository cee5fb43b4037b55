"""The `qkv` command line: demo, translate, shapes, bench.

    qkv demo [--out DIR] [--quick] [--resume]   train the date translator, write heatmaps
    qkv translate TEXT... --checkpoint PATH [--beam N] [--json]   with how sure it is
    qkv shapes [--batch N] --length L --dim E --heads H [--kv-heads G] [--dtype D]
    qkv bench [...]                              qkv against torch's attention (qkv.bench)
    qkv check FILE[:NAME] [--init K=V ...] [--json] [--lang en|zh]   grade hand-written attention

Exit codes: 0 success, 2 for anything the user can fix (a usage error, an empty or blank
TEXT, an unreadable checkpoint, characters the model has never seen, an --out that cannot
be written, --resume of another config), always with one line on stderr that names the
argument at fault (tests/test_cli_audit.py tries every option); 130 (143) when Ctrl-C
(SIGTERM) stopped `qkv demo`, whose training state is then saved for --resume.
Heavy imports (torch, the demo) happen inside the subcommands, so `qkv --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._argparse import USAGE_ERROR, OneLineParser

__all__ = ["main"]


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _shown(text: str, limit: int = 40) -> str:
    """`text` quoted for a message, cut short when long (a one-line message stays short)."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[: limit - 3]) + f"... ({len(text):,} characters)"


def _int_in(minimum: int, maximum: int | None, what: str):
    """An argparse type: an int in [minimum, maximum], with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # not an integer, or more digits than int() reads
            raise argparse.ArgumentTypeError(f"expected {what}, got {_shown(text)}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {_shown(text)}")
        return value

    return parse


def _non_empty(what: str):
    """An argparse type: a string that is not empty or blank."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{what} must not be {'blank' if text else 'empty'}")
        return text

    return parse


_positive = _int_in(1, None, "a positive integer")
_non_negative = _int_in(0, None, "an integer >= 0")
MAX_SEED = 2**32 - 1  # torch and random take more, but seed + 1 must stay a valid seed too
MAX_STEPS = 10**9  # years of training on any machine
MAX_THREADS = 1024  # torch.set_num_threads overflows on absurd counts
MAX_BEAM = 100  # each beam is one more decoded row; a date needs a handful at most


def _build_parser() -> OneLineParser:
    parser = OneLineParser(prog="qkv", description="qkv: attention done right.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo", help="train the built-in date translator (dates -> ISO 8601) on the CPU",
        description="Train qkv's encoder-decoder Transformer to translate written dates into "
        "ISO 8601, evaluate it on held-out dates, write metrics.json, a checkpoint, attention "
        "heatmaps and index.html.",
    )  # fmt: skip
    demo.add_argument(
        "--out", type=_non_empty("a directory"), default="runs/demo", metavar="DIR",
        help="default: runs/demo",
    )  # fmt: skip
    demo.add_argument("--quick", action="store_true", help="a seconds-long run (tiny model)")
    demo.add_argument(
        "--arch", choices=("transformer", "rnn"), default=None,
        help="default transformer; rnn: the GRU encoder-decoder with additive attention",
    )  # fmt: skip
    demo.add_argument(
        "--seed", type=_int_in(0, MAX_SEED, f"an integer in [0, {MAX_SEED}]"), default=None,
        metavar="N", help="default 0",
    )  # fmt: skip
    demo.add_argument(
        "--steps", type=_int_in(1, MAX_STEPS, f"an integer in [1, {MAX_STEPS:,}]"),
        default=None, metavar="N", help="default 800",
    )  # fmt: skip
    demo.add_argument(
        "--threads", type=_int_in(1, MAX_THREADS, f"an integer in [1, {MAX_THREADS}]"),
        default=None, metavar="N", help="default: timed, 1 or all",
    )  # fmt: skip
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument(
        "--resume", action="store_true",
        help="continue DIR/train_state.pt (saved every --checkpoint-every steps, at the end "
        "and on Ctrl-C); give the options the run was started with",
    )  # fmt: skip
    demo.add_argument(
        "--checkpoint-every", type=_non_negative, default=200, metavar="N",
        help="save the training state every N steps (default 200; 0: only at the end)",
    )  # fmt: skip
    demo.add_argument(
        "--deterministic", action="store_true",
        help="bit-identical runs for a seed: a fixed thread count (--threads, default 1)",
    )  # fmt: skip

    tr = sub.add_parser(
        "translate", help="translate written dates with a demo checkpoint",
        description="Print the ISO 8601 translation of each TEXT and how sure the model is: "
        "the probability of the decoded sequence, with a warning when it is low or when TEXT "
        "is unlike anything the model was trained on (docs/translate.md).",
    )  # fmt: skip
    tr.add_argument("texts", nargs="+", metavar="TEXT", help="a written date, e.g. '7 March 2019'")
    tr.add_argument(
        "--checkpoint", type=_non_empty("a checkpoint path"), required=True, metavar="PATH",
        help="e.g. runs/demo/model.pt",
    )  # fmt: skip
    tr.add_argument(
        "--beam", type=_int_in(1, MAX_BEAM, f"an integer in [1, {MAX_BEAM}]"), default=1,
        metavar="N", help="beams (default 1: greedy)",
    )  # fmt: skip
    tr.add_argument(
        "--json", action="store_true",
        help='print [{"input", "output", "valid_date", "confidence", "warning"}] for scripts',
    )  # fmt: skip

    sh = sub.add_parser(
        "shapes", help="walk one multi-head self-attention call: shapes, FLOPs, memory",
        description="Every tensor of one multi-head self-attention call, as a shape tuple, "
        "with the FLOPs and memory of each step.",
    )  # fmt: skip
    sh.add_argument("--batch", type=_positive, default=1, metavar="N", help="B (default 1)")
    sh.add_argument("--length", type=_positive, required=True, metavar="L", help="positions")
    sh.add_argument("--dim", type=_positive, required=True, metavar="E", help="model width")
    sh.add_argument("--heads", type=_positive, required=True, metavar="H", help="query heads")
    sh.add_argument("--kv-heads", type=_positive, default=None, metavar="G", help="default H")
    sh.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float64"),
        help="default float32",
    )  # fmt: skip

    sub.add_parser(
        "bench", help="measure qkv against torch's attention (options: qkv bench --help)",
        add_help=False,
    )  # fmt: skip
    from .check.cli import add_parser as add_check_parser

    add_check_parser(sub)
    return parser


def _demo(args: argparse.Namespace) -> int:
    import dataclasses
    import shlex

    from .demo import QUICK, CheckpointError, DemoConfig, TrainingInterrupted, run_demo

    config = QUICK if args.quick else DemoConfig()
    overrides = {k: getattr(args, k) for k in ("seed", "steps", "threads", "arch")}
    if args.deterministic and args.threads is None:
        overrides["threads"] = 1  # a fixed count: the ThreadChooser's switches reorder sums
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if problem := _unwritable_dir(args.out):  # before training, not after it
        return _fail("qkv demo", f"--out {problem}")
    try:
        run_demo(args.out, quick=args.quick, config=config, progress=not args.no_progress,
                 resume=args.resume, checkpoint_every=args.checkpoint_every)  # fmt: skip
    except TrainingInterrupted as e:
        if e.is_main:  # under torchrun every rank stops; one says so
            options = [*(["--quick"] if args.quick else []),
                       *(f"--{k} {v}" for k, v in overrides.items() if v is not None)]  # fmt: skip
            again = " ".join(["qkv demo --out", shlex.quote(str(args.out)), *options, "--resume"])
            saved = f"training state saved to {e.path}; " if e.path else ""
            print(f"qkv demo: interrupted after step {e.step:,} of {e.steps:,}; {saved}"
                  f"continue with: {again}", file=sys.stderr)  # fmt: skip
        return 128 + int(e.signum)
    except KeyboardInterrupt:
        print("qkv demo: interrupted", file=sys.stderr)
        return 130
    except CheckpointError as e:
        return _fail("qkv demo", str(e))
    except OSError as e:
        return _fail("qkv demo", f"--out {args.out}: cannot write there ({e.strerror or e})")
    return 0


def _unwritable_dir(out: str) -> str | None:
    """Why the output directory `out` cannot be written, or None (it is created if need be)."""
    import os
    from pathlib import Path

    path = Path(out)
    if path.exists() and not path.is_dir():
        return f"{out} is a file, not a directory: give a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{out} cannot be created ({e.strerror or e}): give a writable directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{out} is not writable: give a writable directory"
    return None


def _percent(p: float) -> str:
    """0.99996 -> '>99.9%' (never a rounded 100% for a probability below 1)."""
    text = f"{p:.1%}"
    return ">99.9%" if p < 1 and text == "100.0%" else text


def _translate(args: argparse.Namespace) -> int:
    import json

    from .demo import CheckpointError, display_width, load_checkpoint, pad
    from .demo.confidence import MAX_INPUT_CHARS, translate_with_confidence

    texts = args.texts
    for i, text in enumerate(texts):  # the cheap checks first, then the checkpoint
        which = "TEXT" if len(texts) == 1 else f"TEXT #{i + 1}"
        if not text.strip():
            kind = "blank" if text else "empty"
            return _fail("qkv translate", f"{which} is {kind}: give a written date, e.g. "
                         "'7 March 2019'")  # fmt: skip
        if len(text) > MAX_INPUT_CHARS:
            return _fail("qkv translate", f"{which} has {len(text):,} characters, more than the "
                         f"{MAX_INPUT_CHARS:,} read: a written date has fewer than 30")  # fmt: skip
    try:
        ckpt = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        return _fail("qkv translate", f"--checkpoint: {e}")
    for i, text in enumerate(texts):  # check all inputs before translating any
        if unknown := ckpt.src_vocab.unknown(text):
            which = "TEXT" if len(texts) == 1 else f"TEXT #{i + 1}"
            shown = " ".join(repr(c) for c in unknown[:10])
            return _fail("qkv translate", f"{which} {_shown(text)} contains characters the "
                         f"model has never seen: {shown}")  # fmt: skip
    results = translate_with_confidence(
        ckpt.model, texts, ckpt.src_vocab, ckpt.tgt_vocab, beam=args.beam
    )
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
        return 0
    shown = [t if len(t) <= 40 else t[:37] + "..." for t in texts]
    width = max(display_width(t) for t in shown)
    for text, r in zip(shown, results, strict=True):
        note = "" if r.valid_date else "  (not a calendar date)"
        warning = f"  ! warning: {r.warning}" if r.warning else ""
        sure = f"{_percent(r.confidence):>6} sure"
        print(f"{pad(text, width)}  ->  {r.output}  {sure}{note}{warning}")
    return 0


def _shapes(args: argparse.Namespace) -> int:
    from .demo.shapes import format_walk, walk

    try:
        w = walk(args.batch, args.length, args.dim, args.heads, args.kv_heads, args.dtype)
    except ValueError as e:
        return _fail("qkv shapes", str(e))
    print(format_walk(w))
    return 0


def _bench(argv: list[str]) -> int:
    import importlib

    try:
        bench = importlib.import_module("qkv.bench")
    except ModuleNotFoundError as e:
        if e.name != "qkv.bench":
            raise  # qkv.bench is there but one of its own imports is missing: show it
        return _fail("qkv bench", "qkv.bench is not available in this installation")
    return int(bench.main(argv) or 0)


def _check(args: argparse.Namespace) -> int:
    from .check.cli import run

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `qkv` command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # all its options belong to qkv.bench
        return _bench(argv[1:])
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    handlers = {"demo": _demo, "translate": _translate, "shapes": _shapes, "check": _check}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
