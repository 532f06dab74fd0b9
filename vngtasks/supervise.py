"""Running vng until the VM ends, is over its time or panics, and telling how it ended.

The guest script (templates/guest.sh.j2) marks two moments in a run directory that the guest
mounts read-write: "started" when the workload begins and "status" when it ends. The host
therefore knows, without parsing the console, whether the VM booted, whether it is over its
time, and what the workload returned; a VM that ends without a "status" never reported (panic,
stall, no boot).

This module knows plain things only (paths, seconds, a process): what a run is for is
decided in vm.py, what the guest left is read by health.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import IO

from . import log, vmcore
from .accel import kvm_error
from .errors import MISSING_TOOL, NO_STATUS, STOPPING_SIGNALS, TIMEOUT, Failure
from .files import read_regular
from .health import (
    GUEST_LINE_BYTES,
    ConsoleWatch,
    read_lines,
    reported_status,
    show_tail,
)
from .log import printable
from .reaper import Guard, stop_session

POLL_SECONDS = 0.1
# After the workload's status, the guest powers off; a kernel that cannot (no ACPI on x86) or a
# shutdown that hangs is stopped after this long: the run is over, and its files are synced.
SHUTDOWN_GRACE_SECONDS = 10.0
PANIC_GRACE_SECONDS = 5.0  # panic=-1 ends the VM at once; stop it ourselves after this


PR_SET_PDEATHSIG = 1  # the "parent" is the thread that started vng: a matrix's boot threads outlive their VMs
VNG_STDERR_BYTES = 16 * 1024  # the end of vng's stderr kept: its own error, when it fails before the kernel runs
STDOUT_COPY_BYTES = 16 * 1024 * 1024  # the start of the workload's stdout kept, when asked (test results)
# A labeled line (log.labeled) longer than this is cut into several: each is one write, which another thread's
# write to the same pipe cannot split (PIPE_BUF, 4096 bytes, with the label).
LABELED_LINE_BYTES = 3968
_STOP: ContextVar[threading.Event | None] = ContextVar("vngtasks_vm_stop", default=None)  # see stops_when()


class Abandoned(BaseException):
    """The VM was stopped because the whole run is stopping (see stops_when): nothing of it is reported.
    A BaseException, as a stopping signal's: no `except Exception` on the way out may keep it."""


@contextlib.contextmanager
def stops_when(event: threading.Event) -> Iterator[None]:
    """A VM this thread supervises in the block is stopped at its next poll once `event` is set, and Abandoned
    raised (a build host's build too, see ended_when_stopped): the main thread, which takes the stopping signals, so
    stops the VMs and builds that other threads run."""
    token = _STOP.set(event)
    try:
        yield
    finally:
        _STOP.reset(token)


@contextlib.contextmanager
def ended_when_stopped(end: Callable[[], None]) -> Iterator[None]:
    """In a stops_when block, for work that waits without polling (a build host's command): once the event is set,
    `end` runs in a watcher thread (it closes what the work waits on), and the block's exception becomes Abandoned;
    set before the block, Abandoned at once. Outside a stops_when block: nothing."""
    stop = _STOP.get()
    if stop is None:
        yield
        return
    if stop.is_set():
        raise Abandoned()
    left = threading.Event()

    def watch() -> None:
        while not left.wait(POLL_SECONDS):
            if stop.is_set():
                with contextlib.suppress(Exception):  # what it closes may be closing already
                    end()
                return

    watcher = threading.Thread(target=watch, name="vngtasks-stop-watch", daemon=True)
    watcher.start()
    try:
        yield
    except Exception:
        if stop.is_set():
            raise Abandoned() from None
        raise
    finally:
        left.set()
        watcher.join()


@dataclass(frozen=True)
class VmRun:
    """One VM run as supervision sees it: where the guest reports, where its console goes, its limits."""

    accel: str  # "kvm" or "tcg": named in the outcome and the log
    shared: Path  # the run directory the guest writes "started" and "status" into
    console_log: Path  # written by QEMU
    boot_timeout: int  # seconds from vng start to workload start; 0: no limit
    run_timeout: int  # seconds the workload may run; 0: no limit
    qmp_socket: Path | None = None  # QEMU's QMP socket, to dump the guest's memory before stopping it (vmcore.py)
    dump_dir: Path | None = None  # where that dump goes (log-dir); None: no dump


