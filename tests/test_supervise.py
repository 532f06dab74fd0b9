"""Supervising vng, with a stand-in for vng (a shell script: no QEMU), as a real process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from vngtasks import reaper, supervise
from vngtasks.errors import NO_STATUS
from vngtasks.supervise import Marks, VmRun


def vm_run(tmp_path: Path) -> VmRun:
    run_dir = tmp_path / "runs" / "one"
    (run_dir / "shared").mkdir(parents=True)
    return VmRun("tcg", run_dir / "shared", run_dir / "console.log", 60, 0)


def fake_vng(tmp_path: Path, body: str) -> str:
    script = tmp_path / "vng"
    script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return str(script)


def test_vngs_own_error_is_the_message_when_it_fails_before_the_kernel(tmp_path: Path, capsys) -> None:
    """As on a machine without `file`: vng dies with a traceback, QEMU never starts, the console stays empty."""
    vng = fake_vng(tmp_path, """\
        echo 'Traceback (most recent call last):' >&2
        echo "FileNotFoundError: [Errno 2] No such file or directory: 'file'" >&2
        exit 1
    """)  # fmt: skip
    vm = vm_run(tmp_path)
    with reaper.Guard(reaper.Leftovers(vm.shared.parent)) as guard:
        outcome = supervise.supervise(vm, [vng], dict(os.environ), Marks(probe=0.0), guard)
    assert (outcome.status, outcome.result) == (NO_STATUS, "no-status")
    err = capsys.readouterr().err
    said = "vng failed (exit 1) before the guest kernel printed anything: FileNotFoundError: [Errno 2] No such file"
    assert said in err and "the kernel printed nothing" not in err


def test_a_guest_kvm_stopped_ends_the_run_at_once_not_at_boot_timeout(tmp_path: Path, capsys) -> None:
    """As QEMU does on a host whose KVM ran the probe guest but cannot run the kernel (kvm-pvm emulating XRSTOR):
    it prints its KVM error and register dump, pauses the guest and lives on. Seen, the VM is stopped at once."""
    vng = fake_vng(tmp_path, """\
        echo 'KVM internal error. Suberror: 1' >&2
        echo 'extra data[0]: 0x0000000000000001' >&2
        echo 'emulation failure' >&2
        exec sleep 600
    """)  # fmt: skip
    vm = replace(vm_run(tmp_path), accel="kvm", boot_timeout=30)
    with reaper.Guard(reaper.Leftovers(vm.shared.parent)) as guard:
        outcome = supervise.supervise(vm, [vng], dict(os.environ), Marks(probe=0.0), guard)
    # Not "boot-timeout" (its 30 s would have ended the run too).
    assert (outcome.status, outcome.result) == (NO_STATUS, "kvm-error")
    assert outcome.kvm_error == "KVM internal error. Suberror: 1"
    said = "kvm-error: KVM stopped the guest before its workload started (KVM internal error. Suberror: 1); VM stopped"
    assert said in capsys.readouterr().err


def test_a_kvm_error_line_is_read_under_kvm_only_and_before_the_workload_only(tmp_path: Path) -> None:
    """The workload's stderr reaches vng's: a workload printing QEMU's words cannot stop its own run."""
    said = "KVM internal error. Suberror: 1\n"
    console = supervise.ConsoleWatch(tmp_path / "console.log")
    booting, running = Marks(probe=0.0, vng=0.0), Marks(probe=0.0, vng=0.0, started=1.0)
    tcg = vm_run(tmp_path)
    kvm = replace(tcg, accel="kvm")
    assert supervise.overdue(kvm, booting, console, 2.0, lambda: said) == "kvm-error"
    assert supervise.overdue(kvm, running, console, 2.0, lambda: said) is None
    assert supervise.overdue(tcg, booting, console, 2.0, lambda: said) is None


GUARDED = """\
import os, sys
from pathlib import Path
from vngtasks import reaper, supervise
run_dir = Path(sys.argv[1])
vm = supervise.VmRun("tcg", run_dir / "shared", run_dir / "console.log", 0, 0)
with reaper.Guard(reaper.Leftovers(run_dir)) as guard:
    supervise.supervise(vm, [sys.argv[2]], dict(os.environ), supervise.Marks(probe=0.0), guard)
"""


