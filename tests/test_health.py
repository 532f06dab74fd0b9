"""VM health without a VM: splat scanning, console tails, the run record, the TCG retry."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from vngtasks import files, health, runrecord, supervise, vm
from vngtasks.errors import NO_STATUS, SPLAT
from vngtasks.settings import DEFAULTS, effective
from vngtasks.supervise import Marks
from vngtasks.validate import InputError

BOOT_LOG = [
    "[    0.000000] Linux version 6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP",
    "[    2.660931] PCI: Using host bridge windows from ACPI; if necessary, report a bug",
    "[    4.316971] AMD-Vi: AMD IOMMUv2 functionality not available - This is not a bug.",
    "[   88.065755] WARNING: CPU: 0 PID: 1 at fake.c:1 test+0x0/0x10",
    "[   90.100000] BUG: KASAN: slab-out-of-bounds in foo+0x1/0x2",
    "[   91.000000] ======================================================",
    "[   91.000001] WARNING: possible circular locking dependency detected",
    "[   92.000000] INFO: task kworker/0:1:12 blocked for more than 120 seconds.",
    "[   93.000000] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:",
    "[   94.000000] Oops: 0002 [#1] PREEMPT SMP NOPTI",
    "[   95.000000] UBSAN: shift-out-of-bounds in lib/foo.c:3:4",
    "[   96.000000] kmemleak: unreferenced object 0xffff888003a1c0c0 (size 32):",
]


def make(tmp_path: Path, **flags: str):
    return effective(DEFAULTS, {"extra_rwdirs": "", "cache_dir": str(tmp_path / "cache"), **flags}, workspace=tmp_path)


def outcome(status: int = 0, result: str = "workload", accel: str = "tcg") -> supervise.Outcome:
    return supervise.Outcome(accel=accel, status=status, result=result, boot_seconds=41.23, workload_seconds=2.05)


def test_splats_are_found_without_timestamps_and_once() -> None:
    found = health.find_splats(BOOT_LOG + BOOT_LOG[3:4], ())
    assert found == [line.split("] ", 1)[1] for line in BOOT_LOG[3:5] + BOOT_LOG[6:]]


def test_allowed_splats_are_ignored() -> None:
    allow = (r"at fake\.c:1 ", "circular locking", "blocked for more than")
    found = health.find_splats(BOOT_LOG, allow)
    assert not any("fake.c" in line or "circular" in line or "blocked" in line for line in found)
    assert "Oops: 0002 [#1] PREEMPT SMP NOPTI" in found


def test_a_clean_boot_has_no_splats() -> None:
    assert health.find_splats(BOOT_LOG[:3], ()) == []


def test_splat_allow_is_one_regex_per_line(tmp_path: Path) -> None:
    s = make(tmp_path, splat_allow="at fake\\.c:1 test\n\n  rcu_sched detected stalls  \n")
    assert s.splat_allow == ("at fake\\.c:1 test", "rcu_sched detected stalls")
    assert make(tmp_path).splat_allow == () and make(tmp_path).splat_check
    # A YAML list in invoke.yaml: one regex per item, spaces kept.
    listed = effective({**DEFAULTS, "splat_allow": ["a b", "c"]}, {}, workspace=tmp_path)
    assert listed.splat_allow == ("a b", "c")


def test_a_bad_splat_allow_regex_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"^splat-allow: '\(unclosed' is not a valid regex"):
        make(tmp_path, splat_allow="ok\n(unclosed")


def test_log_dir_defaults_to_the_workspace_and_must_be_a_directory(tmp_path: Path) -> None:
    assert make(tmp_path).log_dir == tmp_path.resolve()
    assert make(tmp_path, log_dir="logs").log_dir == tmp_path.resolve() / "logs"
    (tmp_path / "file").touch()
    with pytest.raises(InputError, match=r"^log-dir: 'file' is not a directory"):
        make(tmp_path, log_dir="file")


def test_last_lines_drop_blanks_and_control_characters() -> None:
    lines = [f"line {i}" for i in range(80)] + ["", "\x1b[0mend\r", "   "]
    tail = health.last_lines(lines)
    assert len(tail) == health.TAIL_LINES == 50
    assert tail[0] == "line 31" and tail[-1] == "?[0mend"
    assert health.last_lines(["a", "b"], 1) == ["b"] and health.last_lines([]) == []


def test_the_panic_line_is_seen_even_when_it_arrives_in_pieces(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    watch = health.ConsoleWatch(console)
    assert watch.panicked_for(1.0) == 0.0  # no file yet
    console.write_text("[ 1.0] sysrq: Trigger a crash\n[ 1.1] Kernel panic - not ")
    assert watch.panicked_for(2.0) == 0.0
    with open(console, "a") as more:
        more.write("syncing: sysrq triggered crash\n")
    assert watch.panicked_for(3.0) == 0.0 and watch.panicked()
    assert watch.panicked_for(10.0) == 7.0


def test_splats_fail_a_passing_workload_only() -> None:
    assert runrecord.judge(outcome(0), ["WARNING: x"]) == SPLAT == 123
    assert runrecord.judge(outcome(3), ["WARNING: x"]) == 3
    assert runrecord.judge(outcome(0), []) == 0
    assert runrecord.judge(outcome(NO_STATUS, "panic"), ["Oops: 0002"]) == NO_STATUS


def test_summary_row_escapes_and_names_the_result() -> None:
    record = runrecord.Record(
        kernel=Path("/k/bz|Image"), release="", arch="x86_64", outcome=outcome(0), status=SPLAT, splats=("WARNING: x",)
    )
    assert runrecord.summary_row(record) == "| bz\\|Image (x86_64) | tcg | 41.2 | 2.0 | 123 (splat) | 1 |\n"
    panic = runrecord.Record(
        kernel=Path("/k/bzImage"),
        release="6.1.0-56-amd64",
        arch="x86_64",
        outcome=supervise.Outcome("kvm", NO_STATUS, "panic", None, None),
        status=NO_STATUS,
        splats=(),
    )
    assert runrecord.summary_row(panic) == "| 6.1.0-56-amd64 (x86_64) | kvm | - | - | 125 (panic) | 0 |\n"


def test_summary_header_is_written_once(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("## earlier step output")
    record = runrecord.Record(Path("/k/bzImage"), "6.1", "x86_64", outcome(0), 0, ())
    runrecord.append_summary(summary, record)
    runrecord.append_summary(summary, record)
    text = summary.read_text()
    assert text.count("| kernel | accel |") == 1
    assert text.endswith("| 6.1 (x86_64) | tcg | 41.2 | 2.0 | 0 | 0 |\n" * 2)
    assert text.startswith("## earlier step output\n| kernel")


def raw_dmesg(lines: list[str], priority: str = "<4>") -> list[str]:
    """Lines as the guest's `dmesg -r` writes them: kernel ones (facility 0) unless `priority` says otherwise."""
    return [priority + line for line in lines]


