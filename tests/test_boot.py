"""Real VMs: a distro kernel booted under QEMU on this machine (TCG when KVM lies)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import FAKE_WARNING, ROOT, WARN_WORKLOAD, assert_at_its_line_of_lkdtm, user_environment
from linux_remote import MOUNT_DEBUGFS, PROVOKE, PROVOKE_THREE

from vngtasks import kernels

pytestmark = pytest.mark.slow

QUIET = ("--verbose", "false")


def processes_under(path: Path) -> list[str]:
    """Command lines of the processes that name `path` (a run's vng, virtme-run and QEMU do)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in text:
            found.append(text)
    return found


def qemu_processes_under(path: Path) -> list[str]:
    return [text for text in processes_under(path) if "qemu-system" in text]


@pytest.fixture(scope="session")
def distro_kernel() -> Path:
    return kernels.host_kernel()  # fails (not skips) where no distro kernel is installed


@pytest.fixture(params=["distro", "tiny"])
def any_kernel(request: pytest.FixtureRequest) -> Path:
    """The distro kernel (modules in an initramfs), then the tests' tiny build (all built in, no ACPI
    extras): what every health check must work on."""
    if request.param == "distro":
        return request.getfixturevalue("distro_kernel")
    return request.getfixturevalue("tiny_build").entry


def test_status_files_and_environment_cross_the_vm(cli, tmp_path: Path, workspace: Path, any_kernel: Path):
    """Also, as GitHub runs a `run:` step (`bash -eo pipefail`): a failing pipeline skips what depends on it, a
    failing command ends the script with its status."""
    github = tmp_path / "runner-files"
    github.mkdir()
    output = github / "output"
    output.touch()
    workload = (
        'echo hi > out.txt; echo "answer=$VNGTASKS_TEST_VALUE" >> "$GITHUB_OUTPUT";'
        " (false | true) && echo pipefail-is-off; echo reached; (exit 3); echo not-reached"
    )
    done = cli(
        "boot", "--kernel", str(any_kernel), *QUIET, "--", workload,
        env={"GITHUB_OUTPUT": str(output), "VNGTASKS_TEST_VALUE": "a b $c 'd'"},
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stdout.split() == ["reached"], done.stdout
    assert (workspace / "out.txt").read_text() == "hi\n"
    assert output.read_text() == "answer=a b $c 'd'\n"


def test_a_log_file_keeps_what_came_before_the_vm(cli, tmp_path: Path, workspace: Path, distro_kernel: Path):
    """`invoke boot ... > log 2>&1`: QEMU reopens the guest's stdout and stderr (virtme-ng's `file`
    chardevs on /proc/self/fd/1 and /2) with O_TRUNC, which would erase the log up to the boot.
    Also: what a program writes to /dev/kmsg (a line that reads like a kernel warning) is not the kernel's,
    and fails nothing."""
    log_file = tmp_path / "boot.log"
    with log_file.open("w") as out:
        out.write("written before the VM\n")
        out.flush()
        workload = f"echo guest-says-hi; echo '{FAKE_WARNING}' > /dev/kmsg"
        done = cli("boot", "--kernel", str(distro_kernel), *QUIET, "--", workload, output=out)
    text = log_file.read_text()
    assert done.returncode == 0, text
    assert text.startswith("written before the VM\n") and "\0" not in text
    assert "guest-says-hi" in text
    assert run_record(workspace)["splats"] == [] and FAKE_WARNING in (workspace / "vng-dmesg.log").read_text()


def test_read_only_workspace_and_accel_auto(cli, workspace: Path, tiny_build):
    from vngtasks import accel, arches

    problem = accel.kvm_problem(arches.host())
    done = cli("boot", "--kernel", str(tiny_build.entry), *QUIET, "--workspace-rw", "false", "--", "touch ro-probe")
    # vng gives unshared paths a throwaway overlay: the write works inside, never reaches the host.
    assert done.returncode == 0, done.stderr
    assert not (workspace / "ro-probe").exists()
    if problem is not None:
        warnings = [line for line in done.stderr.splitlines() if "falling back to TCG" in line]
        assert len(warnings) == 1 and problem in warnings[0], done.stderr
    # A read-only workspace under /var/tmp, which virtme-ng's init covers with a tmpfs: shared read-only, seen.
    with tempfile.TemporaryDirectory(dir="/var/tmp") as covered:
        (Path(covered) / "seen").write_text("here\n")
        flags = ("--workspace-rw", "false", "--log-dir", str(workspace))
        done = cli("boot", "--kernel", str(tiny_build.entry), *QUIET, *flags,
                   "--", "cat seen; touch written || echo read-only", cwd=Path(covered))  # fmt: skip
        assert (done.returncode, done.stdout.split()[-2:]) == (0, ["here", "read-only"]), done.stderr[-3000:]
        assert not (Path(covered) / "written").exists()


def test_boot_timeout_gives_no_status(cli, home: Path, workspace: Path, distro_kernel: Path):
    done = cli("boot", "--kernel", str(distro_kernel), *QUIET, "--boot-timeout", "2", "--", "true")
    assert done.returncode == 125, done.stderr
    assert "boot-timeout" in done.stderr
    assert run_record(workspace)["result"] == "boot-timeout"
    assert qemu_processes_under(home) == []


def run_record(workspace: Path) -> dict:
    return json.loads((workspace / "vng-run.json").read_text())


def test_a_panic_ends_the_run_at_once_with_its_console_lines(cli, home: Path, workspace: Path, any_kernel: Path):
    done = cli("boot", "--kernel", str(any_kernel), *QUIET, "--", "echo c > /proc/sysrq-trigger")
    assert done.returncode == 125, done.stderr
    assert "the guest kernel panicked" in done.stderr
    assert "Kernel panic - not syncing: sysrq triggered crash" in done.stderr
    assert "Kernel panic - not syncing" in (workspace / "vng-console.log").read_text()
    record = run_record(workspace)
    assert (record["result"], record["status"], record["workload_status"]) == ("panic", 125, None)
    assert {"title": "kernel panic: sysrq triggered crash", "count": 1} in record["crashes"]
    assert "vngtasks: crash: kernel panic: sysrq triggered crash" in done.stderr
    assert record["boot_seconds"] > 0 and record["release"]
    assert qemu_processes_under(home) == []


def test_a_panic_with_vmcore_on_failure_leaves_a_dump_drgn_opens(cli, home: Path, workspace: Path, tiny_build):
    """LKDTM's PANIC with `vmcore on-failure`: QEMU dumps the waiting guest (panic=0) into log-dir/vmcore, with the
    entry's vmlinux beside it; drgn (the tests' extra) opens both and reads the release the guest printed."""
    import drgn

    # QMP's socket is in the run directory under cache-dir: 107 bytes at most, which pytest's paths exceed. Under
    # /var/lib: the guest sees it (through vng's /var overlay; /var/tmp is a tmpfs of virtme-ng's init).
    Path("/var/lib/vngtasks-tests").mkdir(parents=True, exist_ok=True)
    short = Path(tempfile.mkdtemp(prefix="vmc-", dir="/var/lib/vngtasks-tests"))
    panic = f"{MOUNT_DEBUGFS}; uname -r; echo PANIC > {PROVOKE}"
    args = ("--vmcore", "on-failure", "--memory", "256M", "--cache-dir", str(short), "--log-dir", "logs")
    try:
        done = cli("boot", "--kernel", str(tiny_build.entry), *QUIET, *args, "--", panic)
    finally:
        assert qemu_processes_under(short) == []
        shutil.rmtree(short)
    assert done.returncode == 125, done.stderr[-3000:]
    release = done.stdout.split()[0]
    logs = workspace / "logs"
    assert "vmcore: panic: dumping the guest's memory" in done.stderr
    assert f"drgn -c {logs / 'vmcore'} -s {logs / 'vmlinux'}" in done.stderr, done.stderr[-3000:]
    record = run_record(logs)
    assert (record["result"], record["vmcore"]) == ("panic", str(logs / "vmcore"))
    assert 200 * 2**20 < (logs / "vmcore").stat().st_size < 300 * 2**20  # ELF: the guest's memory
    prog = drgn.Program()
    prog.set_core_dump(str(logs / "vmcore"))
    prog.load_debug_info([str(logs / "vmlinux")])
    assert prog["init_uts_ns"].name.release.string_().decode() == release == record["release"]
    assert qemu_processes_under(home) == []


def test_a_run_timeout_kills_the_vm_and_with_vmcore_on_failure_dumps_it_first(
    cli, home: Path, workspace: Path, tiny_build
):
    """One boot for both: the timeout's stop is the same with or without a dump before it."""
    Path("/var/lib/vngtasks-tests").mkdir(parents=True, exist_ok=True)
    short = Path(tempfile.mkdtemp(prefix="vmc-", dir="/var/lib/vngtasks-tests"))  # see the panic's test above
    args = ("--vmcore", "on-failure", "--memory", "256M", "--cache-dir", str(short), "--run-timeout", "3")
    started = time.monotonic()
    try:
        done = cli("boot", "--kernel", str(tiny_build.entry), *QUIET, *args, "--", "sleep 600")
    finally:
        shutil.rmtree(short)
    assert time.monotonic() - started < 120
    assert done.returncode == 124 and "vmcore: run-timeout: dumping the guest's memory" in done.stderr, done.stderr
    assert "run-timeout: the workload ran over 3 s; VM stopped" in done.stderr
    assert run_record(workspace)["vmcore"] == str(workspace / "vmcore")
    assert (workspace / "vmcore").stat().st_size > 200 * 2**20 and (workspace / "vmlinux").is_file()
    assert qemu_processes_under(home) == []


def lkdtm_warning(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("WARNING: CPU: ") and " lkdtm_WARNING+" in line]


def test_a_kernel_warning_fails_a_passing_workload(cli, workspace: Path, tiny_build, kernel_tree):
    """LKDTM's WARNING (twice), BUG and EXCEPTION, after a program wrote a line like a WARNING to /dev/kmsg: only
    the kernel's are splats, and crashes: three, titled by the lkdtm functions, the WARNING counted twice."""
    workload = "; ".join([f"echo '{FAKE_WARNING}' > /dev/kmsg", WARN_WORKLOAD, PROVOKE_THREE, "true"])
    done = cli("boot", "--kernel", str(tiny_build.entry), *QUIET, "--", workload)
    assert done.returncode == 123, done.stderr
    assert "splat-check" in done.stderr and lkdtm_warning(done.stderr.splitlines()), done.stderr
    assert "lkdtm_WARNING" in (workspace / "vng-console.log").read_text()
    dmesg = (workspace / "vng-dmesg.log").read_text()
    assert "Linux version" in dmesg and "lkdtm_WARNING" in dmesg and FAKE_WARNING in dmesg
    record = run_record(workspace)
    assert (record["result"], record["workload_status"], record["status"]) == ("workload", 0, 123)
    # Two WARNINGs (other PIDs): two splat lines, first of all; one crash counted twice (below).
    assert lkdtm_warning(record["splats"]) == record["splats"][:2] and FAKE_WARNING not in record["splats"]
    assert record["accel"] in ("kvm", "tcg")
    crashes = json.loads((workspace / "crashes.json").read_text())["crashes"]
    assert [(c["title"], c["kind"], c["count"]) for c in crashes] == [
        ("WARNING in lkdtm_WARNING", "warning", 2),
        ("kernel BUG in lkdtm_BUG", "bug", 1),
        ("BUG: kernel NULL pointer dereference in lkdtm_EXCEPTION", "oops", 1),
    ], (workspace / "vng-console.log").read_text()[-6000:]
    assert [c["frames"][0]["function"] for c in crashes] == ["lkdtm_WARNING", "lkdtm_BUG", "lkdtm_EXCEPTION"]
    # Symbolized with the entry's own debug info: each at its line of drivers/misc/lkdtm/bugs.c, as v6.12 has it.
    for crash in crashes:
        assert_at_its_line_of_lkdtm(crash, kernel_tree)
    assert record["crashes"] == [{"title": c["title"], "count": c["count"]} for c in crashes]
    assert "vngtasks: crash: WARNING in lkdtm_WARNING (drivers/misc/lkdtm/bugs.c:" in done.stderr
    assert "kernel BUG at drivers/misc/lkdtm/bugs.c:" in (workspace / "crash-report.txt").read_text()


def test_an_allowed_warning_and_a_log_dir(cli, tmp_path: Path, workspace: Path, tiny_build):
    summary = tmp_path / "step-summary.md"
    done = cli(
        "boot", "--kernel", str(tiny_build.entry), *QUIET, "--splat-allow", r" lkdtm_WARNING\+",
        "--log-dir", "logs", "--", WARN_WORKLOAD, env={"GITHUB_STEP_SUMMARY": str(summary)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = run_record(workspace / "logs")
    assert (record["status"], record["splats"]) == (0, [])
    assert (workspace / "logs" / "vng-dmesg.log").is_file() and not (workspace / "vng-run.json").exists()
    assert f"| {record['release']} (" in summary.read_text()


def test_a_kernel_that_cannot_boot_fails_fast(cli, home: Path, tmp_path: Path, workspace: Path, distro_kernel: Path):
    broken = tmp_path / "vmlinuz-truncated"
    broken.write_bytes(distro_kernel.read_bytes()[:1_000_000])
    started = time.monotonic()
    done = cli("boot", "--kernel", str(broken), *QUIET, "--boot-timeout", "120", "--", "true")
    assert done.returncode == 125, done.stderr
    assert time.monotonic() - started < 120 + 30
    assert run_record(workspace)["result"] in ("no-status", "boot-timeout", "panic")
    assert qemu_processes_under(home) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stopping_signal_ends_the_vm_and_leaves_no_run_behind(home: Path, workspace: Path, tiny_build, sig):
    argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), "boot", "--kernel", str(tiny_build.entry), *QUIET, "--"]
    running = subprocess.Popen(
        [*argv, "sleep 600"], cwd=workspace, env=user_environment(home), stderr=subprocess.PIPE, text=True
    )
    runs = home / ".cache" / "vngtasks" / "runs"
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/shared/started")):  # the workload is running: vng, QEMU and all are up
        assert running.poll() is None and time.monotonic() < deadline, running.communicate()[1][-3000:]
        time.sleep(0.2)
    (run_dir,) = (path for path in runs.iterdir() if path.is_dir())  # beside its lock file
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700  # it holds the host's environment
    running.send_signal(sig)
    _, err = running.communicate(timeout=60)
    assert running.returncode == 128 + sig, err[-3000:]
    assert err.strip().splitlines()[-1] == f"vngtasks: stopped by {sig.name}; the VM and its run directory are gone"
    deadline = time.monotonic() + 5
    while processes_under(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_under(home) == [] and list(runs.iterdir()) == []  # no vng, virtme-run or QEMU of the run


def test_a_sigkilled_invoke_boot_leaves_no_qemu_and_no_run(home: Path, workspace: Path, tiny_build):
    """SIGKILL runs no `finally`: the guard process (vngtasks/reaper.py) stops the VM's session and removes the
    run directory."""
    argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), "boot", "--kernel", str(tiny_build.entry), *QUIET]
    running = subprocess.Popen([*argv, "--", "sleep 600"], cwd=workspace, env=user_environment(home))
    deadline = time.monotonic() + 120
    while not qemu_processes_under(home):  # mid-boot: QEMU is up
        assert running.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    running.kill()
    running.wait()
    runs = home / ".cache" / "vngtasks" / "runs"
    deadline = time.monotonic() + 20  # the guard stops the session (SIGTERM, SIGKILL 3 s on), then removes
    while (processes_under(home) or list(runs.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_under(home) == [] and list(runs.iterdir()) == []


def test_a_hostile_guest_cannot_hang_the_host(cli, workspace: Path, tiny_build):
    """The guest links its status to a FIFO on the host and its release to a host file, then kills the
    script that would report: the host reads neither, says the guest never reported (125), and ends.
    (9p refuses to let the guest make the FIFO itself; a link's target is only text to the guest.)"""
    fifo = workspace.parent / "host-fifo"
    os.mkfifo(fifo)
    hostile = f'd=$(dirname "$0"); ln -s {fifo} "$d/status"; ln -sf /etc/shadow "$d/release"; kill -9 $PPID'
    started = time.monotonic()
    done = cli("boot", "--kernel", str(tiny_build.entry), *QUIET, "--", hostile, timeout=300)
    assert done.returncode == 125, done.stderr
    assert "the VM ended without reporting a workload status" in done.stderr
    record = run_record(workspace)
    assert record["result"] == "no-status" and "root:" not in json.dumps(record)
    assert time.monotonic() - started < 240


def test_a_guest_that_reports_but_does_not_power_off_is_stopped(cli, workspace: Path, tiny_build):
    """The workload writes its own status line, then keeps the guest up: the host waits the grace
    period after the status, stops the VM and keeps the reported status."""
    lingering = 'echo 7 > "$(dirname "$0")/status"; sleep 600'
    started = time.monotonic()
    done = cli("boot", "--kernel", str(tiny_build.entry), *QUIET, "--", lingering, timeout=400)
    assert done.returncode == 7, done.stderr
    assert "the guest did not power off within 10 s of its status: VM stopped" in done.stderr
    assert time.monotonic() - started < 300


def test_two_runs_sharing_a_log_dir_are_each_judged_on_their_own_console(home: Path, tmp_path: Path, tiny_build):
    """Run A logs a kernel warning, run B does not, both at once with one log-dir: A fails (123), B passes."""
    logs = tmp_path / "logs"
    runs = {}
    for name, workload in (("warns", f"sleep 2; {WARN_WORKLOAD}; sleep 4"), ("clean", "sleep 6")):
        (tmp_path / name).mkdir()
        argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), "boot", "--kernel", str(tiny_build.entry), *QUIET]
        argv += ["--log-dir", str(logs), "--", workload]
        env = user_environment(home)
        runs[name] = subprocess.Popen(argv, cwd=tmp_path / name, env=env, stderr=subprocess.PIPE, text=True)
    errors = {name: run.communicate(timeout=600)[1] for name, run in runs.items()}
    assert runs["warns"].returncode == 123, errors["warns"][-3000:]
    assert runs["clean"].returncode == 0, errors["clean"][-3000:]
    record = json.loads((logs / "vng-run.json").read_text())  # the last to finish: its files agree
    console = (logs / "vng-console.log").read_text()
    assert record["console"] == str(logs / "vng-console.log")
    assert ("lkdtm_WARNING" in console) == (record["status"] == 123)
    published = sorted(p.name for p in logs.iterdir())
    warned = record["status"] == 123
    report = ["crash-report.txt"] if warned else []
    assert published == [".vng-logs.lock", *report, "crashes.json", "vng-console.log", "vng-dmesg.log", "vng-run.json"]
    titles = [crash["title"] for crash in json.loads((logs / "crashes.json").read_text())["crashes"]]
    assert titles == [crash["title"] for crash in record["crashes"]] == (["WARNING in lkdtm_WARNING"] if warned else [])
    assert (logs / ".vng-logs.lock").stat().st_size == 0
