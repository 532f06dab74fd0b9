"""Foreign-arch guests on this host: Debian's kernel and a guest root of that arch, under TCG (guestroot.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import FAKE_WARNING, HOST_PACKAGES
from linux_remote import FOREIGN_CACHE

from vngtasks import arches, errors

# Also: a line a program writes to /dev/kmsg is told from the kernel's by busybox's `dmesg -r` too.
WORKLOAD = f"uname -m; echo ok > out.txt; echo to-stderr >&2; echo '{FAKE_WARNING}' > /dev/kmsg; exit 3"
# arm64's Debian kernel boots in test_action.py's arch matrix and the panic test below; this workload's checks run
# in arm64's guest root with the arm64 tiny kernel (test_build.py).
FOREIGN = [arches.lookup(name) for name in ("s390x", "ppc64le")]

pytestmark = HOST_PACKAGES


@pytest.mark.slow
@pytest.mark.parametrize("arch", FOREIGN, ids=lambda a: a.name)
def test_a_foreign_guest_boots_its_debian_kernel(cli, workspace: Path, arch: arches.Arch):
    assert arch != arches.host()
    prepared = cli("deps", "--arch", arch.name, "--cache-dir", str(FOREIGN_CACHE), timeout=1800)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    kernel = Path(prepared.stdout.strip().splitlines()[-1].removeprefix("kernel="))
    assert kernel.is_file() and (kernel.parent.parent / "lib" / "modules").is_dir()
    # Without --kernel (or --tag), a boot of A boots that kernel.
    planned = cli("boot", "--arch", arch.name, "--cache-dir", str(FOREIGN_CACHE), "--dry-run", "--", WORKLOAD)
    assert planned.returncode == 0 and f"--run={kernel}" in planned.stdout.split(), planned.stderr
    started = time.monotonic()
    done = cli(
        "boot", "--arch", arch.name, "--kernel", str(kernel), "--cache-dir", str(FOREIGN_CACHE),
        "--verbose", "false", "--", WORKLOAD, timeout=900,
    )  # fmt: skip
    print(f"{arch.name}: invoke boot took {time.monotonic() - started:.1f} s")
    assert done.returncode == 3, done.stderr[-3000:]
    assert arch.uname_m in done.stdout.split(), done.stdout[-2000:]
    # The workload's stdout and stderr come back apart (the guest root's udev stand-ins name the ports).
    assert "to-stderr" not in done.stdout and "to-stderr" in done.stderr.splitlines(), done.stderr[-2000:]
    assert (workspace / "out.txt").read_text() == "ok\n"
    record = json.loads((workspace / "vng-run.json").read_text())
    assert record["splats"] == [] and FAKE_WARNING in (workspace / "vng-dmesg.log").read_text()


def test_riscv64_without_a_root_is_refused(cli, tmp_path: Path):
    kernel = tmp_path / "Image"  # any file: the refusal comes before the kernel is looked at
    kernel.write_bytes(b"MZ")
    done = cli("boot", "--arch", "riscv64", "--kernel", str(kernel), "--cache-dir", str(tmp_path / "c"), "--", "true")
    assert done.returncode == errors.BAD_INPUT, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no riscv64 userland" in lines[0], done.stderr
    assert not (tmp_path / "c").exists()  # refused before anything is made


@pytest.mark.slow
def test_a_panic_ends_a_foreign_run_at_once(cli):
    """Health checks judge a foreign guest as a host one: a panic ends the run at once with no status (a kernel
    warning: the arm64 cross-built kernel's boot in test_build.py)."""
    prepared = cli("deps", "--arch", "arm64", "--cache-dir", str(FOREIGN_CACHE), timeout=1800)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    crash = "echo c > /proc/sysrq-trigger"
    done = cli("boot", "--arch", "arm64", "--cache-dir", str(FOREIGN_CACHE), "--verbose", "false", "--", crash)
    assert done.returncode == errors.NO_STATUS, done.stderr[-3000:]
    assert "the guest kernel panicked" in done.stderr, done.stderr[-3000:]
