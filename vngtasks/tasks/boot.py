"""`invoke boot`: boot a kernel in a VM and run the workload inside."""

from __future__ import annotations

from invoke import Context
from invoke.exceptions import Exit

from .. import build, kernels, resolve, vm
from ..errors import BAD_INPUT
from . import _common


@_common.settings_task
def boot(
    c: Context,
    kernel=None, tag=None, kernel_url=None, name=None, version=None, kconfig=None, cc=None, llvm=None,
    arch=None, accel=None, cpus=None, memory=None, network=None, verbose=None,
    append=None, qemu_opts=None, run_timeout=None, boot_timeout=None,
    workspace_rw=None, extra_rwdirs=None, cache_dir=None,
    log_dir=None, splat_check=None, splat_allow=None, build_host=None, build_host_accept_new=None,
):  # fmt: skip
    """Boot a kernel with virtme-ng and run the command after `--` inside it."""
    s = _common.settings(
        c, kernel=kernel, tag=tag, kernel_url=kernel_url, name=name, version=version,
        kconfig=kconfig, cc=cc, llvm=llvm, arch=arch, accel=accel, cpus=cpus, memory=memory,
        network=network, verbose=verbose, append=append, qemu_opts=qemu_opts,
        run_timeout=run_timeout, boot_timeout=boot_timeout, workspace_rw=workspace_rw,
        extra_rwdirs=extra_rwdirs, cache_dir=cache_dir, run=_common.remainder() or None,
        log_dir=log_dir, splat_check=splat_check, splat_allow=splat_allow,
        build_host=build_host, build_host_accept_new=build_host_accept_new,
    )  # fmt: skip
    if not s.run:
        raise Exit("vngtasks: run: nothing to run: put the command after `--`", code=BAD_INPUT)
    with _common.exit_statuses():
        if s.tag:
            image = build.ensure_kernel(c, s, resolve.resolve_kernel(c, s)).path
        else:
            image = s.kernel or kernels.host_kernel()
        status = vm.run(s, image, s.run)
    if status:
        raise Exit(code=status)
