"""Finding a prebuilt kernel to boot when the user named none."""

from __future__ import annotations

import os
import re
from pathlib import Path

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
