"""KVM or TCG, decided by a real probe guest on this host's real /dev/kvm."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vngtasks import accel, arches
from vngtasks.errors import NO_STATUS, Failure

PROBED = [a for a in arches.ARCHES if a.probe_code]


@pytest.mark.integration  # runs QEMU: a host package
@pytest.mark.parametrize("arch", PROBED, ids=lambda a: a.name)
def test_probe_firmware_exits_as_expected_under_tcg(arch: arches.Arch, tmp_path: Path) -> None:
    if arch == arches.host():
        assert shutil.which(arch.qemu_binary), f"{arch.qemu_package} is needed for this test"
    elif not shutil.which(arch.qemu_binary):
        pytest.skip(f"{arch.qemu_package} not installed")
    firmware = tmp_path / "probe.bin"
    firmware.write_bytes(accel.probe_firmware(arch))
    argv = [arch.qemu_binary, "-accel", "tcg", "-machine", arch.tcg_machine, "-cpu", arch.tcg_cpu]
    argv += ["-m", "16", "-nodefaults", "-display", "none", "-bios", str(firmware), *arch.probe_qemu_args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == arch.probe_status, done.stderr


@pytest.mark.integration  # runs QEMU: a host package
@pytest.mark.parametrize(("cpu", "xsave"), [("max", True), (arches.host().tcg_cpu, False)])
def test_the_x86_probe_runs_xsave_and_xrstor_where_the_cpu_has_them(tmp_path: Path, cpu: str, xsave: bool) -> None:
    """What a kernel's FPU setup runs first, and what a KVM that runs plain real mode but not a kernel fails at
    (kvm-pvm: "KVM internal error" at XRSTOR): QEMU's log of the instructions it ran says they ran."""
    arch = arches.host()
    if arch.name != "x86_64":
        pytest.skip("the x86 probe")
    firmware, ran = tmp_path / "probe.bin", tmp_path / "in_asm.log"
    firmware.write_bytes(accel.probe_firmware(arch))
    argv = [arch.qemu_binary, "-accel", "tcg", "-machine", arch.tcg_machine, "-cpu", cpu, "-m", "16", "-nodefaults"]
    argv += ["-display", "none", "-bios", str(firmware), *arch.probe_qemu_args, "-d", "in_asm", "-D", str(ran)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == arch.probe_status, done.stderr
    instructions = [line.split()[-2] for line in ran.read_text().splitlines() if line.startswith("0x")]
    assert ("xsave" in instructions, "xrstor" in instructions) == (xsave, xsave), instructions


def test_a_kvm_error_is_qemus_line_printable() -> None:
    printed = "RAX=0\nKVM internal error. Suberror: 3\x1b[2J\nemulation failure\n"
    assert accel.kvm_error(printed) == "KVM internal error. Suberror: 3?[2J"
    assert accel.kvm_error("error: kvm run failed Bad address\n") == "error: kvm run failed Bad address"
    assert accel.kvm_error("qemu-system-x86_64: terminating on signal 15\n") == ""


def fake_qemu(tmp_path: Path, monkeypatch, body: str) -> Path:
    """This host's QEMU binary name, first on PATH, as a shell script; /dev/kvm as a file that opens."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / arches.host().qemu_binary
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    device = tmp_path / "kvm"
    device.touch()
    return device


# Its pid is written before its error: the probe kills it as soon as it reads the error (a pid file made but not yet
# written when it was killed, under load, read as "" and failed the test once).
PAUSED = 'echo $$ > "$0.pid"; echo "KVM internal error. Suberror: 1" >&2; echo "emulation failure" >&2; exec sleep 60'


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (f"exit {arches.host().probe_status}", None),
        ("echo 'failed to set MSR 0x48f' >&2; exit 1", "a probe guest failed: failed to set MSR 0x48f"),
        # As QEMU on kvm-pvm: the error, then the guest paused and QEMU alive (killed, not waited for).
        (PAUSED, "a probe guest stopped under KVM: KVM internal error. Suberror: 1"),
        ("exec sleep 60", "a probe guest did not finish within 0.5 s"),
    ],
)
def test_the_probes_verdict_is_its_exit_or_qemus_kvm_error(tmp_path: Path, monkeypatch, body: str, problem) -> None:
    device = fake_qemu(tmp_path, monkeypatch, body + "\n")
    monkeypatch.setattr(accel, "PROBE_SECONDS", 0.5)
    assert accel.kvm_problem(arches.host(), device) == problem
    pid_file = tmp_path / "bin" / f"{arches.host().qemu_binary}.pid"
    if pid_file.exists():  # the paused QEMU was killed
        assert not Path(f"/proc/{pid_file.read_text().strip()}").exists()


def test_no_device_means_no_kvm(tmp_path: Path) -> None:
    missing = tmp_path / "kvm"
    assert accel.kvm_problem(arches.host(), missing) == f"{missing}: No such file or directory"
    choice = accel.choose("auto", arches.host(), arches.host(), missing)
    assert choice.accel == "tcg" and "falling back to TCG" in choice.why


def test_tcg_asked_is_tcg_without_probing(tmp_path: Path) -> None:
    assert accel.choose("tcg", arches.host(), arches.host(), tmp_path / "kvm") == accel.Choice("tcg", "")


def test_foreign_arch_never_uses_kvm() -> None:
    foreign = next(a for a in arches.ARCHES if a != arches.host())
    assert accel.choose("auto", foreign, arches.host()).accel == "tcg"


@pytest.mark.integration  # runs the probe guest in QEMU
def test_this_hosts_kvm_verdict_is_acted_on() -> None:
    """On a host whose /dev/kvm lies (this one), auto falls back and kvm fails clearly."""
    host = arches.host()
    problem = accel.kvm_problem(host)
    if problem is None:
        assert accel.choose("auto", host, host).accel == "kvm"
        return
    choice = accel.choose("auto", host, host)
    assert choice.accel == "tcg" and problem in choice.why
    with pytest.raises(Failure) as failed:
        accel.choose("kvm", host, host)
    assert failed.value.code == NO_STATUS and str(failed.value).startswith("accel: kvm was requested but ")
