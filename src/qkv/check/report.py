"""The result of `qkv check`: findings, checks, and their text and JSON forms."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .i18n import LANGS, call_words, finding_fix, finding_message, text

__all__ = ["IDS", "Check", "CheckReport", "Finding"]

# Every check, in the order the report lists them (ids are English in every language).
IDS = (
    "shape",
    "wrong-output",
    "no-scaling",
    "scale-after-softmax",
    "softmax-axis",
    "unstable-softmax",
    "global-max-softmax",
    "masked-row-uniform",
    "shared-projection",
    "heads-split-on-sequence",
    "dropout-in-eval",
    "future-leak",
)
STATUSES = ("pass", "fail", "skip")
DOCS = "docs/pitfalls.md, docs/check.md"
_PITFALLS = {  # the finding -> its section of docs/pitfalls.md
    "global-max-softmax": "1-one-max-for-the-whole-matrix-instead-of-one-per-row",
    "scale-after-softmax": "2-scaling-by-1sqrtd_k-after-the-softmax",
    "shared-projection": "3-projecting-keys-and-values-with-the-querys-layer",
    "masked-row-uniform": "4-an-all-false-mask-filled-with--1e9-silently-uniform-weights",
    "future-leak": "5-a-decoder-that-is-a-stack-of-encoder-layers",
    "heads-split-on-sequence": "6-splitting-heads-along-the-sequence-axis",
}


@dataclass(frozen=True)
class Finding:
    """One mistake: a fixed `id`, the numbers it saw (`data`) and the learner's `line`."""

    id: str
    data: dict[str, Any] = field(default_factory=dict)
    line: int | None = None

    def message(self, lang: str = "en") -> str:
        """One paragraph: what the probe saw, with its numbers, and the fix."""
        return finding_message(self.id, self.data, lang)

    @property
    def docs(self) -> list[str]:
        """Where the mistake is explained: docs/check.md (how the probe decides) and, for
        the six pitfalls of the notes, docs/pitfalls.md."""
        pages = [f"docs/check.md#{self.id}"]
        if self.id in _PITFALLS:
            pages.insert(0, f"docs/pitfalls.md#{_PITFALLS[self.id]}")
        return pages


@dataclass(frozen=True)
class Check:
    """One check and its status: "pass", "fail" or "skip" (with why, for skip)."""

    id: str
    status: str
    why: str = ""


@dataclass(frozen=True)
class CheckReport:
    """What `qkv.check` found about one attention implementation.

    `ok` is True when every applicable check passed. `call` says how the target was called
    (e.g. "f(q, k, v, mask): torch tensors (N, L, D)") and `mask_convention` which mask
    polarity it uses ("keep": 1/True = may attend, "masked": 1/True = masked, "additive":
    a float mask added to the scores, or None).
    """

    target: str
    findings: tuple[Finding, ...]
    checks: tuple[Check, ...]
    call: str = ""
    mask_convention: str | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def ids(self) -> list[str]:
        """The ids of the findings, in report order."""
        return [f.id for f in self.findings]

    def to_dict(self, lang: str = "en") -> dict[str, Any]:
        """The `--json` form: {"target", "ok", "findings": [...], "checks": [...], ...}."""
        _check_lang(lang)
        return {
            "target": self.target,
            "ok": self.ok,
            "findings": [
                {
                    "id": f.id,
                    "message": f.message(lang),
                    "line": f.line,
                    "docs": f.docs,
                    "data": {k: _plain(v) for k, v in f.data.items()},
                }
                for f in self.findings
            ],
            "checks": [{"id": c.id, "status": c.status} for c in self.checks],
            "call": self.call,
            "mask_convention": self.mask_convention,
        }

    def to_json(self, lang: str = "en") -> str:
        return json.dumps(self.to_dict(lang), ensure_ascii=False, indent=2)

    def text(self, lang: str = "en") -> str:
        """The readable report: each check ✓/✗/–, then each finding with its numbers and fix."""
        _check_lang(lang)
        lines = [text("header", lang, target=self.target)]
        if self.call:
            lines.append(text("called", lang, call=call_words(self.call, lang)))
        if self.mask_convention:
            lines.append(text("convention_" + self.mask_convention, lang))
        lines.append("")
        marks = {"pass": "✓", "fail": "✗", "skip": "–"}
        for c in self.checks:
            why = text("skipped", lang, why=text(c.why, lang)) if c.status == "skip" else ""
            lines.append(f"  {marks[c.status]} {c.id}{why}")
        for f in self.findings:
            where = text("line", lang, line=f.line) if f.line else ""
            lines += ["", f"✗ {f.id}{where}", "  " + f.message(lang)]
            lines.append("  " + text("fix", lang) + finding_fix(f.id, lang))
            lines.append("  " + text("see", lang) + ", ".join(f.docs))
        lines.append("")
        if self.ok:
            lines.append(text("all_pass", lang))
        else:
            lines.append(text("summary", lang, n=len(self.findings), docs=DOCS))
        return "\n".join(lines)

    def to_wire(self) -> dict[str, Any]:
        """Language-free form passed from the worker process (see `from_wire`)."""
        return {
            "target": self.target,
            "findings": [{"id": f.id, "data": f.data, "line": f.line} for f in self.findings],
            "checks": [{"id": c.id, "status": c.status, "why": c.why} for c in self.checks],
            "call": self.call,
            "mask_convention": self.mask_convention,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> CheckReport:
        return cls(
            target=d["target"],
            findings=tuple(Finding(f["id"], f["data"], f["line"]) for f in d["findings"]),
            checks=tuple(Check(c["id"], c["status"], c["why"]) for c in d["checks"]),
            call=d.get("call", ""),
            mask_convention=d.get("mask_convention"),
        )


def _plain(value):
    """JSON has no inf or NaN: those numbers are written as the strings "inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}; got {lang!r}")
