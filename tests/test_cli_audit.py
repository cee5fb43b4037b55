"""The command-line audit: every option of every `qkv` command answers bad input in one line.

Each row of `CASES` runs `qkv COMMAND ...` in process with one bad argument and expects
exit 2, exactly one line on stderr that starts with the program, says "error", names the
argument (`BadArgs.arg`, or the `match` regex) and holds no traceback. Nothing slow may
start: the benchmark's GEMM and case runners and the demo's data preparation raise if a
bad command line reaches them (so `bench --only no-such-case` is proved to answer before
measuring anything).

`test_every_option_is_audited` walks the parsers themselves (the `qkv` parser's
subcommands, and the parsers `qkv bench` and any delegated command build, caught as they
parse): every option and positional needs a row for each kind of bad input its type calls
for (`required_kinds`), so an option added without audit rows fails the suite. Rows marked
`known=` are bad inputs a command does not answer properly today: strict xfails, to be
removed with the fix.

Placeholders in argv: {file} an existing file that is no checkpoint, {dir} a directory,
{missing} a path that does not exist, {ckpt} a valid (untrained) demo checkpoint, {fresh}
an empty directory.
"""

from __future__ import annotations

import argparse
import importlib
import re
from dataclasses import dataclass

import pytest

from qkv import cli

KINDS = frozenset({
    "empty", "blank", "huge", "negative", "zero", "wrong-type", "missing-value", "choice",
    "flag-value", "missing-file", "directory", "unwritable", "corrupt", "no-match", "format",
    "unknown-char",
})  # fmt: skip


@dataclass(frozen=True)
class BadArgs:
    """`qkv *argv` must exit 2 with one line naming `arg` (or matching `match`)."""

    argv: tuple[str, ...]
    arg: str  # the option at fault as parsers name it: "--beam", or a positional's metavar
    kind: str  # which kind of bad input (KINDS)
    match: str | None = None  # regex for the line; default: the argument's name
    known: str | None = None  # why the command fails this today (strict xfail)
    run: bool = True  # False: a known failure too slow to run each time (xfail, not run)

    @property
    def command(self) -> str:
        return self.argv[0] if self.argv else ""


def B(*argv: str, arg: str, kind: str, match: str | None = None, known: str | None = None,
      run: bool = True):  # fmt: skip
    assert kind in KINDS, kind
    return BadArgs(tuple(argv), arg, kind, match, known, run)


_SH = ("--length", "5", "--dim", "8", "--heads", "2")
_TR = ("translate", "7 March 2019", "--checkpoint", "{ckpt}")
_CHECK = ("check", "{file}")
# qkv check starts its worker process (seconds: it imports torch) before it looks at FILE

