"""Finding a prebuilt kernel to boot when the user named none: the host's distro kernel, or a foreign arch's."""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import arches, guestroot
from .errors import BAD_INPUT, Failure


def _version_key(image: Path) -> list[tuple[int, int | str]]:
    # "vmlinuz-6.1.0-28-amd64" sorts by numbers as numbers: 6.1.0-28 > 6.1.0-9.
    parts = re.split(r"(\d+)", image.name.removeprefix("vmlinuz-"))
    return [(1, int(p)) if p.isdigit() else (0, p) for p in parts if p]


def host_kernel(boot: Path = Path("/boot"), release: str | None = None) -> Path:
    """The running kernel's image if /boot has it, else the newest /boot/vmlinuz-*."""
    release = release or os.uname().release
    running = boot / f"vmlinuz-{release}"
    if running.is_file():
        return running
    images = sorted(boot.glob("vmlinuz-*"), key=_version_key)
    if images:
        return images[-1]
    raise Failure(
        f"kernel: no --kernel or --tag given and {boot} has no vmlinuz-*: "
        "install a distro kernel (`invoke deps` does) or pass --kernel PATH",
        BAD_INPUT,
    )


def default_kernel(arch: arches.Arch, cache_dir: Path, *, unpack: bool = True) -> Path:
    """What a boot with neither --kernel nor --tag boots: for the host's arch, the host's distro kernel; for
    another, Debian's kernel of that arch as `invoke deps --arch` unpacked it, else unpacked now (not when
    `unpack` is False, as in a dry run, which writes nothing)."""
    if arch == arches.host():
        return host_kernel()
    if why := guestroot.refused(arch):
        raise Failure(why, BAD_INPUT)
    if kernel := guestroot.unpacked_kernel(cache_dir, arch):
        return kernel
    if not unpack:
        raise Failure(
            f"kernel: no --kernel or --tag given and no {arch.name} kernel unpacked yet: "
            f"`invoke deps --arch {arch.name}` unpacks Debian's",
            BAD_INPUT,
        )
    return guestroot.ensure_kernel(cache_dir, arch)
