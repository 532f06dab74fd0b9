"""`invoke deps` against this machine's real dpkg and apt."""

from __future__ import annotations

import fcntl
import subprocess
import time
from pathlib import Path

import pytest
from conftest import HOST_PACKAGES

from vngtasks import arches, deps
from vngtasks.settings import DEFAULTS, effective

DPKG_FRONTEND_LOCK = Path("/var/lib/dpkg/lock-frontend")
ABSENT = "hello"  # a small real package that no test installs

pytestmark = HOST_PACKAGES


def installed(package: str) -> bool:
    done = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", package], capture_output=True, text=True)
    return done.stdout.startswith("ii")


@pytest.mark.integration  # runs `invoke deps` for real, after nox's own `invoke deps`
def test_all_present_runs_no_apt(cli):
    done = cli("deps")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().endswith("deps: everything is already installed")
    assert "apt" not in done.stderr.replace("deps:", "")


def test_wanted_follows_arch_toolchain_and_distro(tmp_path: Path):
    s = effective(DEFAULTS, {"arch": "arm64", "llvm": "-14", "packages": "sl"}, workspace=tmp_path)
    debian = deps.Distro.of('ID=debian\nVERSION_ID="12"\n')
    ubuntu = deps.Distro.of('ID=ubuntu\nVERSION_ID="24.04"\n')
    names = deps.wanted(s, debian, arches.lookup("x86_64"), need_kernel_image=True)
    assert {"qemu-system-arm", "gcc-aarch64-linux-gnu", "clang-14", "lld-14", "bpftool", "sl"} <= set(names)
    assert "linux-image-amd64" in names and "virtiofsd" not in names  # bookworm ships it in qemu
    assert {"file", "busybox-static", "kmod"} <= set(names)  # what vng itself runs on the host to boot
    names = deps.wanted(s, ubuntu, arches.lookup("x86_64"), need_kernel_image=True)
    assert {"linux-image-generic", "virtiofsd", "linux-tools-common"} <= set(names)


@pytest.mark.integration
def test_a_bad_package_is_named_after_its_retries(cli):
    done = cli("deps", "--packages", "no-such-pkg-xyz", "--deps-retries", "2")
    assert done.returncode == 1
    assert done.stderr.count("attempt ") == 2
    assert (
        done.stderr.strip().splitlines()[-1].startswith("vngtasks: deps: apt-get failed 2 times: package no-such-pkg")
    )


@pytest.mark.integration
def test_deps_timeout_ends_an_attempt_stuck_on_the_dpkg_lock(cli):
    assert not installed(ABSENT)
    # Another apt holds dpkg's lock (as unattended-upgrades does on a fresh runner): apt waits.
    with open(DPKG_FRONTEND_LOCK, "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        done = cli("deps", "--packages", ABSENT, "--deps-timeout", "1", "--deps-retries", "1")
        elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert "timed out after 1 s (deps-timeout)" in done.stderr
    assert elapsed < 60
    time.sleep(1)
    leftovers = subprocess.run(["pgrep", "-f", f"apt-get install.* {ABSENT}"], capture_output=True, text=True)
    assert leftovers.stdout == "", "an apt-get outlived its attempt"
    assert not installed(ABSENT)
