"""Jinja rendering of every command line and guest script.

`*.argv.j2` templates write one argument per line and render to a list: no shell
ever re-splits them. Any substituted value holding a line break is refused, so a
value can never turn into a second argument or a second script line.
"""

from __future__ import annotations

import functools
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jinja2

_HERE = Path(__file__).resolve().parent
# Installed: templates ship inside the package. Checkout: the top-level templates/.
_SEARCH_PATH = [str(_HERE / "templates"), str(_HERE.parent / "templates")]


def _finalize(value: object) -> object:
    if isinstance(value, str) and ("\n" in value or "\r" in value):
        raise ValueError(f"refusing to render a value with a line break: {value!r}")
    return value


@functools.cache
def environment() -> jinja2.Environment:
    import jinja2  # here, not at the top: tasks that render nothing (resolve, cache) start faster

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([p for p in _SEARCH_PATH if Path(p).is_dir()]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        finalize=_finalize,
    )
    env.filters["sh"] = lambda value: shlex.quote(str(value))
    env.filters["shjoin"] = lambda values: shlex.join(str(v) for v in values)
    return env


def text(template: str, **context: object) -> str:
    return environment().get_template(template).render(**context)


def argv(template: str, **context: object) -> list[str]:
    """Render an argv template: one argument per non-blank line, surrounding spaces dropped."""
    return [line.strip() for line in text(template, **context).splitlines() if line.strip()]