@dataclass(frozen=True)
class Outcome:
    """How one VM run ended, as the host saw it."""

    accel: str  # "kvm" or "tcg": what this run used
    status: int
    result: str  # "workload", "run-timeout", "boot-timeout", "panic" or "no-status"
    boot_seconds: float | None  # vng start to workload start; None: never started
    workload_seconds: float | None
    release: str = ""  # the guest's `uname -r`, when it got that far
    phases: tuple[tuple[str, float], ...] = ()  # where the time went (see Marks.phases), as far as known
    vmcore: Path | None = None  # the guest's memory, dumped before the VM was stopped (vmcore.dump)
    kvm_error: str = ""  # QEMU's line, when KVM stopped the guest (result "kvm-error")


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
        """The phases below, each where both its ends are known; the guest's two numbers only when they fit."""
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


def supervise(
    vm: VmRun, argv: list[str], env: Mapping[str, str], marks: Marks, guard: Guard, stdout: bytearray | None = None
) -> Outcome:
    """Run vng until the VM ends, is over its time or panics; `marks` notes when each thing happened, `guard`
    (started before, closed after, by the caller) learns vng's session; `stdout`, when given, gets the start of
    what the workload printed (at most STDOUT_COPY_BYTES), as it is relayed. In a log.labeled block, every line
    relayed is labeled too; in a stops_when block, the VM is stopped when asked (Abandoned)."""
    vm.console_log.unlink(missing_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    label = log.label().encode()
    stop = _STOP.get()
    with contextlib.ExitStack() as cleanup:
        with stopping_signals_held():  # a stop waits until vng is started and its cleanup is in place
            process = start(argv, env, copy_stdout=stdout is not None, labeled=bool(label))
            relays = relay(process, stdout, label)
            cleanup.callback(finish, process, relays)
            guard.watch(process.pid)
        marks.vng = time.monotonic()
        console = ConsoleWatch(vm.console_log)
        while process.poll() is None:
            time.sleep(POLL_SECONDS)
            if stop is not None and stop.is_set():
                raise Abandoned()  # the cleanup above stops vng's session
            now = time.monotonic()
            note_progress(vm, marks, now)
            why = overdue(vm, marks, console, now, relays.stderr_tail)
            if why is not None:
                dumped = dump_before_stopping(vm, why)
                finish(process, relays)
                return dataclasses.replace(stopped(vm, marks, why, now, relays.stderr_tail()), vmcore=dumped)
            if marks.status is not None and now - marks.status > SHUTDOWN_GRACE_SECONDS:
                log.info(f"the guest did not power off within {SHUTDOWN_GRACE_SECONDS:g} s of its status: VM stopped")
                break
        marks.ended = time.monotonic()
        finish(process, relays)
        return ended(vm, marks, console, process.returncode, relays.stderr_tail())


def finish(process: subprocess.Popen[bytes], relays: Relays) -> None:
    """vng's whole session stopped, then what it wrote copied to the end."""
    stop_session(process.pid, process.poll)
    for thread in relays.threads:
        thread.join(timeout=5)


@contextlib.contextmanager
def stopping_signals_held() -> Iterator[None]:
    """Stopping signals wait (blocked) until the block ends, then arrive as usual."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOPPING_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start(
    argv: list[str], env: Mapping[str, str], copy_stdout: bool = False, labeled: bool = False
) -> subprocess.Popen[bytes]:
    """vng in a session of its own (stopped as a whole), killed by the kernel should we (or the thread that starts
    it) die before it; its stdout through a pipe too when `copy_stdout` or `labeled`."""
    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # we died before that took hold
            os._exit(1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPPING_SIGNALS)

    try:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, env=env, start_new_session=True, preexec_fn=in_child,
            **relayed_streams(copy_stdout or labeled),
        )  # fmt: skip
    except FileNotFoundError:
        raise Failure(f"{argv[0]} not found: install virtme-ng (`invoke deps` does)", MISSING_TOOL) from None


def note_progress(vm: VmRun, marks: Marks, now: float) -> None:
    """Mark the workload's start, then its end, as the guest reports them in the run directory."""
    if marks.started is None:
        started = read_regular(vm.shared / "started", GUEST_LINE_BYTES)
        if started is not None:  # it may still be empty: its line is read again at the end
            marks.started = now
            log.info(f"booted in {now - marks.vng:.1f} s ({vm.accel}); workload running")
    elif marks.status is None:
        marks.reported = reported_status(vm.shared)
        marks.status = now if marks.reported is not None else None


def overdue(
    vm: VmRun, marks: Marks, console: ConsoleWatch, now: float, vng_said: Callable[[], str] = str
) -> str | None:
    """Why the VM must be stopped now, if it must: "panic", "kvm-error" (KVM stopped the guest before its workload
    started: `vng_said` gives the end of vng's stderr, QEMU's included), "boot-timeout" or "run-timeout"."""
    if console.panicked_for(now) > PANIC_GRACE_SECONDS:
        return "panic"
    if vm.accel == "kvm" and marks.started is None and kvm_error(vng_said()):
        return "kvm-error"
    if marks.started is None and vm.boot_timeout and now - marks.vng > vm.boot_timeout:
        return "boot-timeout"
    if marks.started is not None and marks.status is None and vm.run_timeout and now - marks.started > vm.run_timeout:
        return "run-timeout"
    return None


def dump_before_stopping(vm: VmRun, why: str) -> Path | None:
    """The guest's memory, when the run asked for a dump on failure (vmcore.py)."""
    if vm.qmp_socket is None or vm.dump_dir is None:
        return None
    log.info(f"vmcore: {why}: dumping the guest's memory before stopping the VM")
    return vmcore.dump(vm.qmp_socket, vm.dump_dir)


def stopped(vm: VmRun, marks: Marks, why: str, now: float, vng_said: str = "") -> Outcome:
    """The outcome of a VM that `overdue` had stopped; `vng_said`: the end of vng's stderr."""
    if why == "kvm-error":
        error = kvm_error(vng_said)
        outcome = failed(vm, why, f"kvm-error: KVM stopped the guest before its workload started ({error}); VM "
                                  "stopped", None, tail=False)  # fmt: skip
        return dataclasses.replace(outcome, kvm_error=error)
    if why == "run-timeout" and marks.started is not None:
        log.warn(f"run-timeout: the workload ran over {vm.run_timeout} s; VM stopped")
        return Outcome(vm.accel, TIMEOUT, why, marks.boot_seconds, now - marks.started)
    if why == "panic":
        return failed(vm, why, "the guest kernel panicked and the VM did not end; VM stopped", marks.boot_seconds)
    message = f"boot-timeout: the guest did not start the workload within {vm.boot_timeout} s; VM stopped"
    return failed(vm, why, message, None)


def ended(vm: VmRun, marks: Marks, console: ConsoleWatch, vng_status: int | None, vng_said: str = "") -> Outcome:
    """The outcome of a VM that ended (or was stopped after its status): the workload's status if reported.
    `vng_said`: the end of vng's stderr, its own error when it failed before the guest kernel printed anything."""
    if marks.reported is None and marks.started is not None:
        marks.reported = reported_status(vm.shared)
        marks.status = marks.ended if marks.reported is not None else None
    if marks.reported is not None and marks.started is not None and marks.status is not None:
        workload = marks.status - marks.started
        return Outcome(vm.accel, marks.reported, "workload", marks.boot_seconds, workload)
    if console.panicked():
        return failed(vm, "panic", "the guest kernel panicked", marks.boot_seconds)
    error = last_line(vng_said)
    if vng_status and error and not any(line.strip() for line in read_lines(vm.console_log)):
        message = f"vng failed (exit {vng_status}) before the guest kernel printed anything: {error}"
        return failed(vm, "no-status", message, None, tail=False)
    message = f"the VM ended without reporting a workload status (vng exit {vng_status})"
    return failed(vm, "no-status", message, marks.boot_seconds)


def last_line(text: str) -> str:
    """The last line of `text` that is not blank, without terminal control characters."""
    lines = [printable(line) for line in text.splitlines()]
    return next((line for line in reversed(lines) if line.strip()), "")


def failed(vm: VmRun, result: str, message: str, boot_seconds: float | None, tail: bool = True) -> Outcome:
    """Say why the VM failed and show the end of its console (with `tail`)."""
    log.warn(message)
    if tail:
        show_tail(vm.console_log)
    return Outcome(vm.accel, NO_STATUS, result, boot_seconds, None)


# virtme-ng gives QEMU /proc/self/fd/1 and /2 as `file` chardevs (the guest's stdout and stderr),
# which QEMU opens again with O_TRUNC: where ours is a regular file (`invoke boot > log 2>&1`),
# everything written to it before the VM started would be erased. vng gets a pipe instead. Its stderr always
# goes through a pipe: its end is kept, for vng's own error when it fails. Its stdout does too when its start is
# kept (the workload's test results).
def relayed_streams(copy_stdout: bool = False) -> dict[str, int | None]:
    """Popen's stdout and stderr: a pipe for stderr, and in place of our stdout when that is a regular file or
    when `copy_stdout`."""
    return {"stdout": subprocess.PIPE if copy_stdout or _regular_file(1) else None, "stderr": subprocess.PIPE}


@dataclass
class Relays:
    """The threads copying vng's piped streams to ours, and the end of its stderr."""

    threads: list[threading.Thread]
    tail: bytearray

    def stderr_tail(self) -> str:
        return bytes(self.tail).decode(errors="replace")


def relay(process: subprocess.Popen[bytes], stdout: bytearray | None = None, label: bytes = b"") -> Relays:
    """Copy each piped stream to ours as it comes (the start of stdout into `stdout` too, when given), each line
    beginning with `label` when one is given; the threads end when the session's writers do."""
    relays = Relays([], bytearray())
    for pipe, fd in ((process.stdout, 1), (process.stderr, 2)):
        if pipe is not None:
            args = (pipe, fd, relays.tail, None, label) if fd == 2 else (pipe, fd, None, stdout, label)
            thread = threading.Thread(target=_copy, args=args, daemon=True)
            thread.start()
            relays.threads.append(thread)
    return relays


def _copy(source: IO[bytes], target: int, tail: bytearray | None, head: bytearray | None, label: bytes = b"") -> None:
    """`source` to `target`, keeping its last VNG_STDERR_BYTES in `tail`, its first STDOUT_COPY_BYTES in `head`;
    with a `label`, line by line, each line beginning with it (the last one ended by a line break)."""
    pending = bytearray()  # with a label: the start of a line not ended yet
    with source:
        while chunk := os.read(source.fileno(), 65536):
            if tail is not None:
                tail += chunk
                del tail[:-VNG_STDERR_BYTES]
            if head is not None and len(head) < STDOUT_COPY_BYTES:
                head += chunk[: STDOUT_COPY_BYTES - len(head)]
            for piece in labeled_lines(pending, chunk, label) if label else [chunk]:
                _write_all(target, piece)
        if label and pending:
            _write_all(target, label + bytes(pending) + b"\n")


def labeled_lines(pending: bytearray, chunk: bytes, label: bytes) -> list[bytes]:
    """The lines `chunk` ends (after what `pending` began), each beginning with `label`, one longer than
    LABELED_LINE_BYTES cut there; what no line break ends yet stays in `pending`."""
    pending += chunk
    lines = []
    while (end := pending.find(b"\n", 0, LABELED_LINE_BYTES)) != -1 or len(pending) >= LABELED_LINE_BYTES:
        cut = end + 1 if end != -1 else LABELED_LINE_BYTES
        line = bytes(pending[:cut])
        del pending[:cut]
        lines.append(label + line + (b"" if line.endswith(b"\n") else b"\n"))
    return lines


def _write_all(target: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(target, view) :]


def _regular_file(fd: int) -> bool:
    try:
        return S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False
