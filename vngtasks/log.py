"""One-line messages to stderr; GitHub Actions annotations when running there; text others sent, made printable."""

from __future__ import annotations

import os
import sys


def in_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def info(message: str) -> None:
    print(f"vngtasks: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    if in_actions():
        print(f"::warning::{message}", file=sys.stderr, flush=True)
    else:
        print(f"vngtasks: warning: {message}", file=sys.stderr, flush=True)


def printable(text: str) -> str:
    """Text a guest, a build host, a remote or a record on disk sent, for a terminal or a summary: control
    characters (but tabs), which could move a terminal's cursor or rewrite what it shows, become '?'; trailing
    blanks and carriage returns go."""
    return "".join("?" if (ord(ch) < 0x20 and ch != "\t") or 0x7F <= ord(ch) < 0xA0 else ch for ch in text.rstrip())
