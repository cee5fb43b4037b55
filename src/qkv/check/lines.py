"""Where in the learner's file a finding can be traced: the first line of code (comments
and docstrings blanked) matching the mistake's pattern, inside the target's own definition
first, then anywhere in the file."""

from __future__ import annotations

import ast
import inspect
import re

__all__ = ["LINES", "SourceLines", "code_lines"]

LINES = {  # the mistake -> the line of code that usually holds it
    "shape": r"^\s*return\b",
    "no-scaling": r"matmul|bmm|einsum|@|\.dot\(|np\.dot",
    "scale-after-softmax": r"(?i)softmax.*(sqrt|scale|norm|\*|/)|(sqrt|scale|/).*softmax",
    "softmax-axis": r"softmax\(.*(dim|axis)\s*=|(sum|max)\(.*axis\s*=\s*(0|1|-2)",
    "unstable-softmax": r"\bexp\(",
    "global-max-softmax": r"\bmax\(|amax\(",
    "masked-row-uniform": r"1e9|1e\+9|masked_fill|np\.where\(.*mask|-inf",
    "heads-split-on-sequence": r"\.view\(|\.reshape\(|rearrange\(|np\.reshape\(",
    "dropout-in-eval": r"dropout\(",
    "future-leak": (r"triu|tril", r"causal"),
}


def code_lines(lines: list[str]) -> list[str]:
    """The file's lines with comments and docstrings blanked (they are not the mistake)."""
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return lines
    out = [line.split("#")[0] for line in lines]
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            for i in range(node.lineno - 1, node.end_lineno or node.lineno):
                out[i] = ""
    return out


class SourceLines:
    """The learner's file as code lines, with the span of the target's definition."""

    def __init__(self, lines: list[str], source_obj):
        self.lines = code_lines(lines)
        try:
            src, start = inspect.getsourcelines(source_obj)
            self.span = (start, start + len(src))
        except (OSError, TypeError):
            self.span = (1, len(self.lines) + 1)

    def find(self, regex: str | tuple[str, ...] | None) -> int | None:
        """1-based number of the first matching line (def/class lines never), or None;
        a tuple of patterns is tried in order."""
        if not regex or not self.lines:
            return None
        lo, hi = self.span
        order = list(range(lo - 1, min(hi, len(self.lines)))) + list(range(len(self.lines)))
        for pattern in (regex,) if isinstance(regex, str) else regex:
            for i in order:
                code = self.lines[i]
                if re.search(pattern, code) and not code.lstrip().startswith(("def ", "class ")):
                    return i + 1
        return None