CASES = [
    # ---- demo
    B("demo", "--out", "", arg="--out", kind="empty"),
    B("demo", "--out", "  ", arg="--out", kind="blank"),
    B("demo", "--out", "{file}", arg="--out", kind="directory", match=r"--out .* is a file"),
    B("demo", "--out", "{file}/sub", arg="--out", kind="unwritable"),
    B("demo", "--out", "--quick", arg="--out", kind="missing-value"),
    B("demo", "--quick=yes", arg="--quick", kind="flag-value"),
    B("demo", "--no-progress=1", arg="--no-progress", kind="flag-value"),
    B("demo", "--deterministic=1", arg="--deterministic", kind="flag-value"),
    B("demo", "--resume=1", arg="--resume", kind="flag-value"),
    B("demo", "--resume", "--quick", "--out", "{fresh}", arg="--resume", kind="missing-file"),
    B("demo", "--arch", "lstm", arg="--arch", kind="choice"),
    B("demo", "--seed", "-1", arg="--seed", kind="negative"),
    B("demo", "--seed", "zero", arg="--seed", kind="wrong-type"),
    B("demo", "--seed", "9" * 30, arg="--seed", kind="huge"),
    B("demo", "--steps", "0", arg="--steps", kind="zero"),
    B("demo", "--steps", "-5", arg="--steps", kind="negative"),
    B("demo", "--steps", "1.5", arg="--steps", kind="wrong-type"),
    B("demo", "--steps", "1" * 5000, arg="--steps", kind="huge"),
    B("demo", "--threads", "-1", arg="--threads", kind="negative"),
    B("demo", "--threads", "two", arg="--threads", kind="wrong-type"),
    B("demo", "--threads", "100000000000", arg="--threads", kind="huge"),
    B("demo", "--checkpoint-every", "-1", arg="--checkpoint-every", kind="negative"),
    B("demo", "--checkpoint-every", "often", arg="--checkpoint-every", kind="wrong-type"),
    B("demo", "--bogus", arg="--bogus", kind="format"),
    # ---- translate
    B("translate", "", "--checkpoint", "{ckpt}", arg="TEXT", kind="empty"),
    B("translate", "   ", "--checkpoint", "{ckpt}", arg="TEXT", kind="blank"),
    B("translate", "7 March", "\t", "--checkpoint", "{ckpt}", arg="TEXT", kind="blank",
      match=r"TEXT #2 is blank"),
    B("translate", "7" * 20_000, "--checkpoint", "{ckpt}", arg="TEXT", kind="huge"),
    B("translate", "7 März 2019", "--checkpoint", "{ckpt}", arg="TEXT", kind="unknown-char",
      match=r"TEXT .*never seen: 'ä'"),
    B("translate", "--checkpoint", "{ckpt}", arg="TEXT", kind="missing-value"),
    B("translate", "7 March 2019", arg="--checkpoint", kind="missing-value"),
    B(*_TR[:3], "", arg="--checkpoint", kind="empty"),
    B(*_TR[:3], "{missing}", arg="--checkpoint", kind="missing-file"),
    B(*_TR[:3], "{dir}", arg="--checkpoint", kind="directory"),
    B(*_TR[:3], "{file}", arg="--checkpoint", kind="corrupt"),
    B(*_TR, "--beam", "0", arg="--beam", kind="zero"),
    B(*_TR, "--beam", "-2", arg="--beam", kind="negative"),
    B(*_TR, "--beam", "wide", arg="--beam", kind="wrong-type"),
    B(*_TR, "--beam", "1000000", arg="--beam", kind="huge"),
    B(*_TR, "--json=1", arg="--json", kind="flag-value"),
    # ---- shapes
    B("shapes", *_SH, "--batch", "0", arg="--batch", kind="zero"),
    B("shapes", *_SH, "--batch", "-2", arg="--batch", kind="negative"),
    B("shapes", *_SH, "--batch", "two", arg="--batch", kind="wrong-type"),
    B("shapes", *_SH, "--batch", str(2**64), arg="--batch", kind="huge"),
    B("shapes", "--dim", "8", "--heads", "2", arg="--length", kind="missing-value"),
    B("shapes", "--length", "0", *_SH[2:], arg="--length", kind="zero"),
    B("shapes", "--length", "-7", *_SH[2:], arg="--length", kind="negative"),
    B("shapes", "--length", "1e9", *_SH[2:], arg="--length", kind="wrong-type"),
    B("shapes", "--length", "9" * 25, *_SH[2:], arg="--length", kind="huge"),
    B("shapes", *_SH[:2], "--dim", "0", *_SH[4:], arg="--dim", kind="zero"),
    B("shapes", *_SH[:2], "--dim", "-64", *_SH[4:], arg="--dim", kind="negative"),
    B("shapes", *_SH[:2], "--dim", "sixty", *_SH[4:], arg="--dim", kind="wrong-type"),
    B("shapes", *_SH[:2], "--dim", str(2**70), *_SH[4:], arg="--dim", kind="huge"),
    B("shapes", *_SH[:2], "--dim", "10", "--heads", "3", arg="--heads", kind="format",
      match=r"--dim.*--heads"),
    B("shapes", *_SH[:4], "--heads", "0", arg="--heads", kind="zero"),
    B("shapes", *_SH[:4], "--heads", "-1", arg="--heads", kind="negative"),
    B("shapes", *_SH[:4], "--heads", "2.0", arg="--heads", kind="wrong-type"),
    B("shapes", *_SH, "--kv-heads", "-1", arg="--kv-heads", kind="negative"),
    B("shapes", *_SH, "--kv-heads", "x", arg="--kv-heads", kind="wrong-type"),
    B("shapes", *_SH[:4], "--heads", "4", "--kv-heads", "3", arg="--kv-heads", kind="format"),
    B("shapes", *_SH, "--dtype", "int8", arg="--dtype", kind="choice", match=r"--dtype.*int8"),
    # ---- bench (its options belong to qkv.bench)
    B("bench", "--bogus", arg="--bogus", kind="format"),
    B("bench", "--quick=1", arg="--quick", kind="flag-value"),
    B("bench", "--no-memory=1", arg="--no-memory", kind="flag-value"),
    B("bench", "--bf16=1", arg="--bf16", kind="flag-value"),
    B("bench", "--repeats", "-1", arg="--repeats", kind="negative"),
    B("bench", "--repeats", "0", "--quick", arg="--repeats", kind="zero"),
    B("bench", "--repeats", "many", arg="--repeats", kind="wrong-type"),
    B("bench", "--quick", "--only", "no-such-case", arg="--only", kind="no-match",
      match=r"--only 'no-such-case' matches no case; the cases are 'dense'"),
    B("bench", "--quick", "--only", "", arg="--only", kind="empty"),
    B("bench", "--quick", "--json", "", arg="--json", kind="empty"),
    B("bench", "--quick", "--json", "{dir}", arg="--json", kind="directory"),
    B("bench", "--quick", "--json", "{file}/x.json", arg="--json", kind="unwritable"),
    B("bench", "--quick", "--out", "", arg="--out", kind="empty"),
    B("bench", "--quick", "--out", "{file}", arg="--out", kind="unwritable"),
    # ---- check
    B("check", arg="FILE[:NAME]", kind="missing-value", match=r"FILE"),
    B("check", "", arg="FILE[:NAME]", kind="empty", match=r"FILE is empty"),
    B("check", "{missing}", arg="FILE[:NAME]", kind="missing-file", match=r"no such file"),
    B("check", "{dir}", arg="FILE[:NAME]", kind="directory", match=r"is a directory"),
    B(*_CHECK, "--init", "depth", arg="--init", kind="format"),
    B(*_CHECK, "--init", "1a=2", arg="--init", kind="format"),
    B(*_CHECK, "--init", "k=zz", arg="--init", kind="wrong-type"),
    B(*_CHECK, "--init", "", arg="--init", kind="empty"),
    B(*_CHECK, "--json=1", arg="--json", kind="flag-value"),
    B(*_CHECK, "--lang", "fr", arg="--lang", kind="choice"),
    B(*_CHECK, "--timeout", "0", arg="--timeout", kind="zero"),
    B(*_CHECK, "--timeout", "-1", arg="--timeout", kind="negative"),
    B(*_CHECK, "--timeout", "soon", arg="--timeout", kind="wrong-type"),
    B(*_CHECK, "--timeout", "inf", arg="--timeout", kind="huge"),
]  # fmt: skip

