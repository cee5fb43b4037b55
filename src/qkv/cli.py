"""The `qkv` command line: demo, translate, shapes, bench.

    qkv demo [--out DIR] [--quick] [--resume]   train the date translator, write heatmaps
    qkv translate TEXT... --checkpoint PATH [--beam N]
    qkv shapes --batch N --length L --dim E --heads H [--kv-heads G] [--dtype D]
    qkv bench [...]                              qkv against torch's attention (qkv.bench)

Exit codes: 0 success, 2 for anything the user can fix (a usage error, an unreadable
checkpoint, characters the model has never seen, --resume of another config), always with a
one-line message on stderr; 130 (143) when Ctrl-C (SIGTERM) stopped `qkv demo`, whose
training state is then saved for --resume.
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


def _int_at_least(minimum: int, what: str):
    """An argparse type: an int >= minimum, with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "an integer >= 0")


def _build_parser() -> OneLineParser:
    parser = OneLineParser(prog="qkv", description="qkv: attention done right.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo", help="train the built-in date translator (dates -> ISO 8601) on the CPU",
        description="Train qkv's encoder-decoder Transformer to translate written dates into "
        "ISO 8601, evaluate it on held-out dates, write metrics.json, a checkpoint, attention "
        "heatmaps and index.html.",
    )  # fmt: skip
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="default: runs/demo")
    demo.add_argument("--quick", action="store_true", help="a seconds-long run (tiny model)")
    demo.add_argument(
        "--arch", choices=("transformer", "rnn"), default=None,
        help="default transformer; rnn: the GRU encoder-decoder with additive attention",
    )  # fmt: skip
    demo.add_argument("--seed", type=_non_negative, default=None, metavar="N", help="default 0")
    demo.add_argument("--steps", type=_positive, default=None, metavar="N", help="default 800")
    demo.add_argument(
        "--threads", type=_positive, default=None, metavar="N", help="default: timed, 1 or all"
    )
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
        description="Print the ISO 8601 translation of each TEXT.",
    )  # fmt: skip
    tr.add_argument("texts", nargs="+", metavar="TEXT", help="a written date, e.g. '7 March 2019'")
    tr.add_argument("--checkpoint", required=True, metavar="PATH", help="e.g. runs/demo/model.pt")
    tr.add_argument("--beam", type=_positive, default=1, metavar="N", help="beams (default 1)")

    sh = sub.add_parser(
        "shapes", help="walk one multi-head self-attention call: shapes, FLOPs, memory",
        description="Every tensor of one multi-head self-attention call, as a shape tuple, "
        "with the FLOPs and memory of each step.",
    )  # fmt: skip
    sh.add_argument("--batch", type=_positive, required=True, metavar="N", help="B")
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
        return _fail("qkv demo", f"cannot write to {args.out}: {e}")
    return 0


def _translate(args: argparse.Namespace) -> int:
    from datetime import date

    from .demo import (
        CheckpointError,
        UnknownCharacterError,
        display_width,
        load_checkpoint,
        pad,
        translate,
    )

    try:
        ckpt = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        return _fail("qkv translate", str(e))
    for text in args.texts:  # check all inputs before translating any
        if unknown := ckpt.src_vocab.unknown(text):
            return _fail("qkv translate", str(UnknownCharacterError(unknown, text)))
    outputs = translate(ckpt.model, args.texts, ckpt.src_vocab, ckpt.tgt_vocab, beam=args.beam)
    width = max(display_width(t) for t in args.texts)
    for text, iso in zip(args.texts, outputs, strict=True):
        try:
            date.fromisoformat(iso)
            note = ""
        except ValueError:
            note = "  (not a calendar date)"
        print(f"{pad(text, width)}  ->  {iso}{note}")
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
    handlers = {"demo": _demo, "translate": _translate, "shapes": _shapes}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