def attempted(result: supervise.Outcome, console: list[str], dmesg: list[str] | None) -> runrecord.Attempt:
    text = None if dmesg is None else ("\n".join(dmesg) + "\n").encode()
    return runrecord.Attempt(result, ("\n".join(console) + "\n").encode(), text)


# What virtme-ng-init writes to /dev/kmsg on a root without systemd (a stock Debian 12): <14> is user.info.
VNG_INIT_WARNING = (
    '[    1.514217] virtme-ng-init: WARNING: failed to run: "systemd-tmpfiles" --create (error: No such file)'
)


def test_what_programs_write_to_kmsg_is_never_a_splat(tmp_path: Path) -> None:
    """vng's init and the workload write to /dev/kmsg: the kernel gives their lines a facility of their own, so
    neither their dmesg lines nor the same lines on the console are the kernel's."""
    s = make(tmp_path)
    dmesg = [*raw_dmesg(BOOT_LOG[:3]), "<14>" + VNG_INIT_WARNING, "<12>" + BOOT_LOG[3]]  # user.info, user.warning
    console = [*BOOT_LOG[:4], VNG_INIT_WARNING]
    assert runrecord.conclude(s, Path("/boot/vmlinuz"), attempted(outcome(0), console, dmesg), {}) == 0
    kernel_warning = dmesg + raw_dmesg([BOOT_LOG[4]])
    assert runrecord.conclude(s, Path("/boot/vmlinuz"), attempted(outcome(0), console, kernel_warning), {}) == SPLAT
    record = json.loads((s.log_dir / runrecord.RUN_JSON).read_text())
    assert record["splats"] == ["BUG: KASAN: slab-out-of-bounds in foo+0x1/0x2"]