# Every command line, whatever the command: no command, an unknown one.
TOP_CASES = [
    B(arg="COMMAND", kind="missing-value", match=r"COMMAND|command"),
    B("frobnicate", arg="COMMAND", kind="choice", match=r"frobnicate"),
]


# ---- running the cases -------------------------------------------------------------------


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    from qkv.demo import QUICK, save_checkpoint
    from qkv.demo.dates import source_vocab, target_vocab
    from qkv.demo.train import build_model

    root = tmp_path_factory.mktemp("audit")
    (root / "file.txt").write_text("not a checkpoint\n")
    (root / "dir").mkdir()
    (root / "fresh").mkdir()
    src, tgt = source_vocab(), target_vocab()
    ckpt = save_checkpoint(root / "model.pt", build_model(QUICK, src, tgt), src, tgt)
    return {"file": str(root / "file.txt"), "dir": str(root / "dir"), "fresh": str(root / "fresh"),
            "missing": str(root / "no" / "such.pt"), "ckpt": str(ckpt)}  # fmt: skip


def _nothing_slow(monkeypatch, argv) -> None:
    """Make the slow paths raise: a bad command line must be answered before them."""

    def must_not_run(*args, **kwargs):
        raise AssertionError(f"`qkv {' '.join(argv)}` was accepted and started real work")

    bench = importlib.import_module("qkv.bench")
    for name in ("gemm_throughput", "run_case", "length_sweep"):
        monkeypatch.setattr(bench, name, must_not_run)
    demo = importlib.import_module("qkv.demo")
    monkeypatch.setattr(demo, "prepare", must_not_run)


def _param(case: BadArgs):
    marks = [pytest.mark.xfail(strict=True, reason=case.known, run=case.run)] if case.known else []
    shown = " ".join(a if len(a) < 30 else a[:12] + "..." for a in case.argv if a) or "(none)"
    return pytest.param(case, marks=marks, id=f"{case.kind}: qkv {shown}")


