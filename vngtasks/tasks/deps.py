"""`invoke deps`: install what booting and building kernels needs on this host."""

from __future__ import annotations

from invoke import Context

from .. import arches, log
from .. import deps as host_deps
from . import _common


@_common.settings_task
def deps(
    c: Context,
    packages=None, install_recommends=None, deps_timeout=None, deps_retries=None,
    arch=None, cc=None, llvm=None, apt_cache=None, cache_dir=None,
):  # fmt: skip
    """Install the kernel build toolchain, QEMU for the target arch and extra packages; no-op when present."""
    s = _common.settings(
        c, packages=packages, install_recommends=install_recommends, deps_timeout=deps_timeout,
        deps_retries=deps_retries, arch=arch, cc=cc, llvm=llvm, apt_cache=apt_cache, cache_dir=cache_dir,
    )  # fmt: skip
    with _common.exit_statuses():
        installed = host_deps.install(c, s, arches.host())
    log.info(f"deps: installed {' '.join(installed)}" if installed else "deps: everything is already installed")
