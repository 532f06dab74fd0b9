"""`vmcore on-failure` without a VM (unit tier): the lines it adds, what it refuses, QMP's replies read, the files
published. tests/test_boot.py dumps a real panicked guest and opens the dump with drgn."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from vngtasks import arches, runrecord, vm, vmcore
from vngtasks.settings import DEFAULTS, effective
from vngtasks.validate import InputError

RUN_DIR = Path("/cache/vngtasks/runs/20261206T213000-0123abcd")


def line(**flags: str) -> list[str]:
    settings = effective(DEFAULTS, {"extra_rwdirs": "", "cpus": "1", **flags}, workspace=Path("/work/project"))
    boot = vm.Boot(settings, Path("/boot/vmlinuz-6.12.0"), "tcg", RUN_DIR, False, True, None)
    return vm.vng_argv(boot, vm.Host(arch=arches.host(), memory_mib=16384, vng="vng", environ={}))


def test_on_failure_adds_qmp_vmcoreinfo_and_a_waiting_panic() -> None:
    argv = line(vmcore="on-failure", append="panic=5")
    qemu = next(arg for arg in argv if arg.startswith("--qemu-opts="))
    assert f"-qmp unix:{RUN_DIR}/qmp.sock,server=on,wait=off -device vmcoreinfo" in qemu
    appended = [arg for arg in argv if arg.startswith("--append=")]
    assert appended.index("--append=panic=0") > appended.index("--append=panic=5")  # ours after the user's: it wins
    plain = line()
    assert "-qmp" not in " ".join(plain) and "--append=panic=0" not in plain and "vmcoreinfo" not in " ".join(plain)


@pytest.mark.parametrize("arch", ["s390x", "ppc64le", "riscv64"])
def test_arches_without_qemu_s_vmcoreinfo_device_are_refused(arch: str) -> None:
    with pytest.raises(InputError, match=r"^vmcore: not offered on .* \(only x86_64, arm64"):
        effective(DEFAULTS, {"vmcore": "on-failure", "arch": arch}, workspace=Path("/w"))
    with pytest.raises(InputError, match=r"^vmcore: 'always' is not valid"):
        effective(DEFAULTS, {"vmcore": "always"}, workspace=Path("/w"))


def test_a_socket_path_longer_than_sun_path_is_known() -> None:
    assert vmcore.socket_fits(Path("/" + "a" * 106)) and not vmcore.socket_fits(Path("/" + "a" * 107))


def test_replies_skip_events_and_name_qemu_s_errors() -> None:
    event = json.dumps({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}})
    replies = io.BytesIO(f'{{"QMP": {{"version": {{}}}}}}\n{event}\n{{"return": {{}}}}\n'.encode())
    assert "QMP" in vmcore._reply(replies, greeting=True) and vmcore._reply(replies) == {"return": {}}
    failing = io.BytesIO(b'{"error": {"class": "GenericError", "desc": "dump: no space left"}}\n')
    with pytest.raises(vmcore.QmpError, match="no space left"):
        vmcore._reply(failing)
    for hostile in (b"", b'{"return": {}}', b"x" * (vmcore.REPLY_BYTES + 10) + b"\n", b"[1]\n", b'{"retur": 1}\n'):
        with pytest.raises((vmcore.QmpError, ValueError)):
            vmcore._reply(io.BytesIO(hostile))


def test_a_qemu_that_is_not_there_is_one_warning_and_no_file(tmp_path: Path, capsys) -> None:
    assert vmcore.dump(tmp_path / "no.sock", tmp_path, seconds=2) is None
    assert os.listdir(tmp_path) == []
    (err,) = capsys.readouterr().err.splitlines()
    assert "vmcore: QEMU did not dump the guest's memory:" in err


def test_publishing_replaces_what_the_guest_placed_and_a_run_without_a_dump_removes_both(tmp_path: Path) -> None:
    log_dir, entry = tmp_path / "log", tmp_path / "entry"
    log_dir.mkdir()
    entry.mkdir()
    target = tmp_path / "victim"
    target.write_text("mine")
    (log_dir / "vmcore").symlink_to(target)  # placed by a guest that can write the workspace
    (log_dir / "vmlinux").symlink_to(target)
    dumped = log_dir / ".vmcore-x"
    dumped.write_bytes(b"\x7fELF core")
    assert vmcore.publish(log_dir, dumped, entry)  # the entry keeps no vmlinux.zst: no vmlinux beside
    assert (log_dir / "vmcore").read_bytes() == b"\x7fELF core" and not (log_dir / "vmcore").is_symlink()
    assert not (log_dir / "vmlinux").exists() and target.read_text() == "mine"
    assert not vmcore.publish(log_dir, None, entry)
    assert not (log_dir / "vmcore").exists() and sorted(os.listdir(log_dir)) == []


def test_the_run_record_names_the_vmcore() -> None:
    outcome = runrecord.Outcome("tcg", 125, "panic", 3.0, None, vmcore=Path("/log/vmcore"))
    record = runrecord.Record(Path("/k"), "6.12.0", "x86_64", outcome, 125, ())
    assert runrecord.record_json(record, Path("/log"))["vmcore"] == "/log/vmcore"
