"""One-line messages to stderr; GitHub Actions annotations when running there; text others sent, made printable."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

_LABEL: ContextVar[str] = ContextVar("vngtasks_log_label", default="")  # see labeled()


def in_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def show_and_summarize(text: str) -> None:
    """A task's result (a markdown table, lines) on stdout, and in the job summary when GitHub gives one."""
    print(text, end="", flush=True)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as out:
            out.write("\n" + text)


@contextlib.contextmanager
def labeled(label: str) -> Iterator[None]:
    """Every line this thread writes in the block begins with `[label] `: the messages, and what the VM it boots
    relays (supervise.py), of one of a matrix's boots at once."""
    token = _LABEL.set(f"[{label}] ")
    try:
        yield
    finally:
        _LABEL.reset(token)


def label() -> str:
    """What this thread's lines begin with: `[label] ` in a `labeled` block, else nothing."""
    return _LABEL.get()


def info(message: str) -> None:
    _line(f"vngtasks: {message}")


def warn(message: str) -> None:
    if in_actions():
        _line(f"::warning::{command_data(label() + message)}", labeled=False)  # the command begins the line
    else:
        _line(f"vngtasks: warning: {message}")


def lines(texts: Iterable[str]) -> None:
    """Lines of text others sent (a console's end, a splat) on stderr, each labeled as messages are."""
    for text in texts:
        _line(text)


def _line(text: str, labeled: bool = True) -> None:
    """One line to stderr, in one write: lines that threads write at once do not mix."""
    sys.stderr.write(f"{label() if labeled else ''}{text}\n")
    sys.stderr.flush()


def annotate(command: str, title: str, message: str, file: str = "", line: int | None = None) -> None:
    """A GitHub Actions annotation (`error`, `warning`, `notice`) on stdout, where the runner reads them; at a
    file's line of the repository when given."""
    at = f"file={command_property(file)},line={line}," if file and line else ""
    print(f"::{command} {at}title={command_property(title)}::{command_data(message)}", flush=True)


def command_data(text: str) -> str:
    """Text as a workflow command's message (GitHub's escaping), printable."""
    return printable(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def command_property(text: str) -> str:
    """Text as a workflow command's property value (`title=`)."""
    return command_data(text).replace(":", "%3A").replace(",", "%2C")


def printable(text: str) -> str:
    """Text a guest, a build host, a remote or a record on disk sent, for a terminal or a summary: control
    characters (but tabs), which could move a terminal's cursor or rewrite what it shows, become '?'; trailing
    blanks and carriage returns go."""
    return "".join("?" if (ord(ch) < 0x20 and ch != "\t") or 0x7F <= ord(ch) < 0xA0 else ch for ch in text.rstrip())


def table_cell(text: str) -> str:
    """Text for a markdown table cell or `code` span of the step summary: printable, no `|` or backtick of its own."""
    return printable(text).replace("|", "\\|").replace("`", "'")
