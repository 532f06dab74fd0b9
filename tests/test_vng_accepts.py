"""Every vng line we render, checked by vng itself: its own argument parser, then, for a build line, its own
`vng --build --dry-run` path (virtme_ng.run.KernelSource's config and make steps), which rejects an architecture
it does not know and prints the make line it would run. Nothing is built or booted.
"""

from __future__ import annotations

import contextlib
import io
import shlex
from pathlib import Path

import pytest
from virtme_ng import run as vng_run

from vngtasks import arches, buildsteps, kernelmake
from vngtasks.arches import Arch
from vngtasks.settings import DEFAULTS, effective

GOLDEN = Path(__file__).parent / "golden"
X86_64 = arches.lookup("x86_64")
TOOLCHAINS = {"gcc": {}, "llvm": {"llvm": "1"}}


class Rejected(Exception):
    """vng refused a line: its message."""


def vng_parse(argv: list[str]):
    """vng's own parser on a line of ours (argv[0] is the program); Rejected with vng's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return vng_run.make_parser().parse_args(argv[1:])
    except SystemExit:
        raise Rejected(err.getvalue().strip().splitlines()[-1]) from None


def vng_build_dry_run(argv: list[str]) -> list[list[str]]:
    """What `vng --dry-run` does with a build line of ours (its configkernel and make commands, printed,
    not run); Rejected with vng's message where vng would refuse it."""
    args = vng_parse([*argv[:1], "--dry-run", *argv[1:]])
    assert args.build, f"not a build line: {shlex.join(argv)}"
    out, err = io.StringIO(), io.StringIO()
    source = vng_run.KernelSource()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            source.config(args)
            source.make(args)
    except SystemExit:
        raise Rejected(err.getvalue().strip().splitlines()[-1]) from None
    return [shlex.split(line) for line in out.getvalue().splitlines() if not line.startswith("cmd: ")]


def make_variables(argv: list[str]) -> dict[str, str]:
    """The variables make sees from a command line (a later NAME=value wins, as in make)."""
    return dict(arg.split("=", 1) for arg in argv[1:] if "=" in arg and not arg.startswith("-"))


def plan(arch: Arch, host: Arch, tmp_path: Path, **flags: str) -> buildsteps.Plan:
    settings = effective(DEFAULTS, {"arch": arch.name, "tag": "v6.12", **flags}, workspace=tmp_path)
    return buildsteps.Plan(settings, "a" * 40, "/w/linux", host, 16, "/w/tools")


@pytest.mark.parametrize("toolchain", TOOLCHAINS)
@pytest.mark.parametrize("arch", arches.ARCHES, ids=lambda a: a.name)
def test_vng_accepts_every_build_line_we_render(arch: Arch, toolchain: str, tmp_path: Path) -> None:
    """For each arch, from an x86_64 host (an arm64 one for x86_64's own cross line): vng takes our build line,
    and its make line carries the same ARCH, CROSS_COMPILE, LLVM and CC as our own make steps (.config)."""
    host = X86_64 if arch != X86_64 else arches.lookup("arm64")
    for build_host in {host, arch}:  # cross, and native
        p = plan(arch, build_host, tmp_path, **TOOLCHAINS[toolchain])
        ours = kernelmake.vng_argv(p, "vng")
        configkernel, make = vng_build_dry_run(ours)
        assert configkernel[0] == "virtme-configkernel" and make[0] == "make"
        theirs = make_variables(make)
        olddefconfig = kernelmake.config_steps(p, kernelmake.make_variables(ours))[-1]
        assert olddefconfig[-1] == "olddefconfig"
        mine = make_variables(olddefconfig[:-1])
        for name in ("ARCH", "CROSS_COMPILE", "LLVM", "CC", "LOCALVERSION"):
            assert theirs.get(name, "") == mine.get(name, ""), f"{name}: vng's make {shlex.join(make)}"
        if build_host != arch:
            assert theirs["ARCH"] == arch.kernel_arch
            assert theirs["CROSS_COMPILE"] == ("" if toolchain == "llvm" else arch.cross_compile)


@pytest.mark.parametrize("arch", arches.ARCHES, ids=lambda a: a.name)
def test_vng_accepts_the_golden_build_lines(arch: Arch) -> None:
    argv = (GOLDEN / f"build-{arch.name}.argv").read_text().splitlines()
    vng_build_dry_run(argv)


@pytest.mark.parametrize("name", sorted(p.name for p in GOLDEN.glob("boot-*.argv")))
def test_vngs_parser_takes_every_golden_boot_line(name: str) -> None:
    """Flags and their values only: a foreign arch's spelling and guest root on a boot line are checked
    when it boots (templates/vng-boot.argv.j2, vm.py)."""
    args = vng_parse((GOLDEN / name).read_text().splitlines())
    assert args.run and args.exec


@pytest.mark.parametrize("spelling", ["ppc64le", "x86_64", "aarch64"])
def test_a_build_line_vng_would_reject_fails(spelling: str) -> None:
    """The check itself: our spellings, not vng's, are refused as vng refuses them."""
    argv = (GOLDEN / "build-s390x.argv").read_text().splitlines()
    bad = [f"--arch={spelling}" if arg.startswith("--arch=") else arg for arg in argv]
    with pytest.raises(Rejected, match=f"unsupported architecture: {spelling}"):
        vng_build_dry_run(bad)
    with pytest.raises(Rejected, match="unrecognized arguments: --cross-arch=s390x"):
        vng_parse([*argv, "--cross-arch=s390x"])
