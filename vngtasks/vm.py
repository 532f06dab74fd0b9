"""Booting a kernel with vng and running the workload inside, supervised from the host.

The guest script (templates/guest.sh.j2) marks two moments in a run directory that
the guest mounts read-write: "started" when the workload begins and "status" when
it ends. The host therefore knows, without parsing the console, whether the VM
booted, whether it is over its time, and what the workload returned; a VM that
ends without a "status" never reported (panic, stall, no boot).

What the guest left (its console, its files) is read by health.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import IO

from . import accel, arches, health, log, render
from .arches import Arch
from .errors import BAD_INPUT, MISSING_TOOL, NO_STATUS, SPLAT, TIMEOUT, Failure
from .health import GUEST_LINE_BYTES, TAIL_LINES, ConsoleWatch, find_splats, read_guest_file, reported_status, show_tail
from .hostprobe import HostProbes, virtme_ng_init_runs
from .settings import Settings, make_directory, plain_path

POLL_SECONDS = 0.1
# After the workload's status, the guest powers off; a kernel that cannot (no ACPI on x86) or a
# shutdown that hangs is stopped after this long: the run is over, and its files are synced.
SHUTDOWN_GRACE_SECONDS = 10.0
# GitHub's step files: the workload may write them, so their folders are shared rw.
GITHUB_FILES = ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH", "GITHUB_STEP_SUMMARY")
# Not carried into the guest: they describe this shell, or bash refuses to set them.
_HOST_ONLY = frozenset(
    ["PWD", "OLDPWD", "SHLVL", "_", "BASHOPTS", "BASH_VERSINFO", "EUID", "PPID", "SHELLOPTS", "UID", "GROUPS"]
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

CONSOLE_LOG = "vng-console.log"
DMESG_LOG = "vng-dmesg.log"
LOGS_LOCK = ".vng-logs.lock"  # held while a run publishes its logs into log-dir
RUN_JSON = "vng-run.json"
PANIC_GRACE_SECONDS = 5.0  # panic=-1 ends the VM at once; stop it ourselves after this
SUMMARY_HEADER = "| kernel | accel | boot (s) | workload (s) | status | splats |\n|---|---|---|---|---|---|\n"


@dataclass(frozen=True)
class Host:
    """What this machine brings to a run, read once (tests pass their own)."""

    arch: Arch
    memory_mib: int
    vng: str
    environ: Mapping[str, str]

    @classmethod
    def current(cls) -> Host:
        return cls(arches.host(), host_memory_mib(), vng_program(), dict(os.environ))


@dataclass(frozen=True)
class HostSide:
    """What the host's probes decided for this run's command line (hostprobe.py), and what they cost."""

    force_9p: bool
    native_init: bool
    probe_seconds: float


@dataclass(frozen=True)
class Boot:
    """Everything one VM run needs, decided before anything starts."""

    settings: Settings
    kernel: Path
    accel: str
    run_dir: Path
    force_9p: bool = False  # vng's virtiofsd cannot start here (see hostprobe.py)
    native_init: bool = True  # virtme-ng-init is built for this host's arch (see hostprobe.py)

    @property
    def shared(self) -> Path:
        """The part of the run directory the guest may write (the rest is the host's alone)."""
        return self.run_dir / "shared"

    @property
    def guest_script(self) -> Path:
        return self.shared / "guest.sh"

    @property
    def console_log(self) -> Path:
        """This run's console, written by QEMU: judged, then published to log-dir (see publish)."""
        return self.run_dir / "console.log"


@dataclass(frozen=True)
class Attempt:
    """One VM run as it ended, with its own console and dmesg (none of another run's)."""

    outcome: Outcome
    console: bytes
    dmesg: bytes | None  # None: the guest wrote none (it never got to the end of its workload)


@dataclass(frozen=True)
class Outcome:
    """How one VM run ended, as the host saw it."""

    accel: str  # "kvm" or "tcg": what this run used
    status: int
    result: str  # "workload", "run-timeout", "boot-timeout", "panic" or "no-status"
    boot_seconds: float | None  # vng start to workload start; None: never started
    workload_seconds: float | None
    release: str = ""  # the guest's `uname -r`, when it got that far
    phases: tuple[tuple[str, float], ...] = ()  # where the time went (PHASES), as far as known


@dataclass
class Marks:
    """Moments of one run on the host's monotonic clock, and the guest's clock at workload start."""

    probe: float  # seconds spent deciding the accelerator and the shared-directory transport
    vng: float = 0.0  # vng started
    started: float | None = None  # the guest's `started` appeared
    status: float | None = None  # the guest's `status` appeared
    ended: float | None = None  # vng ended
    guest_uptime: float | None = None  # guest seconds since its kernel started, at workload start
    guest_init: float | None = None  # guest seconds at which its kernel ran init (from its dmesg)
    reported: int | None = None  # the workload's exit status, as the guest wrote it

    @property
    def boot_seconds(self) -> float | None:
        """vng start to workload start; None: the workload never started."""
        return None if self.started is None else self.started - self.vng

    def phases(self) -> tuple[tuple[str, float], ...]:
        """PHASES, each where both its ends are known; the guest's two numbers only when they fit."""
        kernel_at = None
        if self.started is not None and self.guest_uptime is not None:
            kernel_at = self.started - self.guest_uptime
        init = self.guest_init if self.guest_init is not None and self.guest_init <= (self.guest_uptime or 0) else None
        spans = {
            "probe": (0.0, self.probe),
            "vng-start": (self.vng, kernel_at if kernel_at is not None and kernel_at >= self.vng else None),
            "kernel": (0.0, init),
            "init": (init, self.guest_uptime),
            "workload": (self.started, self.status),
            "shutdown": (self.status, self.ended),
        }
        return tuple(
            (name, round(end - start, 2))
            for name, (start, end) in spans.items()
            if start is not None and end is not None
        )


@dataclass(frozen=True)
class Record:
    """The run as reported: vng-run.json and the step summary row."""

    kernel: Path
    release: str
    arch: str
    outcome: Outcome
    status: int  # the task's exit status (the workload's, or SPLAT)
    splats: tuple[str, ...]


def vng_program() -> str:
    """vng from this Python's environment first (a venv need not be activated)."""
    beside = Path(sys.executable).parent / "vng"
    return str(beside) if beside.exists() else "vng"


def host_memory_mib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def memory_mib(settings: Settings, accel_name: str, host_mib: int) -> int:
    if settings.memory_mib is not None:
        return settings.memory_mib
    default = host_mib * 9 // 10
    if accel_name == "tcg":
        return min(default, settings.arch.tcg_memory_cap_mib)
    return default


def qemu_options(settings: Settings, accel_name: str, console_log: Path) -> list[str]:
    """Our QEMU options, then the user's; `console_log` is a plain path (settings.plain_path): no "," for QEMU."""
    user = list(settings.qemu_opts)
    if accel_name != "kvm":
        user = _without_cpu_host(user)
    return render.argv("qemu.argv.j2", arch=settings.arch, accel=accel_name, user_opts=user, console_log=console_log)


def _without_cpu_host(opts: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for i, opt in enumerate(opts):
        if skip:
            skip = False
        elif opt in ("-cpu", "--cpu") and i + 1 < len(opts) and opts[i + 1].startswith("host"):
            log.info(f"qemu-opts: dropping '-cpu {opts[i + 1]}': it needs KVM")
            skip = True
        else:
            kept.append(opt)
    return kept


def shared_dirs(settings: Settings, run_dir: Path, environ: Mapping[str, str]) -> list[Path]:
    """Host directories the guest may write: workspace, extra-rwdirs, GitHub files, the run's shared dir."""
    wanted: list[Path] = [settings.workspace] if settings.workspace_rw else []
    for extra in settings.extra_rwdirs:
        if extra.is_dir():
            wanted.append(extra)
        else:
            log.info(f"extra-rwdirs: skipping {extra}: not a directory")
    wanted += github_dirs(environ)
    wanted.append(run_dir)
    return list(dict.fromkeys(path.resolve() for path in wanted))


def github_dirs(environ: Mapping[str, str]) -> list[Path]:
    """The directories of GitHub's step files that are set: plain paths, as vng shares them."""
    return [plain_path(name, Path(environ[name]).parent.resolve()) for name in GITHUB_FILES if environ.get(name)]


def vng_argv(boot: Boot, host: Host) -> list[str]:
    s = boot.settings
    return render.argv(
        "vng-boot.argv.j2",
        vng=host.vng,
        kernel=boot.kernel,
        arch=s.arch,
        host_arch=host.arch,
        accel=boot.accel,
        cpus=s.cpus,
        memory_mib=memory_mib(s, boot.accel, host.memory_mib),
        network=s.network,
        verbose=s.verbose,
        append=s.append,
        rwdirs=shared_dirs(s, boot.shared, host.environ),
        workdir=s.workspace,
        qemu_opts=qemu_options(s, boot.accel, boot.console_log),
        guest_script=boot.guest_script,
        force_9p=boot.force_9p,
        native_init=boot.native_init,
    )


def guest_environment(environ: Mapping[str, str]) -> bytes:
    """The host environment as NUL-separated NAME=value pairs for the guest to export."""
    pairs = (
        f"{name}={value}"
        for name, value in environ.items()
        if _IDENTIFIER.fullmatch(name) and name not in _HOST_ONLY and "\0" not in value
    )
    return b"".join(pair.encode(errors="surrogateescape") + b"\0" for pair in pairs)


def prepare(boot: Boot, workload: str, environ: Mapping[str, str]) -> None:
    """The run directory, the host's user's alone (0700): the environment in it may hold secrets."""
    boot.run_dir.parent.mkdir(parents=True, exist_ok=True)
    boot.run_dir.mkdir(mode=0o700)
    boot.shared.mkdir(mode=0o700)
    (boot.shared / "workload.sh").write_text(workload + "\n")
    (boot.shared / "environ").write_bytes(guest_environment(environ))
    boot.guest_script.write_text(render.text("guest.sh.j2", run_dir=boot.shared, workdir=boot.settings.workspace))


def new_run_dir(settings: Settings) -> Path:
    return settings.cache_dir / "runs" / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def run(settings: Settings, kernel: Path, workload: str) -> int:
    """Boot `kernel`, run `workload` with bash inside, return the exit status to report."""
    host = Host.current()
    if settings.arch != host.arch:
        raise Failure(
            f"arch: booting {settings.arch.name} on a {host.arch.name} host needs a root filesystem "
            f"of that arch, which vngtasks does not provide yet",
            BAD_INPUT,
        )
    accel.qemu_binary(settings.arch)
    github_dirs(host.environ)  # refused now, before anything is made, if vng could not share them
    make_directory("log_dir", settings.log_dir)
    make_directory("cache_dir", settings.cache_dir)
    probing = time.monotonic()
    probes = HostProbes(settings.cache_dir)
    choice = accel.choose(settings.accel, settings.arch, host.arch, problem_of=probes.kvm_problem)
    host_side = decide_host_side(probes, host, probing)
    if choice.why:
        log.warn(choice.why)
    if not host_side.native_init:
        log.info(f"virtme-ng-init is not built for {host.arch.name}: the guest uses vng's shell init instead")
    attempted = attempt(settings, kernel, workload, host, choice.accel, host_side)
    if retry_with_tcg(settings.accel, choice.accel, attempted.outcome):
        log.warn("boot-timeout under KVM picked by accel=auto: retrying once with TCG")
        attempted = attempt(settings, kernel, workload, host, "tcg", dataclasses.replace(host_side, probe_seconds=0.0))
    return conclude(settings, kernel, attempted, host.environ)


def dry_run_line(settings: Settings, kernel: Path) -> str:
    """The vng command line `run` would start, decided as `run` decides it but without probing, making
    or writing anything (the KVM answer kept for this host boot, else whether /dev/kvm opens)."""
    host = Host.current()
    probes = HostProbes(settings.cache_dir, write=False)
    if f"kvm-{host.arch.name}" not in probes.answers and settings.accel == "auto":
        log.info("dry run: no KVM probe answer kept for this host boot: KVM assumed to work where /dev/kvm opens")
    choice = accel.choose(settings.accel, settings.arch, host.arch, problem_of=probes.known_kvm_problem)
    boot = new_boot(settings, kernel, choice.accel, decide_host_side(probes, host, time.monotonic()))
    return shlex.join(vng_argv(boot, host))


def decide_host_side(probes: HostProbes, host: Host, probing_since: float) -> HostSide:
    """How directories are shared and which init the guest runs, from the probes (see hostprobe.py)."""
    return HostSide(
        force_9p=probes.force_9p(child_environment(host.environ)["PATH"]),
        native_init=virtme_ng_init_runs(host.arch),
        probe_seconds=time.monotonic() - probing_since,
    )


def new_boot(settings: Settings, kernel: Path, accel_name: str, host_side: HostSide) -> Boot:
    """A boot of `kernel` with a new run directory (named here, made by prepare)."""
    return Boot(
        settings=settings,
        kernel=kernel,
        accel=accel_name,
        run_dir=new_run_dir(settings),
        force_9p=host_side.force_9p,
        native_init=host_side.native_init,
    )


def retry_with_tcg(requested: str, used: str, outcome: Outcome) -> bool:
    """A KVM that auto chose but that never booted the guest gets one TCG retry."""
    return requested == "auto" and used == "kvm" and outcome.result == "boot-timeout"


def attempt(
    settings: Settings,
    kernel: Path,
    workload: str,
    host: Host,
    accel_name: str,
    host_side: HostSide,
) -> Attempt:
    boot = new_boot(settings, kernel, accel_name, host_side)
    prepare(boot, workload, host.environ)
    marks = Marks(probe=host_side.probe_seconds)
    try:
        outcome = supervise(boot, vng_argv(boot, host), child_environment(host.environ), marks)
        report = health.read_guest_report(boot.shared)
        marks.guest_uptime = report.uptime
        marks.guest_init = health.init_started(report.dmesg or b"")
        phases = marks.phases() if outcome.result == "workload" else ()
        outcome = dataclasses.replace(outcome, release=report.release, phases=phases)
        return Attempt(outcome, health.read_console(boot.console_log), report.dmesg)
    finally:
        shutil.rmtree(boot.run_dir, ignore_errors=True)


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    # vng starts virtme-run and virtme-configkernel through PATH: this environment's bin/ first.
    bindir = str(Path(sys.executable).parent)
    return {**environ, "PATH": f"{bindir}{os.pathsep}{environ.get('PATH', os.defpath)}"}


def supervise(boot: Boot, argv: list[str], env: Mapping[str, str], marks: Marks) -> Outcome:
    """Run vng until the VM ends, is over its time or panics; `marks` notes when each thing happened."""
    boot.console_log.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env, start_new_session=True, **relayed_streams())
    except FileNotFoundError:
        raise Failure(f"{argv[0]} not found: install virtme-ng (`invoke deps` does)", MISSING_TOOL) from None
    relays = relay(process)
    marks.vng = time.monotonic()
    console = ConsoleWatch(boot.console_log)
    try:
        while process.poll() is None:
            time.sleep(POLL_SECONDS)
            now = time.monotonic()
            note_progress(boot, marks, now)
            why = overdue(boot.settings, marks, console, now)
            if why is not None:
                stop_session(process)
                return stopped(boot, marks, why, now)
            if marks.status is not None and now - marks.status > SHUTDOWN_GRACE_SECONDS:
                log.info(f"the guest did not power off within {SHUTDOWN_GRACE_SECONDS:g} s of its status: VM stopped")
                break
        marks.ended = time.monotonic()
        return ended(boot, marks, console, process.returncode)
    finally:
        stop_session(process)
        for thread in relays:
            thread.join(timeout=5)


def note_progress(boot: Boot, marks: Marks, now: float) -> None:
    """Mark the workload's start, then its end, as the guest reports them in the run directory."""
    if marks.started is None:
        started = read_guest_file(boot.shared / "started", GUEST_LINE_BYTES)
        if started is not None:  # it may still be empty: its line is read again at the end
            marks.started = now
            log.info(f"booted in {now - marks.vng:.1f} s ({boot.accel}); workload running")
    elif marks.status is None:
        marks.reported = reported_status(boot.shared)
        marks.status = now if marks.reported is not None else None


def overdue(s: Settings, marks: Marks, console: ConsoleWatch, now: float) -> str | None:
    """Why the VM must be stopped now, if it must: "panic", "boot-timeout" or "run-timeout"."""
    if console.panicked_for(now) > PANIC_GRACE_SECONDS:
        return "panic"
    if marks.started is None and s.boot_timeout and now - marks.vng > s.boot_timeout:
        return "boot-timeout"
    if marks.started is not None and marks.status is None and s.run_timeout and now - marks.started > s.run_timeout:
        return "run-timeout"
    return None


def stopped(boot: Boot, marks: Marks, why: str, now: float) -> Outcome:
    """The outcome of a VM that `overdue` had stopped."""
    s = boot.settings
    if why == "run-timeout" and marks.started is not None:
        log.warn(f"run-timeout: the workload ran over {s.run_timeout} s; VM stopped")
        return Outcome(boot.accel, TIMEOUT, why, marks.boot_seconds, now - marks.started)
    if why == "panic":
        return failed(boot, why, "the guest kernel panicked and the VM did not end; VM stopped", marks.boot_seconds)
    message = f"boot-timeout: the guest did not start the workload within {s.boot_timeout} s; VM stopped"
    return failed(boot, why, message, None)


def ended(boot: Boot, marks: Marks, console: ConsoleWatch, vng_status: int | None) -> Outcome:
    """The outcome of a VM that ended (or was stopped after its status): the workload's status if reported."""
    if marks.reported is None and marks.started is not None:
        marks.reported = reported_status(boot.shared)
        marks.status = marks.ended if marks.reported is not None else None
    if marks.reported is not None and marks.started is not None and marks.status is not None:
        workload = marks.status - marks.started
        return Outcome(boot.accel, marks.reported, "workload", marks.boot_seconds, workload)
    if console.panicked():
        return failed(boot, "panic", "the guest kernel panicked", marks.boot_seconds)
    message = f"the VM ended without reporting a workload status (vng exit {vng_status})"
    return failed(boot, "no-status", message, marks.boot_seconds)


# virtme-ng gives QEMU /proc/self/fd/1 and /2 as `file` chardevs (the guest's stdout and stderr),
# which QEMU opens again with O_TRUNC: where ours is a regular file (`invoke boot > log 2>&1`),
# everything written to it before the VM started would be erased. vng gets a pipe instead.
def relayed_streams() -> dict[str, int | None]:
    """Popen's stdout and stderr: a pipe in place of each of ours that is a regular file."""
    return {name: subprocess.PIPE if _regular_file(fd) else None for name, fd in (("stdout", 1), ("stderr", 2))}


def relay(process: subprocess.Popen[bytes]) -> list[threading.Thread]:
    """Copy each piped stream to ours as it comes; the threads end when the session's writers do."""
    threads = []
    for pipe, fd in ((process.stdout, 1), (process.stderr, 2)):
        if pipe is not None:
            thread = threading.Thread(target=_copy, args=(pipe, fd), daemon=True)
            thread.start()
            threads.append(thread)
    return threads


def _copy(source: IO[bytes], target: int) -> None:
    with source:
        while chunk := os.read(source.fileno(), 65536):
            view = memoryview(chunk)
            while view:
                view = view[os.write(target, view) :]


def _regular_file(fd: int) -> bool:
    try:
        return S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def failed(boot: Boot, result: str, message: str, boot_seconds: float | None) -> Outcome:
    """Say why the VM failed and show the end of its console."""
    log.warn(message)
    show_tail(boot.console_log)
    return Outcome(boot.accel, NO_STATUS, result, boot_seconds, None)


def guest_release(outcome: Outcome, console_lines: list[str]) -> str:
    """`uname -r` from the guest, else the console banner's, else empty."""
    if outcome.release:
        return outcome.release
    for line in console_lines:
        banner = re.search(r"Linux version (\S+)", line)
        if banner:
            return banner[1]
    return ""


def conclude(settings: Settings, kernel: Path, attempted: Attempt, environ: Mapping[str, str]) -> int:
    """Splat check of this run's own console and dmesg, its logs and vng-run.json published together,
    the step summary: the run's final status."""
    outcome = attempted.outcome
    console_lines = attempted.console.decode(errors="replace").splitlines()
    dmesg_lines = (attempted.dmesg or b"").decode(errors="replace").splitlines()
    splats: list[str] = []
    if settings.splat_check:
        # dmesg is the whole ring buffer; the console also holds what came after it.
        splats = find_splats(dmesg_lines + console_lines, settings.splat_allow)
    status = judge(outcome, splats)
    record = Record(
        kernel=kernel,
        release=guest_release(outcome, console_lines),
        arch=settings.arch.name,
        outcome=outcome,
        status=status,
        splats=tuple(splats),
    )
    publish(settings.log_dir, attempted, record)
    summary = environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        append_summary(Path(summary), record)
    return status


def publish(log_dir: Path, attempted: Attempt, record: Record) -> None:
    """The run's console, dmesg and vng-run.json into log-dir, under one lock: another run sharing the
    log-dir may replace them, but the three always belong to one run."""
    with open(log_dir / LOGS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (log_dir / CONSOLE_LOG).write_bytes(attempted.console)
        if attempted.dmesg is None:
            (log_dir / DMESG_LOG).unlink(missing_ok=True)
        else:
            (log_dir / DMESG_LOG).write_bytes(attempted.dmesg)
        (log_dir / RUN_JSON).write_text(json.dumps(record_json(record, log_dir), indent=2) + "\n")


def judge(outcome: Outcome, splats: list[str]) -> int:
    """The workload's status, or SPLAT when it passed but the kernel splatted."""
    if not splats or outcome.result not in ("workload", "run-timeout"):
        return outcome.status
    if outcome.status == 0:
        log.warn(f"splat-check: the workload passed but the kernel logged {len(splats)} splat line(s):")
    else:
        log.warn(f"splat-check: the kernel logged {len(splats)} splat line(s) (status {outcome.status} kept):")
    print("\n".join(splats[:TAIL_LINES]), file=sys.stderr, flush=True)
    return SPLAT if outcome.status == 0 else outcome.status


def record_json(record: Record, log_dir: Path) -> dict[str, object]:
    outcome = record.outcome
    return {
        "kernel": str(record.kernel),
        "console": str(log_dir / CONSOLE_LOG),  # the console this record judged, published with it
        "release": record.release,
        "arch": record.arch,
        "accel": outcome.accel,
        "boot_seconds": _rounded(outcome.boot_seconds),
        "workload_seconds": _rounded(outcome.workload_seconds),
        "phases": dict(outcome.phases),
        "result": outcome.result,
        "workload_status": outcome.status if outcome.result == "workload" else None,
        "status": record.status,
        "splats": list(record.splats),
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def summary_row(record: Record) -> str:
    """One markdown table row for $GITHUB_STEP_SUMMARY; '|' in values escaped."""
    outcome = record.outcome
    result = "" if outcome.result == "workload" and record.status == outcome.status else f" ({_result_name(record)})"
    cells = [
        f"{record.release or record.kernel.name} ({record.arch})",
        outcome.accel,
        _seconds(outcome.boot_seconds),
        _seconds(outcome.workload_seconds),
        f"{record.status}{result}",
        str(len(record.splats)),
    ]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |\n"


def _result_name(record: Record) -> str:
    return "splat" if record.status == SPLAT and record.outcome.result == "workload" else record.outcome.result


def _seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def append_summary(path: Path, record: Record) -> None:
    """Our table's header once per summary file, then one row per run."""
    try:
        existing = path.read_text()
    except FileNotFoundError:
        existing = ""
    with open(path, "a") as summary:
        if SUMMARY_HEADER not in existing:
            summary.write(("\n" if existing and not existing.endswith("\n") else "") + SUMMARY_HEADER)
        summary.write(summary_row(record))


def stop_session(process: subprocess.Popen[bytes]) -> None:
    """End vng and everything it started (QEMU, virtiofsd), even ones that left its group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        members = list(session_members(process.pid))
        if not members:
            break
        for pid in members:
            _signal(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(session_members(process.pid)):
            process.poll()
            time.sleep(POLL_SECONDS)
    process.poll()


def session_members(sid: int) -> Iterable[int]:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command name: state, ppid, pgrp, session; zombies are already gone.
        if fields[0] != "Z" and int(fields[3]) == sid:
            yield int(stat.parent.name)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