@pytest.mark.parametrize("how", ["process", "group"])
def test_a_killed_supervisor_leaves_no_vm_and_no_run_directory(tmp_path: Path, how: str) -> None:
    """SIGKILL (no `finally` runs) of the process supervising vng, alone or with its whole process group (as a
    test's timeout does): vng's session, a grandchild standing in for QEMU included, is stopped, and the run
    directory is gone."""
    pids = tmp_path / "pids"
    vng = fake_vng(tmp_path, f"""\
        sleep 600 &
        echo $! > {pids}
        wait
    """)  # fmt: skip
    run_dir = vm_run(tmp_path).shared.parent
    supervisor = subprocess.Popen(
        [sys.executable, "-c", GUARDED, str(run_dir), vng], start_new_session=True, stdin=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while not (pids.exists() and pids.read_text().strip()):
        assert time.monotonic() < deadline and supervisor.poll() is None
        time.sleep(0.05)
    qemu = int(pids.read_text())
    time.sleep(0.3)  # the guard has been told vng's session
    if how == "group":
        os.killpg(supervisor.pid, signal.SIGKILL)
    else:
        supervisor.kill()
    supervisor.wait()
    deadline = time.monotonic() + 10
    while (alive(qemu) or run_dir.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(qemu) and not run_dir.exists()


def alive(pid: int) -> bool:
    """`pid` runs and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_session_number_reused_by_another_is_left_alone(tmp_path: Path) -> None:
    """The guard names vng's session with its leader's start time: a leader of the same number started later
    is not vng, and is not stopped."""
    other = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        guard = reaper.Guard(reaper.Leftovers(tmp_path / "run"))
        order_started = reaper.start_time(other.pid)
        assert order_started is not None
        guard.process.stdin.write(
            f'{{"session": {other.pid}, "started": {order_started - 1}, "run_dir": "{tmp_path}/run",'
            ' "mountpoints": null}\n'.encode()
        )
        guard.close()
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_sweep_removes_only_the_run_directories_of_runs_that_are_over(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    live, dead, old, young = (runs / name for name in ("live", "dead", "old", "young"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from vngtasks import reaper\n"
         "with reaper.held(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()", str(live)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    for run in (live, dead, old, young):
        (run / "shared").mkdir(parents=True)
    (runs / "dead.lock").touch()  # its run was killed with its guard: nothing holds it
    os.utime(old, (time.time() - 2 * 86400,) * 2)  # made before runs had locks
    try:
        assert sorted(p.name for p in reaper.sweep(runs)) == ["dead", "old"]
        assert live.is_dir() and young.is_dir() and not dead.exists() and not old.exists()
        assert not (runs / "dead.lock").exists()
    finally:
        holder.communicate("")
    assert not (runs / "live.lock").exists()  # a run that ends removes its lock (and its directory) itself


def test_a_workload_of_any_bytes_is_written_as_given_and_a_failed_prepare_leaves_nothing(tmp_path, monkeypatch):
    from vngtasks import vm
    from vngtasks.settings import DEFAULTS, effective

    settings = effective(DEFAULTS, {"cache_dir": str(tmp_path / "c"), "extra_rwdirs": ""}, workspace=tmp_path)
    boot = vm.Boot(settings, tmp_path / "vmlinuz", "tcg", vm.new_run_dir(settings))
    vm.prepare(boot, "echo \udcff", {})
    assert (boot.shared / "workload.sh").read_bytes() == b"echo \xff\n"
    host_side = vm.HostSide(force_9p=True, native_init=True, probe_seconds=0.0)

    def broken(environ):
        raise OSError("the disk went away")

    monkeypatch.setattr(vm, "guest_environment", broken)
    host = vm.Host(settings.arch, 1024, "vng", {})
    with pytest.raises(OSError, match="went away"):
        vm.attempt(settings, tmp_path / "vmlinuz", "true", host, "tcg", host_side, None)
    assert [p.name for p in vm.runs_dir(settings).iterdir()] == [boot.run_dir.name]  # only the one made above


def test_a_stop_that_comes_while_vng_starts_waits_until_its_cleanup_is_in_place() -> None:
    """A signal between starting vng and the `try` that stops it would leave vng running: stopping signals are
    held until vng's cleanup is registered, then arrive. (Sent to this thread: a signal sent to the process may be
    taken by a thread that does not hold it, such as pytest-xdist's.)"""
    arrived: list[str] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: arrived.append("after" if done else "during"))
    done = False
    try:
        with supervise.stopping_signals_held():
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            time.sleep(0.05)
            done = True
        time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert arrived == ["after"]


FAKE_VM = """\
#!/usr/bin/env python3
# Stands in for vng and its VM: runs the guest script (the `--exec` vng got) here, as the guest would.
import shlex, subprocess, sys
sys.exit(subprocess.call(shlex.split(sys.argv[-1].removeprefix("--exec="))))
"""


def test_an_attempt_reads_what_the_guest_left_before_its_run_directory_goes(tmp_path: Path) -> None:
    from vngtasks import vm
    from vngtasks.settings import DEFAULTS, effective

    fake = tmp_path / "vng"
    fake.write_text(FAKE_VM)
    fake.chmod(0o755)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    flags = {"cache_dir": str(tmp_path / "c"), "extra_rwdirs": "", "splat_check": "false"}
    settings = effective(DEFAULTS, flags, workspace=workspace)
    host = vm.Host(settings.arch, 1024, str(fake), {"PATH": os.environ["PATH"]})
    host_side = vm.HostSide(force_9p=True, native_init=True, probe_seconds=0.0)
    attempted = vm.attempt(settings, tmp_path / "vmlinuz", "exit 3", host, "tcg", host_side, None)
    assert attempted.outcome.status == 3 and attempted.outcome.result == "workload"
    assert attempted.outcome.release == os.uname().release and attempted.dmesg is not None
    assert list(vm.runs_dir(settings).iterdir()) == []  # then all of it is gone


def test_a_labeled_boot_s_every_line_begins_with_its_label(tmp_path: Path, capfd) -> None:
    """A matrix's boots at once: what each VM relays (stdout, stderr, a last line without its break) and what is
    said of it comes line by line, each line with the cell's label, so two VMs' lines never mix."""
    from vngtasks import log

    vng = fake_vng(tmp_path, """\
        printf 'out one\\nout two\\n'
        printf 'err one\\n' >&2
        printf 'no break at the end'
    """)  # fmt: skip
    vm = vm_run(tmp_path)
    with log.labeled("01-v6.12-x86_64-tiny"), reaper.Guard(reaper.Leftovers(vm.shared.parent)) as guard:
        supervise.supervise(vm, [vng], dict(os.environ), Marks(probe=0.0), guard)
    out, err = capfd.readouterr()
    assert out.splitlines() == ["[01-v6.12-x86_64-tiny] out one", "[01-v6.12-x86_64-tiny] out two",
                                "[01-v6.12-x86_64-tiny] no break at the end"]  # fmt: skip
    assert err.splitlines()[0] == "[01-v6.12-x86_64-tiny] err one"
    assert all(line.startswith("[01-v6.12-x86_64-tiny] ") for line in err.splitlines()), err


def test_labeled_lines_are_cut_to_one_write_each() -> None:
    pending = bytearray()
    assert supervise.labeled_lines(pending, b"a\nb", b"[x] ") == [b"[x] a\n"] and pending == b"b"
    assert supervise.labeled_lines(pending, b"c\n\n", b"[x] ") == [b"[x] bc\n", b"[x] \n"] and pending == b""
    long = supervise.labeled_lines(pending, b"y" * (supervise.LABELED_LINE_BYTES + 5), b"[x] ")
    assert [len(line) for line in long] == [4 + supervise.LABELED_LINE_BYTES + 1] and pending == b"yyyyy"
