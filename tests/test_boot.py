"""Real VMs: a distro kernel booted under QEMU on this machine (TCG when KVM lies)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vngtasks import kernels

pytestmark = pytest.mark.slow

QUIET = ("--verbose", "false")


def qemu_processes_under(path: Path) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in text and str(path) in text:
            found.append(text)
    return found


@pytest.fixture(scope="session")
def distro_kernel() -> Path:
    return kernels.host_kernel()  # fails (not skips) where no distro kernel is installed


def test_status_files_and_environment_cross_the_vm(cli, tmp_path: Path, workspace: Path, distro_kernel: Path):
    github = tmp_path / "runner-files"
    github.mkdir()
    output = github / "output"
    output.touch()
    workload = 'echo hi > out.txt; echo "answer=$VNGTASKS_TEST_VALUE" >> "$GITHUB_OUTPUT"; exit 3'
    done = cli(
        "boot", "--kernel", str(distro_kernel), *QUIET, "--", workload,
        env={"GITHUB_OUTPUT": str(output), "VNGTASKS_TEST_VALUE": "a b $c 'd'"},
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert (workspace / "out.txt").read_text() == "hi\n"
    assert output.read_text() == "answer=a b $c 'd'\n"


def test_read_only_workspace_and_accel_auto(cli, workspace: Path, distro_kernel: Path):
    from vngtasks import accel, arches

    problem = accel.kvm_problem(arches.host())
    done = cli("boot", "--kernel", str(distro_kernel), *QUIET, "--workspace-rw", "false", "--", "touch ro-probe")
    # vng gives unshared paths a throwaway overlay: the write works inside, never reaches the host.
    assert done.returncode == 0, done.stderr
    assert not (workspace / "ro-probe").exists()
    if problem is not None:
        warnings = [line for line in done.stderr.splitlines() if "falling back to TCG" in line]
        assert len(warnings) == 1 and problem in warnings[0], done.stderr


def test_run_timeout_kills_the_vm(cli, home: Path, distro_kernel: Path):
    started = time.monotonic()
    done = cli("boot", "--kernel", str(distro_kernel), *QUIET, "--run-timeout", "5", "--", "sleep 600")
    assert done.returncode == 124, done.stderr
    assert time.monotonic() - started < 120
    assert "run-timeout" in done.stderr
    assert qemu_processes_under(home) == []


def test_boot_timeout_gives_no_status(cli, home: Path, distro_kernel: Path):
    done = cli("boot", "--kernel", str(distro_kernel), *QUIET, "--boot-timeout", "2", "--", "true")
    assert done.returncode == 125, done.stderr
    assert "boot-timeout" in done.stderr
    assert qemu_processes_under(home) == []
