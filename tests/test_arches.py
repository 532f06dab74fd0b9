from __future__ import annotations

import dataclasses
import platform

import pytest

from vngtasks import arches


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("x86_64", "x86_64"),
        ("amd64", "x86_64"),
        ("X64", "x86_64"),  # GitHub's runner.arch
        ("aarch64", "arm64"),
        ("ARM64", "arm64"),
        ("riscv", "riscv64"),
        ("s390", "s390x"),
        ("ppc64el", "ppc64le"),
        ("powerpc64le", "ppc64le"),
    ],
)
def test_lookup_accepts_every_spelling(spelling: str, name: str) -> None:
    assert arches.lookup(spelling).name == name


def test_lookup_refuses_unknown() -> None:
    with pytest.raises(KeyError):
        arches.lookup("sparc")


def test_no_spelling_names_two_arches() -> None:
    seen: dict[str, str] = {}
    for arch in arches.ARCHES:
        for spelling in {arch.name, arch.uname_m, arch.dpkg_arch, *arch.aliases}:
            assert seen.setdefault(spelling.lower(), arch.name) == arch.name, spelling


def test_host_is_this_machine() -> None:
    assert arches.host().uname_m == platform.machine()


@pytest.mark.parametrize("arch", arches.ARCHES, ids=lambda a: a.name)
def test_every_row_is_complete(arch: arches.Arch) -> None:
    # No tiny kernel for that arch yet; nothing to add under TCG; not in Debian 12 (riscv64).
    optional = ("tiny_kconfig", "tcg_append", "debian_kernel", "debian_userland", "vmcoreinfo")
    required = [f.name for f in dataclasses.fields(arch) if not f.name.startswith("probe") and f.name not in optional]
    assert all(getattr(arch, name) for name in required)
    assert arch.cross_compile.endswith("-")
    assert arch.qemu_binary.startswith("qemu-system-")
    assert bool(arch.debian_kernel) == arch.debian_userland  # Debian 12 has both for an arch, or neither


@pytest.mark.parametrize("arch", [a for a in arches.ARCHES if a.probe_code], ids=lambda a: a.name)
def test_probe_code_fits_its_firmware(arch: arches.Arch) -> None:
    assert arch.probe_offset + len(bytes.fromhex(arch.probe_code)) <= arch.probe_size