def test_a_kernel_line_only_on_the_console_is_judged(tmp_path: Path) -> None:
    """After dmesg was taken (shutdown), or dropped from a full ring buffer: the console still has it."""
    s = make(tmp_path)
    run = attempted(outcome(0), BOOT_LOG[:4], raw_dmesg(BOOT_LOG[:3]))
    assert runrecord.conclude(s, Path("/boot/vmlinuz"), run, {}) == SPLAT


def test_util_linux_decoded_dmesg_is_parted_by_facility_too() -> None:
    """`dmesg -x`, as util-linux prints it (its `dmesg -r` loses the facility)."""
    dmesg = (
        b"kern  :warn  : [    1.0] WARNING: CPU: 0 PID: 1 at a.c:1 f+0x0/0x1\n"
        b"                               more of that record\n"
        b'user  :info  : [    1.5] virtme-ng-init: WARNING: failed to run: "systemd-tmpfiles"\n'
        b"kern  :info  : [    2.3] Run /usr/lib/virtme-ng-init as init process\n"
    )
    kernel, programs = health.kernel_and_program_lines(dmesg)
    assert kernel == ["[    1.0] WARNING: CPU: 0 PID: 1 at a.c:1 f+0x0/0x1", "                               more of"
                      " that record", "[    2.3] Run /usr/lib/virtme-ng-init as init process"]  # fmt: skip
    assert programs == ['[    1.5] virtme-ng-init: WARNING: failed to run: "systemd-tmpfiles"']
    assert health.init_started(dmesg) == 2.3


def test_dmesg_lines_are_parted_by_facility_continuations_included() -> None:
    dmesg = b"<4>[ 1.0] WARNING: at a.c:1\n more of that record\n<14>[ 1.1] prog: hello\n<0>[ 1.2] Oops\n"
    kernel, programs = health.kernel_and_program_lines(dmesg)
    assert kernel == ["[ 1.0] WARNING: at a.c:1", " more of that record", "[ 1.2] Oops"]
    assert programs == ["[ 1.1] prog: hello"]


def test_conclude_writes_the_record_and_the_summary(tmp_path: Path) -> None:
    s = make(tmp_path, log_dir="logs", splat_allow="circular")
    s.log_dir.mkdir()
    summary = tmp_path / "step-summary"
    run = attempted(outcome(0), BOOT_LOG[:4], raw_dmesg(BOOT_LOG[:4] + BOOT_LOG[6:7]))
    status = runrecord.conclude(s, Path("/boot/vmlinuz"), run, {"GITHUB_STEP_SUMMARY": str(summary)})
    assert status == SPLAT
    assert (s.log_dir / runrecord.CONSOLE_LOG).read_bytes() == run.console and (
        s.log_dir / runrecord.DMESG_LOG
    ).read_bytes() == run.dmesg
    record = json.loads((s.log_dir / runrecord.RUN_JSON).read_text())
    assert record == {
        "kernel": "/boot/vmlinuz",
        "console": str(s.log_dir / runrecord.CONSOLE_LOG),
        "release": "6.1.0-56-amd64",  # from the banner when the guest wrote none
        "arch": s.arch.name,
        "accel": "tcg",
        "boot_seconds": 41.2,
        "workload_seconds": 2.0,
        "phases": {},
        "result": "workload",
        "workload_status": 0,
        "status": 123,
        "splats": ["WARNING: CPU: 0 PID: 1 at fake.c:1 test+0x0/0x10"],
        "tests": None,  # no `results`
        "crashes": [{"title": "WARNING in test", "count": 1}],
        "vmcore": None,
    }
    assert "| 123 (splat) | 1 |" in summary.read_text()
    assert "| `WARNING in test` | warning | 1 |" in summary.read_text()
    reports = json.loads((s.log_dir / "crashes.json").read_text())
    assert [crash["title"] for crash in reports["crashes"]] == ["WARNING in test"]
    assert (s.log_dir / "crash-report.txt").read_text().startswith("== WARNING in test (warning, 1 time)\n")


