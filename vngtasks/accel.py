"""Choosing KVM or TCG: trust /dev/kvm only after a KVM guest has really run.

On some hosts /dev/kvm opens fine but every guest aborts ("failed to set MSR") or
hangs (broken nested virtualisation). A firmware-sized probe guest from the arch
table answers in well under a second when KVM works; we give it PROBE_SECONDS.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import render
from .arches import Arch
from .errors import MISSING_TOOL, NO_STATUS, Failure
from .log import printable

PROBE_SECONDS = 5.0
PROBE_STDERR_BYTES = 16 * 1024
KVM_DEVICE = Path("/dev/kvm")
# What QEMU prints when KVM cannot go on running a guest (accel/kvm/kvm-all.c, target/i386/kvm/kvm.c). QEMU then
# pauses the guest and lives on: a boot would wait for boot-timeout, a probe for PROBE_SECONDS.
KVM_ERRORS = ("KVM internal error.", "error: kvm run failed", "KVM: entry failed")


@dataclass(frozen=True)
class Choice:
    accel: str  # "kvm" or "tcg"
    why: str  # empty when there is nothing to tell the user


def qemu_binary(arch: Arch) -> str:
    found = shutil.which(arch.qemu_binary)
    if found is None:
        raise Failure(
            f"{arch.qemu_binary} not found: install {arch.qemu_package} (`invoke deps` does)",
            MISSING_TOOL,
        )
    return found


def choose(
    requested: str,
    arch: Arch,
    host: Arch,
    device: Path = KVM_DEVICE,
    problem_of: Callable[[Arch], str | None] | None = None,
) -> Choice:
    """The accelerator to boot with; raises Failure when `kvm` was asked for and is broken.

    `problem_of` answers for KVM (default: probe `device` now), e.g. from the host's cached probes."""
    if requested == "tcg":
        return Choice("tcg", "")
    if arch != host:
        return Choice("tcg", "")
    problem = problem_of(arch) if problem_of else kvm_problem(arch, device)
    if problem is None:
        return Choice("kvm", "")
    if requested == "kvm":
        raise Failure(f"accel: kvm was requested but {problem}", NO_STATUS)
    return Choice("tcg", f"KVM unusable ({problem}); falling back to TCG software emulation")


def kvm_problem(arch: Arch, device: Path = KVM_DEVICE) -> str | None:
    """Why KVM cannot run a guest of `arch` here, or None when a probe guest ran."""
    problem = device_problem(device)
    if problem is not None:
        return problem
    if not arch.probe_code:
        return None
    with tempfile.TemporaryDirectory(prefix="vngtasks-probe-") as tmp:
        firmware = Path(tmp) / "probe.bin"
        firmware.write_bytes(probe_firmware(arch))
        argv = render.argv("kvm-probe.argv.j2", arch=arch, firmware=firmware)
        argv[0] = qemu_binary(arch)
        with subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        ) as probe:
            status, said = watch_probe(probe)
    if status == arch.probe_status:
        return None
    if error := kvm_error(said):
        return f"a probe guest stopped under KVM: {error}"
    if status is None:
        return f"a probe guest did not finish within {PROBE_SECONDS:g} s"
    detail = (printable(said).strip().splitlines() or [f"exit status {status}"])[0]
    return f"a probe guest failed: {detail}"


def watch_probe(probe: subprocess.Popen[bytes]) -> tuple[int | None, str]:
    """The probe guest's exit status and the start of its stderr, once it exits, or says KVM stopped it (QEMU then
    pauses it and lives on), or PROBE_SECONDS pass; a probe that has not exited is killed (status None)."""
    assert probe.stderr is not None
    deadline = time.monotonic() + PROBE_SECONDS
    said = b""
    closed = False
    while probe.poll() is None and (left := deadline - time.monotonic()) > 0:
        if closed:  # it closed its stderr: wait for its exit
            time.sleep(min(left, 0.05))
            continue
        ready, _, _ = select.select([probe.stderr], [], [], min(left, 0.05))
        chunk = os.read(probe.stderr.fileno(), 4096) if ready else b""
        closed = ready and not chunk
        said = (said + chunk)[:PROBE_STDERR_BYTES]
        if chunk and kvm_error(said.decode(errors="replace")):  # read again only when QEMU said more
            break
    status = probe.poll()
    if status is None:
        probe.kill()
        probe.wait()
    said = (said + probe.stderr.read(PROBE_STDERR_BYTES))[:PROBE_STDERR_BYTES]
    return status, said.decode(errors="replace")


def kvm_error(qemu_said: str) -> str:
    """QEMU's line saying KVM stopped the guest, if its stderr has one ("" if not), printable."""
    lines = (printable(line).strip() for line in qemu_said.splitlines())
    return next((line for line in lines if line.startswith(KVM_ERRORS)), "")


def device_problem(device: Path = KVM_DEVICE) -> str | None:
    """Why the KVM device cannot be opened, or None when it can (not yet that a guest runs)."""
    try:
        os.close(os.open(device, os.O_RDWR | os.O_CLOEXEC))
    except OSError as error:
        return f"{device}: {error.strerror}"
    return None


def probe_firmware(arch: Arch) -> bytes:
    code = bytes.fromhex(arch.probe_code)
    image = bytearray(arch.probe_size)
    image[arch.probe_offset : arch.probe_offset + len(code)] = code
    return bytes(image)
