"""`invoke deps`: install what booting and building kernels needs on this host."""

from __future__ import annotations

from invoke import Context

from .. import arches, log
from . import _common


@_common.settings_task("deps")
def deps(c: Context, **flags: str | None):
    """Install the kernel build toolchain, QEMU for the target arch and extra packages; no-op when present."""
    s = _common.settings(c, **flags)
    from ..deps import install  # here: other tasks start without it

    with _common.exit_statuses():
        installed = install(c, s, arches.host())
    log.info(f"deps: installed {' '.join(installed)}" if installed else "deps: everything is already installed")
