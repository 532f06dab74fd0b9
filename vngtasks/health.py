"""What the guest left behind, read with suspicion: its console and the files of its run directory.

QEMU writes the guest console to the run directory (a virtconsole of its own, beside vng's
serial console; runrecord.py publishes it as `log-dir/vng-console.log`); the host reads it only to
explain a failure (a panic, a boot that never ended) and to look for kernel splats after the
workload. This module owns that reading:
the panic line as it arrives, the tail shown when the VM failed, and the splat lines; and the
guest's own files (`started`, `status`, `release`, `dmesg`), which the guest may have made into
anything, so they are read only when regular, never through a link, and capped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import log
from .files import read_regular
from .log import printable

GUEST_LINE_BYTES = 4096  # the most read of `started`, `status` and `release`
GUEST_DMESG_BYTES = 16 * 1024 * 1024
CONSOLE_BYTES = 64 * 1024 * 1024  # the most of a console kept and judged (its end)
TAIL_LINES = 50  # console lines shown when the VM failed
PANIC = re.compile(r"Kernel panic - not syncing")
# Kernel splats: warnings, BUGs, sanitizers, lockdep, hung tasks, RCU stalls, oopses, kmemleak's leaks.
SPLAT_PATTERN = re.compile(
    r"WARNING:|BUG:|KASAN:|UBSAN:|possible circular locking|blocked for more than"
    r"|rcu: INFO: rcu_\w+ detected stalls|detected stalls on CPUs/tasks|\bOops\b|unreferenced object 0x"
)
_TIMESTAMP = re.compile(r"^\[\s*[0-9]+\.[0-9]+\]\s?")
# The guest's dmesg tells each record's facility (the kernel's is 0, `kern`): util-linux's `dmesg -x` starts a
# record with `kern  :warn  : `, busybox's `dmesg -r` with its syslog priority, facility * 8 + level: `<4>`.
# (util-linux 2.38's own `dmesg -r` drops the facility from that number: Debian 12's prints <5> for user.notice.)
_FACILITY = re.compile(r"<(?P<priority>[0-9]{1,3})>|(?P<name>[a-z][a-z0-9]*) *:[a-z]+ *: ?")
_RUN_INIT = re.compile(
    r"^(?:<[0-9]{1,3}>|[a-z][a-z0-9]* *:[a-z]+ *: ?)?\[\s*([0-9]+\.[0-9]+)\] Run \S+ as init process$", re.MULTILINE
)


@dataclass(frozen=True)
class GuestReport:
    """What the guest wrote in its run directory by the time the VM ended, besides its status."""

    uptime: float | None  # guest seconds since its kernel started, at workload start ("started")
    dmesg: bytes | None  # None: the guest wrote none (it never got to the end of its workload)
    release: str  # its `uname -r`; empty when it never got that far


class ConsoleWatch:
    """Follows the console log as QEMU writes it, for the panic line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.pending = b""
        self.panic_at: float | None = None

    def panicked_for(self, now: float) -> float:
        """Seconds since a panic showed on the console (0 when none has)."""
        if self.panic_at is None and self._read_panic():
            self.panic_at = now
        return 0.0 if self.panic_at is None else now - self.panic_at

    def panicked(self) -> bool:
        return self.panic_at is not None or self._read_panic()

    def _read_panic(self) -> bool:
        try:
            with open(self.path, "rb") as console:
                console.seek(self.offset)
                chunk = console.read()
        except FileNotFoundError:
            return False
        self.offset += len(chunk)
        text = self.pending + chunk
        # Keep a partial last line for the next read: the panic line may arrive in pieces.
        self.pending = text[text.rfind(b"\n") + 1 :]
        return PANIC.search(text.decode(errors="replace")) is not None


def read_console(path: Path, limit: int = CONSOLE_BYTES) -> bytes:
    """The run's console log as QEMU wrote it, its last `limit` bytes at most."""
    try:
        with open(path, "rb") as console:
            console.seek(max(console.seek(0, os.SEEK_END) - limit, 0))
            return console.read()
    except FileNotFoundError:
        return b""


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_bytes().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def last_lines(lines: list[str], count: int = TAIL_LINES) -> list[str]:
    """The last `count` lines that are not blank, without terminal control characters."""
    kept = [printable(line) for line in lines]
    return [line for line in kept if line.strip()][-count:] if count > 0 else []