@pytest.mark.parametrize("case", [_param(c) for c in CASES + TOP_CASES])
def test_bad_command_line_exits_2_with_one_line(case: BadArgs, places, capsys, monkeypatch):
    if case.command == "check" and "check" not in command_parsers():
        pytest.skip("qkv check is not wired into the command line yet")
    argv = [a.format(**places) for a in case.argv]
    _nothing_slow(monkeypatch, argv)
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code!r}; stderr {err[-500:]!r}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line message, got {err[-1000:]!r}"
    line = lines[0]
    assert line.startswith("qkv") and "error" in line and "Traceback" not in err, line
    assert len(line) < 400, f"a long message: {line[:200]!r}..."
    assert re.search(case.match or re.escape(case.arg), line), line


# ---- the meta-test: no option escapes the audit --------------------------------------------


class _Caught(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _caught_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The first parser that `qkv *argv` parses with (for commands that build their own)."""
    original = argparse.ArgumentParser.parse_known_args

    def catch(self, args=None, namespace=None):
        raise _Caught(self)

    argparse.ArgumentParser.parse_known_args = catch
    try:
        cli.main(argv)
    except _Caught as e:
        return e.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise AssertionError(f"`qkv {' '.join(argv)}` parsed nothing")


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's own parser: the `qkv` subparsers, and those of delegated commands."""
    top = cli._build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {}
    for name, parser in sub.choices.items():
        own = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
        parsers[name] = parser if own else _caught_parser([name])  # `bench` builds its own
    return parsers


def _name(action: argparse.Action) -> str:
    if action.option_strings:
        return max(action.option_strings, key=len)
    return action.metavar if isinstance(action.metavar, str) else action.dest


def required_kinds(action: argparse.Action) -> set[str]:
    """The kinds of bad input an option's type calls for."""
    if action.nargs == 0:  # a flag
        return {"flag-value"}
    if action.choices is not None:
        return {"choice"}
    if action.type is None:  # any string
        return {"empty"}
    try:
        numeric = isinstance(action.type("3"), int | float)
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        numeric = False
    return {"wrong-type", "negative"} if numeric else {"empty"}


# Kinds beyond the type's: what each option means calls for them.
EXTRA_KINDS = {
    ("demo", "--out"): {"blank", "directory", "unwritable"},
    ("demo", "--resume"): {"missing-file"},
    ("translate", "TEXT"): {"blank", "huge", "unknown-char", "missing-value"},
    ("translate", "--checkpoint"): {"missing-file", "directory", "corrupt", "missing-value"},
    ("translate", "--beam"): {"zero", "huge"},
    ("demo", "--steps"): {"zero", "huge"},
    ("demo", "--threads"): {"huge"},
    ("demo", "--seed"): {"huge"},
    ("shapes", "--length"): {"zero", "huge", "missing-value"},
    ("shapes", "--dim"): {"zero", "huge"},
    ("shapes", "--heads"): {"zero", "format"},
    ("shapes", "--kv-heads"): {"format"},
    ("bench", "--only"): {"no-match"},
    ("bench", "--json"): {"directory", "unwritable"},
    ("bench", "--out"): {"unwritable"},
    ("check", "FILE[:NAME]"): {"missing-file", "directory", "missing-value"},
    ("check", "--init"): {"format"},
    ("check", "--timeout"): {"zero"},
}


def audited_options() -> dict[tuple[str, str], set[str]]:
    """(command, option) -> the kinds it must have rows for."""
    wanted = {}
    for command, parser in command_parsers().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            key = (command, _name(action))
            wanted[key] = required_kinds(action) | EXTRA_KINDS.get(key, set())
    return wanted


def test_every_option_is_audited():
    have: dict[tuple[str, str], set[str]] = {}
    for case in CASES:
        have.setdefault((case.command, case.arg), set()).add(case.kind)
    missing = [
        f"qkv {command} {option}: {sorted(kinds - have.get((command, option), set()))}"
        for (command, option), kinds in sorted(audited_options().items())
        if kinds - have.get((command, option), set())
    ]
    assert not missing, f"options without audit rows in tests/test_cli_audit.py: {missing}"


def test_the_audit_table_names_real_options():
    """Every row's argument exists (an unknown option is audited as such: --bogus)."""
    options = audited_options()
    commands = command_parsers()
    for case in CASES:
        if case.command not in commands:
            continue  # a command not wired in yet
        if case.arg == "--bogus":
            continue
        assert (case.command, case.arg) in options, f"{case.argv}: no option {case.arg}"
    for key in EXTRA_KINDS:
        assert key in options or key[0] not in commands, f"EXTRA_KINDS names no option {key}"
