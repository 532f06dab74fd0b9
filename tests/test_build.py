"""Real kernels from git: Debian's linux-source-6.12 as a remote with tag v6.12, built with vng.

Every build here is a tiny kernel (conftest.tiny_build, and arm64's) through the tests' ccache; vng's own
kconfig base, the users' default, is configured here by the build's own steps and built by the bench:
its cold build alone would take a quarter of what CI may take on a fresh machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    CCACHE_ENV,
    FAKE_WARNING,
    HOST_PACKAGES,
    TINY_TREE,
    WARN_WORKLOAD,
    TinyBuild,
    assert_at_its_line_of_lkdtm,
)
from invoke import Context
from linux_remote import KCONFIG, TAG

from vngtasks import arches, build, buildsteps, cache, errors, kernelmake, sanitizers, settings

pytestmark = pytest.mark.slow


@TINY_TREE
def test_a_tiny_build_is_stored_once_then_booted_from_the_cache(cli, workspace: Path, tiny_build: TinyBuild, remote):
    url, sha = remote
    key = f"vng-kernel-ci-x86_64-{sha[:12]}-v2+tiny"
    assert f"cache: miss {key}: building" in tiny_build.done.stderr
    assert "kconfig: base tiny + tiny.config + btf.config + kconfig.config" in tiny_build.done.stderr
    assert "did not survive" not in tiny_build.done.stderr  # every line of BTF's and the tests' fragment
    entry = tiny_build.entry
    assert entry.name == key
    metadata = json.loads((entry / "metadata.json").read_text())
    assert metadata["sha"] == sha and metadata["tag"] == TAG and metadata["url"] == url
    assert metadata["kconfig_base"] == "tiny" and f"__ci__{sha[:12]}" in metadata["kernel_release"]
    config = (entry / ".config").read_text().splitlines()
    assert {"CONFIG_DEBUG_INFO_BTF=y", "CONFIG_IKCONFIG_PROC=y", "CONFIG_9P_FS=y", "CONFIG_SMP=y"} <= set(config)
    assert "# CONFIG_MODULES is not set" in config
    assert (entry / "vmlinux.h").stat().st_size > 1_000_000
    assert "struct task_struct {" in (entry / "vmlinux.h").read_text()
    assert not [p for p in entry.rglob("*") if p.is_symlink() and not p.resolve().is_relative_to(entry)]

    tree = entry.parent.parent / "work" / "ci-x86_64" / "linux"
    marks = {p: p.stat().st_mtime_ns for p in (tree / ".git" / "FETCH_HEAD", tree / "vmlinux")}
    (workspace / "ci").mkdir()
    (workspace / "ci" / "kernel.config").write_text(KCONFIG.read_text())
    workload = "uname -r; test -e /proc/config.gz && echo config.gz-present; nproc"
    again = cli("boot", *tiny_build.args, "--cpus", "2", "--verbose", "false", "--", workload, env=CCACHE_ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"cache: hit {key}" in again.stderr
    assert f"__ci__{sha[:12]}" in again.stdout and "config.gz-present" in again.stdout
    assert again.stdout.splitlines()[-1] == "2", again.stdout  # SMP: both CPUs came up
    # No clone and no make: neither the fetch head nor the linked kernel of the work tree moved.
    assert {p: p.stat().st_mtime_ns for p in marks} == marks


def configured(s: settings.Settings, sha: str) -> set[str]:
    """The lines of the .config that the build's own steps before make give `s` at `sha`: the commit fetched into
    the plan's work tree, the compiler wrappers written, the base and fragments merged."""
    c, machine = Context(), build.this_machine()
    plan = build.local_plan(s, sha, machine)
    build.here(c, s, machine).bring_source(plan)
    buildsteps.write_tools(c, plan)
    variables = kernelmake.make_variables(kernelmake.vng_argv(plan, machine.vng))
    kernelmake.configure(c, plan, variables, buildsteps.make_env(plan, machine))
    return set((Path(plan.tree) / ".config").read_text().splitlines())


# A user's fragment on vng's base: the tests' own, and two of vng's defaults turned off.
VNG_FRAGMENT = KCONFIG.read_text() + "# CONFIG_DRM is not set\n# CONFIG_SOUND is not set\n"


def test_vngs_own_kconfig_base_is_made_by_the_steps_every_build_runs(tmp_path: Path, workspace: Path, remote):
    """The users' default kconfig base (vng's defconfig-based config), made in a v6.12 work tree by what every
    build runs before make: the commit fetched, `virtme-configkernel --defconfig`, the fragments merged,
    olddefconfig. Its compile and boot are the bench's (`nox -s bench -- --build`): cold, that build takes
    20 min on 2 cores, which CI on a fresh machine cannot pay beside the rest; the tiny builds here run the
    same vng build line."""
    url, sha = remote
    (workspace / "ci").mkdir()
    (workspace / "ci" / "kernel.config").write_text(VNG_FRAGMENT)
    flags = {"tag": TAG, "kernel_url": url, "name": "vng", "kconfig": "ci/kernel.config", "vmlinux_h": "false"}
    s = settings.effective({}, {**flags, "cache_dir": str(tmp_path / "cache")}, workspace=workspace)
    assert cache.key_for(s, sha[:12]) == f"vng-kernel-vng-x86_64-{sha[:12]}-v2"  # the seed's key: no base suffix
    config = configured(s, sha)
    # virtme-ng's own additions to the defconfig, and every line of the fragment on top.
    assert {"CONFIG_VIRTIO_FS=y", "CONFIG_OVERLAY_FS=y", "CONFIG_9P_FS=y", "CONFIG_VIRTIO_CONSOLE=y"} <= config
    assert {line for line in VNG_FRAGMENT.splitlines() if line.startswith(("CONFIG_", "# CONFIG_"))} <= config
    assert "CONFIG_DEBUG_INFO_BTF=y" not in config  # vmlinux-h false: no BTF fragment