def show_tail(console_log: Path) -> None:
    tail = last_lines(read_lines(console_log))
    if not tail:
        log.info(f"the guest console ({console_log}) is empty: the kernel printed nothing")
        return
    log.info(f"last {len(tail)} lines of the guest console ({console_log}):")
    log.lines(tail)


def kernel_and_program_lines(dmesg: bytes) -> tuple[list[str], list[str]]:
    """The guest's dmesg (see _FACILITY) parted into the lines the kernel logged (facility 0) and those programs
    wrote to /dev/kmsg (vng's init, the workload: the kernel gives them another facility, whatever they ask
    for), each without its facility; a line with none continues the record above it."""
    kernel: list[str] = []
    programs: list[str] = []
    into = kernel
    for line in dmesg.decode(errors="replace").splitlines():
        found = _FACILITY.match(line)
        if found:
            ours = found["name"] == "kern" if found["name"] else int(found["priority"]) >> 3 == 0
            into = kernel if ours else programs
            line = line[found.end() :]
        into.append(line)
    return kernel, programs


def judged_lines(console_lines: list[str], dmesg: bytes | None) -> list[str]:
    """What the splat check reads: the kernel's own lines. dmesg tells them by facility; the console cannot, so
    a console line that dmesg shows a program wrote is left out (the console also holds what the kernel logged
    after dmesg was taken, and what a full ring buffer dropped). With no dmesg (the workload never ended, so the
    run has failed already), the console as it is."""
    if dmesg is None:
        return console_lines
    return kernel_and_program_lines(dmesg)[0] + kernel_console_lines(console_lines, dmesg)


def kernel_console_lines(console_lines: list[str], dmesg: bytes | None) -> list[str]:
    """The console's lines but those dmesg shows a program wrote: the kernel's, each once and in its order (what
    crash reports read); dmesg's kernel lines when the console has none."""
    if dmesg is None:
        return console_lines
    kernel, programs = kernel_and_program_lines(dmesg)
    written = {_without_timestamp(line) for line in programs}
    kept = [line for line in console_lines if _without_timestamp(line) not in written]
    return kept if any(line.strip() for line in kept) else kernel


def _without_timestamp(line: str) -> str:
    return _TIMESTAMP.sub("", printable(line))


def find_splats(lines: list[str], allow: tuple[str, ...]) -> list[str]:
    """Kernel splat lines (timestamps dropped, each once), minus those an allow regex matches."""
    allowed = [re.compile(pattern) for pattern in allow]
    found: list[str] = []
    for raw in lines:
        line = _without_timestamp(raw)
        if SPLAT_PATTERN.search(line) and not any(a.search(line) for a in allowed) and line not in found:
            found.append(line)
    return found


def read_guest_report(shared: Path) -> GuestReport:
    """The guest's `started` (its clock), `dmesg` and `release` files, each read as read_guest_file reads."""
    started = read_regular(shared / "started", GUEST_LINE_BYTES) or b""
    dmesg = read_regular(shared / "dmesg", GUEST_DMESG_BYTES)
    release = read_regular(shared / "release", GUEST_LINE_BYTES) or b""
    return GuestReport(
        uptime=guest_seconds(started.decode(errors="replace").strip()),
        dmesg=dmesg,
        release=printable(release.decode(errors="replace")),
    )


def reported_status(run_dir: Path) -> int | None:
    """The workload's exit status as the guest wrote it: a whole line holding 0 to 255, else None."""
    text = read_regular(run_dir / "status", GUEST_LINE_BYTES) or b""
    if not text.endswith(b"\n"):  # not written yet, or not all of it
        return None
    try:
        status = int(text)
    except ValueError:
        return None
    return status if 0 <= status <= 255 else None


def guest_seconds(field: str) -> float | None:
    """A number of seconds the guest wrote, when it is a plausible one."""
    try:
        value = float(field)
    except ValueError:
        return None
    return value if 0.0 <= value < 1e6 else None


def init_started(dmesg: bytes) -> float | None:
    """When the guest kernel ran init, from its `Run /... as init process` line."""
    found = _RUN_INIT.search(dmesg.decode(errors="replace"))
    return guest_seconds(found[1]) if found else None
