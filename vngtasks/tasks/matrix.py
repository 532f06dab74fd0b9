"""`invoke matrix`: every cell of --tag x --arch x --kconfig-base built and booted, one table."""

from __future__ import annotations

from invoke import Context
from invoke.exceptions import Exit

from ..errors import BAD_INPUT
from . import _common

LISTS = ("tag", "arch", "kconfig_base")  # comma-separated here; one value each elsewhere


@_common.settings_task("matrix")
def matrix(c: Context, **flags: str | None):
    """Build and boot each cell of --tag x --arch x --kconfig-base (comma-separated lists) and run the command after
    `--` in each; print one table; exit 0 only when every cell passes. A re-run resumes: finished cells are kept."""
    given = {name: flags.pop(name) for name in LISTS}
    run = _common.remainder() or None
    from .. import matrix as matrices  # here: other tasks start without it
    from ..validate import make_directory

    with _common.stopped_by_signals(), _common.exit_statuses():
        lists = {name: matrices.split(name, value) if value is not None else [None] for name, value in given.items()}
        settings = [
            _common.settings(c, **flags, run=run, **cell.given())
            for cell in matrices.cells(*lists.values())  # type: ignore[arg-type]
        ]
        if not settings[0].run:
            raise Exit("vngtasks: run: nothing to run: put the command after `--`", code=BAD_INPUT)
        if not all(s.tag for s in settings):
            raise Exit("vngtasks: tag: required: tags, branches or 40-hex commits, comma-separated", code=BAD_INPUT)
        make_directory("log_dir", settings[0].log_dir)
        status = matrices.matrix(c, settings)
    if status:
        raise Exit(code=status)
