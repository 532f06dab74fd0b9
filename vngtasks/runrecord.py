"""The run as reported, once it is over: its final status, its logs and record in log-dir, the step summary.

A run's console, dmesg, `vng-run.json`, its kernel crashes (`crashes.json`, and `crash-report.txt` when there
are any) and, with `results`, `results.json` and `results.xml` are published into log-dir together, under the
lock `.vng-logs.lock`: another run sharing the log-dir may replace them, but they always belong to one run. On
GitHub, each run adds one row to the step summary's table (then its test results' and its crashes' tables) and,
with `results`, the boot step's outputs tests-passed, tests-failed and tests-skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import arches, log, vmcore
from .action import write_outputs
from .errors import FAILED, SPLAT, Failure
from .files import write_atomically
from .health import TAIL_LINES, find_splats, judged_lines, kernel_console_lines
from .report import crashes as kernel_crashes
from .report import junit
from .report import results as test_results
from .report.known import Known
from .report.results import Results
from .report.symbolize import symbolize
from .settings import Settings
from .supervise import Outcome

CONSOLE_LOG = "vng-console.log"
DMESG_LOG = "vng-dmesg.log"
LOGS_LOCK = ".vng-logs.lock"  # held while a run publishes its logs into log-dir
RUN_JSON = "vng-run.json"
LOG_MODE = 0o644  # what a file of a run's made with the usual umask would have
NOTHING_KNOWN = Known()
SUMMARY_HEADER = "| kernel | accel | boot (s) | workload (s) | status | splats |\n|---|---|---|---|---|---|\n"


@dataclass(frozen=True)
class Attempt:
    """One VM run as it ended, with its own console and dmesg (none of another run's)."""

    outcome: Outcome
    console: bytes
    dmesg: bytes | None  # None: the guest wrote none (it never got to the end of its workload)
    stdout: bytes | None = None  # the start of the workload's stdout, when kept (`results ktap`)


@dataclass(frozen=True)
class Record:
    """The run as reported: vng-run.json and the step summary row."""

    kernel: Path
    release: str
    arch: str
    outcome: Outcome
    status: int  # the task's exit status (the workload's, or SPLAT)
    splats: tuple[str, ...]
    results: Results | None = None  # with `results`
    crashes: kernel_crashes.Crashes = dataclasses.field(default_factory=kernel_crashes.Crashes)


def conclude(
    settings: Settings, kernel: Path, attempted: Attempt, environ: Mapping[str, str], known: Known = NOTHING_KNOWN
) -> int:
    """The run's final status (see recorded)."""
    return recorded(settings, kernel, attempted, environ, known).status


def recorded(
    settings: Settings, kernel: Path, attempted: Attempt, environ: Mapping[str, str], known: Known = NOTHING_KNOWN
) -> Record:
    """Splat check of this run's own console and dmesg, its crash reports, its test results (with `results`)
    judged against the failures it expects (`known`), its logs and records published together, the step summary:
    the run as reported."""
    outcome = attempted.outcome
    console_lines = attempted.console.decode(errors="replace").splitlines()
    splats: list[str] = []
    if settings.splat_check:
        splats = find_splats(judged_lines(console_lines, attempted.dmesg), settings.splat_allow)
    release = guest_release(outcome, console_lines)
    results = None
    workload = outcome
    if settings.results:
        text, problem = test_results.stream(settings, attempted.stdout, attempted.console, attempted.dmesg)
        results = test_results.judge(text, settings.results, release, known, ended(outcome, splats), problem)
        test_results.tell(results, log.in_actions())
        reported = outcome.result == "workload"
        workload = dataclasses.replace(outcome, status=test_results.status_with(results, outcome.status, reported))
    status = judge(workload, splats)
    found = kernel_crashes.find(kernel_console_lines(console_lines, attempted.dmesg), settings.splat_allow)
    symbolize(found, kernel, settings.arch, arches.host())
    kernel_crashes.tell(found, log.in_actions(), settings.workspace)
    record = Record(kernel, release, settings.arch.name, outcome, status, tuple(splats), results, found)
    publish(settings.log_dir, attempted, record)
    summary = environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        append_summary(Path(summary), record)
    if results is not None and environ.get("GITHUB_OUTPUT"):
        write_outputs(Path(environ["GITHUB_OUTPUT"]), test_results.action_outputs(results))
    return record


def ended(outcome: Outcome, splats: list[str]) -> str:
    """How a run whose workload never reported ended, for the tests that never got a result ("" when it did)."""
    said = {
        "panic": "the kernel panicked",
        "run-timeout": "run-timeout expired",
        "no-status": "the VM ended without the workload's status",
        "boot-timeout": "boot-timeout expired",
        "kvm-error": "KVM stopped the guest",
    }.get(outcome.result, "")
    return f"{said}: {splats[0]}" if said and splats else said


def judge(outcome: Outcome, splats: list[str]) -> int:
    """The workload's status, or SPLAT when it passed but the kernel splatted."""
    if not splats or outcome.result not in ("workload", "run-timeout"):
        return outcome.status
    if outcome.status == 0:
        log.warn(f"splat-check: the workload passed but the kernel logged {len(splats)} splat line(s):")
    else:
        log.warn(f"splat-check: the kernel logged {len(splats)} splat line(s) (status {outcome.status} kept):")
    log.lines(splats[:TAIL_LINES])
    return SPLAT if outcome.status == 0 else outcome.status


def guest_release(outcome: Outcome, console_lines: list[str]) -> str:
    """`uname -r` from the guest, else the console banner's, else empty."""
    if outcome.release:
        return outcome.release
    for line in console_lines:
        banner = re.search(r"Linux version (\S+)", line)
        if banner:
            return banner[1]
    return ""


def publish(log_dir: Path, attempted: Attempt, record: Record) -> None:
    """The run's console, dmesg and vng-run.json into log-dir, under one lock: another run sharing the
    log-dir may replace them, but the three always belong to one run. log-dir is the workspace by default,
    which the guest writes: each file is replaced (a link the guest placed is replaced, never followed). A file
    this run has none of is removed (another run's would be taken for this one's)."""
    with logs_lock(log_dir):
        vmcore.publish(log_dir, attempted.outcome.vmcore, record.kernel)
        write_atomically(log_dir / CONSOLE_LOG, attempted.console, LOG_MODE)
        results = record.results
        files = {
            DMESG_LOG: attempted.dmesg,
            test_results.RESULTS_JSON: None if results is None else _json(test_results.record_json(results)),
            test_results.RESULTS_XML: None if results is None else junit.render(results),
            kernel_crashes.CRASHES_JSON: _json(record.crashes.json()),
            kernel_crashes.CRASH_REPORT: record.crashes.text() or None,
        }
        for name, data in files.items():
            if data is None:
                (log_dir / name).unlink(missing_ok=True)
            else:
                write_atomically(log_dir / name, data, LOG_MODE)
        write_atomically(log_dir / RUN_JSON, _json(record_json(record, log_dir)), LOG_MODE)


def _json(record: Mapping[str, object]) -> str:
    return json.dumps(record, indent=2) + "\n"


@contextlib.contextmanager
def logs_lock(log_dir: Path) -> Iterator[None]:
    """The lock of log-dir's logs, held: its file is opened, never through a link (one in its place is
    replaced by a file), and kept (removing a lock file races the next run)."""
    path = log_dir / LOGS_LOCK
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, LOG_MODE)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        path.unlink()
        fd = os.open(path, flags | os.O_EXCL, LOG_MODE)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Failure(f"log-dir: {path} is not a regular file", FAILED)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
        "tests": None if record.results is None else record.results.totals,
        "crashes": [{"title": crash.title, "count": crash.count} for crash in record.crashes.found],
        "vmcore": str(log_dir / vmcore.VMCORE) if outcome.vmcore is not None else None,
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
        last = existing.rstrip("\n").rpartition("\n")[2]
        if SUMMARY_HEADER not in existing or not last.startswith("| "):  # a run's test results came between
            summary.write(("\n" if existing and not existing.endswith("\n") else "") + SUMMARY_HEADER)
        summary.write(summary_row(record))
        if record.results is not None:
            summary.write(test_results.summary_markdown(record.results))
        summary.write(kernel_crashes.summary_markdown(record.crashes))
