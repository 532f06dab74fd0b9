"""`invoke build`: the kernel of --tag, from the cache or built once with vng."""

from __future__ import annotations

from invoke import Context
from invoke.exceptions import Exit

from ..errors import BAD_INPUT
from . import _common


@_common.settings_task("build", switches={"dry_run": _common.DRY_RUN})
def build(c: Context, dry_run: bool = False, **flags: str | None):
    """Build --tag of --kernel-url with vng, unless the cache has it; prints the kernel directory."""
    s = _common.settings(c, **flags)
    if not s.tag:
        raise Exit("vngtasks: tag: required: a tag, branch or 40-hex commit", code=BAD_INPUT)
    from ..provide import ensure_kernel, planned  # here: tasks that build nothing start without them
    from ..resolve import resolve_kernel

    with _common.stopped_by_signals(), _common.exit_statuses():
        if dry_run:
            _, commands = planned(s, resolve_kernel(c, s, record=False))
            print("\n".join(commands))
            return
        entry = ensure_kernel(c, s, resolve_kernel(c, s))
    print(entry.path)
