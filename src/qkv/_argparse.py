"""argparse with the command line's conventions: usage errors exit 2 with one line."""

from __future__ import annotations

import argparse

__all__ = ["USAGE_ERROR", "OneLineParser"]

USAGE_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints the whole usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
