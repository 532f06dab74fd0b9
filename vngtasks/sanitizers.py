"""The `debug` setting's table: sanitizer and debug kernels on request, one row per option.

Each row is a kconfig fragment merged after BTF and before the user's `kconfig` (kconfig.fragments), the arches
Linux 6.12 offers it on, and what it costs as the kernel's documentation tells (not measured here). The
chosen options are part of the cache key (`+debug-kasan-lkdtm`, in this table's order) and of the metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_ARCHES = ("x86_64", "arm64", "riscv64", "s390x", "ppc64le")
# What every option needs: the kernel's debug menu, and stack traces in its reports.
COMMON = "CONFIG_DEBUG_KERNEL=y\nCONFIG_STACKTRACE=y\nCONFIG_DEBUG_FS=y\n"


@dataclass(frozen=True)
class Option:
    name: str
    fragment: str
    arches: tuple[str, ...]
    cost: str
    excludes: tuple[str, ...] = ()


OPTIONS: tuple[Option, ...] = (
    Option(
        "kasan",
        "CONFIG_KASAN=y\nCONFIG_KASAN_GENERIC=y\n# CONFIG_SLUB_TINY is not set\n",
        ALL_ARCHES,  # ppc64le: with the radix MMU, its default
        "generic KASAN: memory use about 1/8 more for shadow, the kernel's code several times slower",
        excludes=("kcsan",),
    ),
    Option(
        "ubsan",
        "CONFIG_UBSAN=y\nCONFIG_UBSAN_BOUNDS=y\nCONFIG_UBSAN_SHIFT=y\n",
        ALL_ARCHES,
        "checks inline at each array access and shift: a larger, somewhat slower kernel",
    ),
    Option(
        "kcsan",
        "CONFIG_EXPERT=y\nCONFIG_KCSAN=y\n",  # arm64 offers KCSAN under EXPERT
        ("x86_64", "arm64", "s390x", "ppc64le"),
        "watchpoints sampled on memory accesses: a much slower kernel; needs more than one CPU",
        excludes=("kasan",),
    ),
    Option(
        "lockdep",
        "CONFIG_PROVE_LOCKING=y\nCONFIG_DEBUG_ATOMIC_SLEEP=y\n",
        ALL_ARCHES,
        "every lock taken is validated: a slower kernel with lock-heavy workloads",
    ),
    Option(
        "kmemleak",
        "CONFIG_DEBUG_KMEMLEAK=y\n# CONFIG_DEBUG_KMEMLEAK_DEFAULT_OFF is not set\n",
        ALL_ARCHES,
        "every allocation tracked, a scan of memory: more memory, slower allocations",
    ),
    Option(
        "lkdtm",
        "CONFIG_RUNTIME_TESTING_MENU=y\nCONFIG_LKDTM=y\n",  # LKDTM is in the runtime testing menu
        ALL_ARCHES,
        "none until used: /sys/kernel/debug/provoke-crash/DIRECT crashes the kernel on request",
    ),
)
BY_NAME = {option.name: option for option in OPTIONS}


def fragment(names: tuple[str, ...]) -> str:
    """The debug.config fragment of the chosen options."""
    return COMMON + "".join(BY_NAME[name].fragment for name in names) if names else ""


def key_tag(names: tuple[str, ...]) -> str:
    return "debug-" + "-".join(names) if names else ""
