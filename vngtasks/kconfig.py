"""The .config of a kernel build: a base, the fragments on top, made afresh for every build.

Bases (the `kconfig-base` setting):
- `vng`: what `vng --build` makes, `virtme-configkernel --defconfig` (the arch's defconfig and
  what virtme-ng needs), without the user-wide `~/.config/virtme-ng/kernel.config` it would add;
- `tiny`: `make tinyconfig`, the kernel's own `kvm_guest.config`, then what virtme-ng needs to boot
  and share directories (templates/kconfig-tiny.config.j2 and the arch row's `tiny_kconfig`);
- a path: a full .config of the user's.

On top, in this order: BTF (with `vmlinux-h`), the `debug` options (sanitizers.py), then the user's `kconfig`
fragment, merged by the
kernel's `scripts/kconfig/merge_config.sh`; `make olddefconfig` settles the rest. A fragment line
that did not survive (an unmet dependency, a misspelt symbol) is named in a warning.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

from . import log, render, sanitizers
from .settings import Settings

# Debug info with BTF: what vmlinux.h is made from.
BTF_FRAGMENT = """\
CONFIG_BPF_SYSCALL=y
CONFIG_DEBUG_INFO=y
CONFIG_DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT=y
# CONFIG_DEBUG_INFO_NONE is not set
# CONFIG_DEBUG_INFO_REDUCED is not set
# CONFIG_DEBUG_INFO_SPLIT is not set
CONFIG_DEBUG_INFO_BTF=y
"""
# kconfig-base tiny before the fragments: the kernel's tinyconfig, then its kvm_guest.config.
TINY_TARGETS = ("tinyconfig", "kvm_guest.config")
BASE_FILE = "base.config"  # a .config of the user's, copied beside the fragments
# Fragments whose every line must survive, and the setting a warning names; tiny.config is ours.
CHECKED = {"btf.config": "vmlinux-h", "debug.config": "debug", "kconfig.config": "kconfig"}
_SET = re.compile(r"(CONFIG_[A-Za-z0-9_]+)=(.*)")
_UNSET = re.compile(r"# (CONFIG_[A-Za-z0-9_]+) is not set")


def key_tag(base: str | Path, debug: tuple[str, ...] = ()) -> str:
    """The config's part of a kernel cache key: the base's (none for vng's, `tiny`, or the hash of a .config
    file), then the debug options' (`debug-kasan-lkdtm`), `+`-joined."""
    if base == "vng":
        tag = ""
    elif base == "tiny":
        tag = "tiny"
    else:
        tag = "config-" + hashlib.sha256(Path(base).read_bytes()).hexdigest()[:12]
    return "+".join(part for part in (tag, sanitizers.key_tag(debug)) if part)


def fragments(settings: Settings) -> list[tuple[str, str]]:
    """(file name, text) of each fragment merged on top of the base, in merge order."""
    found = [("tiny.config", render.text("kconfig-tiny.config.j2", arch=settings.arch))]
    found = found if settings.kconfig_base == "tiny" else []
    if settings.vmlinux_h:
        found.append(("btf.config", BTF_FRAGMENT))
    if settings.debug:
        found.append(("debug.config", sanitizers.fragment(settings.debug)))
    if settings.kconfig:
        found.append(("kconfig.config", settings.kconfig.read_text()))
    return found


def assignments(fragment: str) -> dict[str, str]:
    """`CONFIG_X=v` and `# CONFIG_X is not set` lines of a fragment, as {symbol: value or "n"}."""
    wanted: dict[str, str] = {}
    for line in fragment.splitlines():
        line = line.strip()
        if found := _SET.fullmatch(line):
            wanted[found[1]] = found[2]
        elif found := _UNSET.fullmatch(line):
            wanted[found[1]] = "n"
    return wanted


def dropped(wanted: Mapping[str, str], config: str) -> list[str]:
    """The wanted assignments that the final .config does not have, as fragment lines."""
    have = assignments(config)
    lost = []
    for symbol, value in wanted.items():
        now = have.get(symbol, "n")
        if now != value:
            lost.append(f"# {symbol} is not set" if value == "n" else f"{symbol}={value}")
    return lost


def warn_dropped(label: str, fragment: str, config: str) -> None:
    for line in dropped(assignments(fragment), config):
        log.warn(f"{label}: '{line}' did not survive in the final .config (unmet dependency or unknown symbol?)")
