"""`invoke build`: the kernel of --tag, from the cache or built once with vng."""

from __future__ import annotations

from invoke import Context
from invoke.exceptions import Exit

from .. import build as kernel_build
from .. import resolve as kernel_refs
from ..errors import BAD_INPUT
from . import _common


@_common.settings_task
def build(
    c: Context,
    tag=None, kernel_url=None, name=None, version=None, kconfig=None, arch=None, cc=None, llvm=None,
    kernel_compile_cache=None, vmlinux_h=None, cache_dir=None, build_host=None, build_host_accept_new=None,
):  # fmt: skip
    """Build --tag of --kernel-url with vng, unless the cache has it; prints the kernel directory."""
    s = _common.settings(
        c, tag=tag, kernel_url=kernel_url, name=name, version=version, kconfig=kconfig, arch=arch, cc=cc,
        llvm=llvm, kernel_compile_cache=kernel_compile_cache, vmlinux_h=vmlinux_h, cache_dir=cache_dir,
        build_host=build_host, build_host_accept_new=build_host_accept_new,
    )  # fmt: skip
    if not s.tag:
        raise Exit("vngtasks: tag: required: a tag, branch or 40-hex commit", code=BAD_INPUT)
    with _common.exit_statuses():
        entry = kernel_build.ensure_kernel(c, s, kernel_refs.resolve_kernel(c, s))
    print(entry.path)
