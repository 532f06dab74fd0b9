"""`invoke deps`: install what booting and building kernels needs on this host."""

from __future__ import annotations

from invoke import Context

from .. import arches, log
from . import _common


@_common.settings_task("deps")
def deps(c: Context, **flags: str | None):
    """Install the kernel build toolchain, QEMU for the target arch and extra packages; no-op when present.
    For a foreign --arch, also its guest root and Debian's kernel of that arch, under cache-dir."""
    s = _common.settings(c, **flags)
    from ..deps import install  # here: other tasks start without it

    with _common.exit_statuses():
        installed = install(c, s, arches.host())
    log.info(f"deps: installed {' '.join(installed)}" if installed else "deps: everything is already installed")
    if s.arch != arches.host():
        from .. import guestroot
        from ..validate import make_directory

        with _common.exit_statuses():
            make_directory("cache_dir", s.cache_dir)
            root, kernel = guestroot.ensure_root_and_kernel(s.cache_dir, s.arch)
        log.info(f"deps: {s.arch.name} guest root {root}")
        print(f"kernel={kernel}")
