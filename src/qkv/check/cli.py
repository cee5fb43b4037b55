"""`qkv check FILE[:NAME] [--init KEY=VALUE ...] [--json] [--lang en|zh] [--timeout S]`.

Exit codes: 0 every applicable check passes, 1 findings, 2 the file cannot be loaded,
built or called (one line on stderr saying why), or a usage error.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys

__all__ = ["add_parser", "run"]


def _init_item(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: VALUE must be a Python literal (quote strings: {key}=\"'text'\")"
        ) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `check` subcommand to `subparsers` (of the `qkv` parser)."""
    p = subparsers.add_parser(
        "check", help="grade a hand-written attention against qkv and name the mistake",
        description="Load FILE, find the attention function or class in it (or NAME), call "
        "it the ways learners write attention, compare it with qkv.attention and run one "
        "probe per classic mistake. Exit 0: every check passes; 1: findings; 2: it cannot "
        "be loaded, built or called.",
    )  # fmt: skip
    p.add_argument("target", metavar="FILE[:NAME]", help="e.g. my_attention.py:MultiHead")
    p.add_argument(
        "--init", type=_init_item, action="extend", nargs="+", default=[], metavar="KEY=VALUE",
        help="constructor arguments for a class, as Python literals (e.g. d_model=16 heads=4)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--lang", choices=("en", "zh"), default="en", help="report language")
    p.add_argument(
        "--timeout", type=_seconds, default=60.0, metavar="S",
        help="stop the target after S seconds (default 60)",
    )  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    """Run `qkv check` for parsed `args`; returns the exit code."""
    from .api import run_file
    from .loader import CheckError, file_problem

    keys = [k for k, _ in args.init]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        print(f"qkv check: error: --init gives {dup} twice", file=sys.stderr)
        return 2
    why = file_problem(args.target)  # at once: no worker process for a path that is not there
    if why is not None:
        print(f"qkv check: error: {why}", file=sys.stderr)
        return 2
    try:
        report = run_file(args.target, dict(args.init), timeout=args.timeout)
    except CheckError as e:
        reason = " ".join(str(e).split())
        print(f"qkv check: error: {reason}", file=sys.stderr)
        if args.json:
            print(json.dumps({"target": args.target, "ok": False, "error": reason,
                              "findings": [], "checks": []}, ensure_ascii=False))  # fmt: skip
        return 2
    try:
        print(report.to_json(args.lang) if args.json else report.text(args.lang))
        sys.stdout.flush()
    except BrokenPipeError:  # `qkv check ... | head`: the reader left, the verdict stands
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if report.ok else 1