def test_crashes_are_reported_with_splat_check_off_from_dmesg_when_the_console_has_none(tmp_path: Path) -> None:
    """Crash reports change no status: with splat-check false the run passes, and still says what crashed. A run
    without crashes leaves an empty crashes.json, and no crash-report.txt of another run beside it."""
    s = make(tmp_path, splat_check="false")
    (s.log_dir / "crash-report.txt").write_text("another run's\n")
    quiet = attempted(outcome(0), [], raw_dmesg(BOOT_LOG[:3]))
    assert runrecord.conclude(s, Path("/boot/vmlinuz"), quiet, {}) == 0
    assert json.loads((s.log_dir / "crashes.json").read_text())["crashes"] == []
    assert not (s.log_dir / "crash-report.txt").exists()
    warned = attempted(outcome(0), [], raw_dmesg(BOOT_LOG[:5]))
    assert runrecord.conclude(s, Path("/boot/vmlinuz"), warned, {}) == 0
    reports = json.loads((s.log_dir / "crashes.json").read_text())["crashes"]
    assert [(c["title"], c["kind"]) for c in reports] == [
        ("WARNING in test", "warning"),
        ("KASAN: slab-out-of-bounds Access in foo", "kasan"),
    ]


def test_splat_check_false_never_scans(tmp_path: Path) -> None:
    s = make(tmp_path, splat_check="false")
    assert runrecord.conclude(s, Path("/boot/vmlinuz"), attempted(outcome(0), [], raw_dmesg(BOOT_LOG[3:4])), {}) == 0


def test_a_run_is_judged_on_its_own_console_never_another_runs(tmp_path: Path) -> None:
    """Two runs sharing a log-dir: the one that splatted fails whatever the other left in log-dir."""
    s = make(tmp_path)
    (s.log_dir / runrecord.CONSOLE_LOG).write_text(BOOT_LOG[3] + "\n")  # another run's WARNING
    (s.log_dir / runrecord.DMESG_LOG).write_text(BOOT_LOG[3] + "\n")
    clean = attempted(outcome(0), BOOT_LOG[:3], raw_dmesg(BOOT_LOG[:3]))
    assert runrecord.conclude(s, Path("/boot/vmlinuz"), clean, {}) == 0
    assert BOOT_LOG[3] not in (s.log_dir / runrecord.CONSOLE_LOG).read_text()
    warned = attempted(outcome(0), BOOT_LOG[:4], None)
    assert runrecord.conclude(s, Path("/boot/vmlinuz"), warned, {}) == SPLAT
    assert not (s.log_dir / runrecord.DMESG_LOG).exists()  # none from this run: the other's is not left beside it


