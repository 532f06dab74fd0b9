"""`invoke boot`: boot a kernel in a VM and run the workload inside."""

from __future__ import annotations

from invoke import Context
from invoke.exceptions import Exit

from ..errors import BAD_INPUT
from ..validate import make_directory
from . import _common


@_common.settings_task("boot", switches={"dry_run": _common.DRY_RUN})
def boot(c: Context, dry_run: bool = False, **flags: str | None):
    """Boot a kernel with virtme-ng and run the command after `--` inside it."""
    s = _common.settings(c, **flags, run=_common.remainder() or None)
    if not s.run:
        raise Exit("vngtasks: run: nothing to run: put the command after `--`", code=BAD_INPUT)
    from .. import cache, kernels, provide, resolve, vm  # here: `invoke resolve`, `invoke settings` start without them

    if dry_run:
        with _common.exit_statuses():
            if s.tag:
                kernel, commands = provide.planned(s, resolve.resolve_kernel(c, s, record=False))
            else:
                kernel, commands = (s.kernel or kernels.default_kernel(s.arch, s.cache_dir, unpack=False), [])
            print("\n".join([*commands, vm.dry_run_line(s, kernel)]))
        return
    with _common.stopped_by_signals(), _common.exit_statuses():
        make_directory("log_dir", s.log_dir)  # before any build: a log-dir that cannot be is bad input
        if s.tag:
            entry = provide.ensure_kernel(c, s, resolve.resolve_kernel(c, s))
            with cache.KernelCache(cache.kernels_root(s)).using(entry.key) as in_use:  # prune leaves it be
                status = vm.run(s, in_use.path, s.run)
        else:
            status = vm.run(s, s.kernel or kernels.default_kernel(s.arch, s.cache_dir), s.run)
    if status:
        raise Exit(code=status)
