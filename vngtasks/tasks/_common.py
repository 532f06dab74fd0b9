"""What every task does first: settings in, errors out as exit statuses."""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence

from invoke import Context, Task, task
from invoke.exceptions import Exit

from ..errors import BAD_INPUT, Failure
from ..settings import HELP, InputError, Settings, resolve


def settings_task(body: Callable[..., object]) -> Task:
    """An invoke task whose flags are settings: help text from the one table, no short flags."""
    params = inspect.signature(body).parameters
    return task(auto_shortflags=False, help={name: HELP[name] for name in params if name in HELP})(body)


def settings(c: Context, **flags: object) -> Settings:
    """Settings from invoke's layered config (`vng.*`) with this task's flags on top."""
    try:
        return resolve(c.config.vng, flags)
    except InputError as error:
        raise Exit(f"vngtasks: {error}", code=BAD_INPUT) from None


def remainder(argv: Sequence[str] = sys.argv) -> str:
    """The text after the first `--`, joined by spaces as invoke itself does."""
    args = list(argv[1:])
    return " ".join(args[args.index("--") + 1 :]) if "--" in args else ""


@contextlib.contextmanager
def exit_statuses() -> Iterator[None]:
    try:
        yield
    except Failure as failure:
        raise Exit(f"vngtasks: {failure}", code=failure.code) from None