@pytest.mark.parametrize(
    ("requested", "used", "result", "retry"),
    [
        ("auto", "kvm", "boot-timeout", True),
        ("auto", "kvm", "kvm-error", True),  # QEMU said KVM stopped the guest
        ("kvm", "kvm", "kvm-error", False),
        ("kvm", "kvm", "boot-timeout", False),  # asked for KVM: no silent switch
        ("auto", "tcg", "boot-timeout", False),  # TCG already
        ("auto", "kvm", "panic", False),  # booted far enough to panic: not the accelerator
        ("auto", "kvm", "workload", False),
    ],
)
def test_only_an_auto_chosen_kvm_that_never_booted_is_retried(requested, used, result, retry) -> None:
    assert vm.retry_with_tcg(requested, used, outcome(NO_STATUS, result, used)) is retry


def test_run_retries_a_stuck_kvm_boot_once_with_tcg(tmp_path: Path, monkeypatch, capsys) -> None:
    from vngtasks import accel, arches

    s = make(tmp_path)
    host = vm.Host(arch=arches.host(), memory_mib=4096, vng="vng", environ={})
    tried: list[str] = []

    def fake_attempt(settings, kernel, workload, host, accel_name, *probed):
        tried.append(accel_name)
        ended = outcome(NO_STATUS, "boot-timeout", accel_name) if accel_name == "kvm" else outcome(0)
        return attempted(ended, [], None)

    monkeypatch.setattr(vm.Host, "current", classmethod(lambda cls: host))
    monkeypatch.setattr(accel, "qemu_binary", lambda arch: "qemu")
    monkeypatch.setattr(accel, "choose", lambda *args, **kwargs: accel.Choice("kvm", ""))
    monkeypatch.setattr(vm, "attempt", fake_attempt)
    assert vm.run(s, Path("/boot/vmlinuz"), "true") == 0
    assert tried == ["kvm", "tcg"]
    assert "retrying once with TCG" in capsys.readouterr().err
    assert json.loads((s.log_dir / runrecord.RUN_JSON).read_text())["accel"] == "tcg"


def test_a_guest_kvm_stopped_sends_this_host_boots_later_runs_to_tcg_at_once(tmp_path: Path, monkeypatch, capsys):
    """The probe guest ran under KVM, the kernel did not (QEMU: "KVM internal error"): the run retries under TCG,
    and the host's probe answer says KVM is unusable, so the next run does not try KVM (nor probe) again."""
    from vngtasks import accel, arches, hostprobe

    s = make(tmp_path)
    host = vm.Host(arch=arches.host(), memory_mib=4096, vng="vng", environ={})
    tried: list[str] = []

    def fake_attempt(settings, kernel, workload, host, accel_name, *probed):
        tried.append(accel_name)
        stopped = replace(outcome(NO_STATUS, "kvm-error", "kvm"), kvm_error="KVM internal error. Suberror: 1")
        return attempted(stopped if accel_name == "kvm" else outcome(0), [], None)

    monkeypatch.setattr(vm.Host, "current", classmethod(lambda cls: host))
    monkeypatch.setattr(accel, "qemu_binary", lambda arch: "qemu")
    monkeypatch.setattr(accel, "kvm_problem", lambda arch: None)  # the probe guest ran
    monkeypatch.setattr(hostprobe, "_boot_id", lambda: "one-boot")
    monkeypatch.setattr(vm, "attempt", fake_attempt)
    assert vm.run(s, Path("/boot/vmlinuz"), "true") == 0
    assert tried == ["kvm", "tcg"] and "kvm-error under KVM picked by accel=auto: retrying" in capsys.readouterr().err
    assert vm.run(s, Path("/boot/vmlinuz"), "true") == 0
    assert tried == ["kvm", "tcg", "tcg"]
    said = "KVM unusable (a guest stopped under KVM after the probe guest ran: KVM internal error. Suberror: 1)"
    assert said in capsys.readouterr().err


