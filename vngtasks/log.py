"""One-line messages to stderr; GitHub Actions annotations when running there."""

from __future__ import annotations

import os
import sys


def _in_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def info(message: str) -> None:
    print(f"vngtasks: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    if _in_actions():
        print(f"::warning::{message}", file=sys.stderr, flush=True)
    else:
        print(f"vngtasks: warning: {message}", file=sys.stderr, flush=True)