@TINY_TREE
def test_every_debug_option_survives_in_a_tiny_config(workspace: Path, tiny_build: TinyBuild, remote, capfd):
    """`debug` with every option that can go together on x86_64 (KCSAN excludes KASAN: it has its own line),
    configured on tiny by the build's own steps in the session's tree: no line of the debug fragment is
    dropped (an unmet dependency would be, with a warning). Their compile and boots are not paid here (see
    README, Crash reports)."""
    url, sha = remote
    for debug in ("kasan,ubsan,lockdep,kmemleak,lkdtm", "kcsan"):
        flags = {"tag": TAG, "kernel_url": url, "name": "ci", "kconfig_base": "tiny", "debug": debug,
                 "cache_dir": str(tiny_build.entry.parent.parent)}  # fmt: skip
        s = settings.effective({}, flags, workspace=workspace)
        config = configured(s, sha)
        wanted = {line for line in sanitizers.fragment(s.debug).splitlines() if line}
        assert wanted <= config, sorted(wanted - config)
        assert "did not survive" not in capfd.readouterr().err


@HOST_PACKAGES  # invoke deps --arch arm64
def test_an_arm64_tiny_kernel_is_cross_built_with_its_vmlinux_h_and_boots(
    cli, workspace: Path, remote, kernel_tree, arm64_build: TinyBuild
):
    """v6.12 cross-built for arm64 on this x86_64 machine, kconfig-base tiny, through the tests' ccache: the
    entry holds arm64's boot image, vmlinux.h made by the host's bpftool from the arm64 vmlinux's BTF, and the
    release that `uname -r` prints when `invoke boot --arch arm64 --tag` boots it in arm64's guest root."""
    _, sha = remote
    arm64 = arches.lookup("arm64")
    (workspace / "ci").mkdir()
    (workspace / "ci" / "kernel.config").write_text(KCONFIG.read_text())
    flags, done = arm64_build.args, arm64_build.done
    assert "did not survive" not in done.stderr  # every line of BTF's and the tests' fragment
    entry = Path(done.stdout.strip().splitlines()[-1])
    assert entry.name == f"vng-kernel-ci-arm64-{sha[:12]}-v2+tiny"
    image = (entry / arm64.boot_images[0]).read_bytes()
    assert len(image) > 1_000_000 and image[56:60] == b"ARM\x64"  # the arm64 Image header's magic
    metadata = json.loads((entry / "metadata.json").read_text())
    assert metadata["arch"] == "arm64" and metadata["kconfig_base"] == "tiny" and metadata["vmlinux_h"] is True
    assert metadata["toolchain"].startswith(arm64.cross_compile + "gcc")
    release = (entry / "include" / "config" / "kernel.release").read_text().strip()
    assert release == metadata["kernel_release"] and f"__ci__{sha[:12]}" in release
    config = set((entry / ".config").read_text().splitlines())
    assert {"CONFIG_ARM64=y", "CONFIG_SERIAL_AMBA_PL011_CONSOLE=y", "CONFIG_VIRTIO_MMIO=y"} <= config
    assert {"CONFIG_DEBUG_INFO_BTF=y", "CONFIG_IKCONFIG_PROC=y", "CONFIG_9P_FS=y"} <= config
    header = (entry / "vmlinux.h").read_text()
    assert len(header) > 500_000 and "struct task_struct {" in header  # 0.97 MB for this config
    assert "struct user_pt_regs {" in header  # arm64's registers: the target's BTF, not the host's

    # The health checks judge this guest as a host one: LKDTM's WARNING (a busybox userland) fails the run, the
    # line a program writes to /dev/kmsg does not (busybox's `dmesg -r` tells them apart too); the workload's
    # stdout and stderr come back apart (arm64's guest root's udev stand-ins name the ports) and its write to
    # the workspace is seen here.
    workload = f"uname -m; uname -r; echo ok > out.txt; echo to-stderr >&2; echo '{FAKE_WARNING}' > /dev/kmsg; "
    booted = cli("boot", *flags, "--verbose", "false", "--", workload + WARN_WORKLOAD, env=CCACHE_ENV, timeout=900)
    assert booted.returncode == errors.SPLAT, booted.stderr[-3000:]
    assert f"cache: hit {entry.name}" in booted.stderr and " lkdtm_WARNING+" in booted.stderr
    assert booted.stdout.split()[-2:] == ["aarch64", release], booted.stdout[-2000:]
    assert "to-stderr" not in booted.stdout and "to-stderr" in booted.stderr.splitlines(), booted.stderr[-2000:]
    assert (workspace / "out.txt").read_text() == "ok\n"
    record = json.loads((workspace / "vng-run.json").read_text())
    assert record["splats"] and not any(FAKE_WARNING in splat for splat in record["splats"]), record["splats"]
    assert FAKE_WARNING in (workspace / "vng-dmesg.log").read_text()
    # Its crash report, symbolized with the arm64 vmlinux the entry keeps (by aarch64-linux-gnu-addr2line).
    assert metadata["debug_info"] == "vmlinux.zst" and (entry / "vmlinux.zst").stat().st_size > 10_000_000
    (crash,) = json.loads((workspace / "crashes.json").read_text())["crashes"]
    assert (crash["title"], crash["kind"]) == ("WARNING in lkdtm_WARNING", "warning")
    assert_at_its_line_of_lkdtm(crash, kernel_tree)