def test_guest_files_are_read_only_when_regular_never_through_links_and_capped(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / "status")  # a guest-made FIFO would block a plain read forever
    assert files.read_regular(run_dir / "status", 100) is None and health.reported_status(run_dir) is None
    secret = tmp_path / "host-secret"
    secret.write_text("0\n")
    (run_dir / "release").symlink_to(secret)
    assert files.read_regular(run_dir / "release", 100) is None
    (run_dir / "dmesg").write_bytes(b"x" * 5000)
    assert files.read_regular(run_dir / "dmesg", 4096) == b"x" * 4096
    (run_dir / "dir").mkdir()
    assert files.read_regular(run_dir / "dir", 100) is None
    assert files.read_regular(run_dir / "missing", 100) is None


@pytest.mark.parametrize(
    ("text", "status"),
    # A status being written reads "2" or "25" before its whole line "255\n": not one yet.
    [("0\n", 0), ("3\n", 3), ("255\n", 255), ("25", None), ("", None), ("256\n", None), ("-1\n", None), ("x\n", None)],
)
def test_a_reported_status_is_an_exit_status_or_nothing(tmp_path: Path, text: str, status: int | None) -> None:
    (tmp_path / "status").write_text(text)
    assert health.reported_status(tmp_path) == status


def test_the_guest_clock_is_read_with_suspicion() -> None:
    assert health.guest_seconds("12.34") == 12.34
    assert [health.guest_seconds(t) for t in ("nan", "-5", "1e300", "", "12 s")] == [None] * 5
    dmesg = b"<5>[    0.000000] Linux version 6.12\n<6>[    2.311646] Run /usr/lib/virtme-ng-init as init process\n"
    assert health.init_started(dmesg) == 2.311646
    assert health.init_started(dmesg.replace(b"<6>", b"")) == 2.311646
    assert health.init_started(b"[ 1.0] Run /x as init process; and more\n") is None
    assert health.init_started(b"\xff\xfe not a log") is None


def test_phases_add_up_to_the_run() -> None:
    marks = Marks(probe=0.07, vng=100.0, started=112.0, status=113.5, ended=114.0, guest_uptime=9.0, guest_init=2.5)
    phases = dict(marks.phases())
    assert phases == {"probe": 0.07, "vng-start": 3.0, "kernel": 2.5, "init": 6.5, "workload": 1.5, "shutdown": 0.5}
    assert sum(v for k, v in phases.items() if k != "probe") == pytest.approx(114.0 - 100.0)
    # A guest clock that cannot be (init after the workload began, a kernel that started before vng) is left out.
    odd = Marks(probe=0.0, vng=100.0, started=101.0, status=102.0, ended=102.0, guest_uptime=9.0, guest_init=9.5)
    assert dict(odd.phases()).keys() == {"probe", "workload", "shutdown"}


def test_links_the_guest_placed_in_log_dir_are_replaced_never_written_through(tmp_path: Path) -> None:
    """log-dir is the workspace by default, which the guest writes: a link there to a host file (or to a
    file that does not exist yet) must not make the host write that file."""
    s = make(tmp_path)
    victim, lock_victim, created = tmp_path / "victim", tmp_path / "lock-victim", tmp_path / "created"
    victim.write_text("precious\n")
    lock_victim.write_text("also precious\n")
    (s.log_dir / runrecord.DMESG_LOG).symlink_to(victim)
    (s.log_dir / runrecord.CONSOLE_LOG).symlink_to(created)
    (s.log_dir / runrecord.RUN_JSON).symlink_to(victim)
    (s.log_dir / runrecord.LOGS_LOCK).symlink_to(lock_victim)
    run = attempted(outcome(0), BOOT_LOG[:3], raw_dmesg(BOOT_LOG[:3]))
    assert runrecord.conclude(s, Path("/boot/vmlinuz"), run, {}) == 0
    assert victim.read_text() == "precious\n" and lock_victim.read_text() == "also precious\n"
    assert not created.exists()
    for name in (runrecord.DMESG_LOG, runrecord.CONSOLE_LOG, runrecord.RUN_JSON, runrecord.LOGS_LOCK):
        assert (s.log_dir / name).is_file() and not (s.log_dir / name).is_symlink(), name
