"""`invoke matrix`: refs x arches x kconfig bases, each cell resolved, built (or found) and booted, one table.

A cell is one setting of (tag, arch, kconfig-base), the other settings shared. The builds run one after another in
the main thread, by provide.py (the cache, ccache, the build host when one is set: a build takes every core), or,
when build-host lists several, one per build host at once, each host's in a build thread (spread); each cell's boot,
by vm.py with the cell's own directory of log-dir (`matrix/NN-TAG-ARCH-BASE/`), starts in a boot thread as soon as
its kernel is there, as many at once as the host holds (boots_at_once; each VM its share, Host.divided), its lines
labeled with that directory's name. A stopping signal reaches the main thread: it stops the VMs of the boot threads
and the builds of the build threads (supervise.stops_when) and waits for them (Threads). As each cell finishes, the
kept cells are written beside the kernel cache (cache-dir/matrix/ARGUMENTS-HASH.json, by one finishing cell at a
time): a re-run with the same arguments takes the finished cells from there, without building or booting them again.
log-dir/matrix.json is the report only (log-dir is the workspace by default, which a guest writes), never read back;
the kept file is read as any record on disk: bounded, each cell's fields of their types, one of this matrix's cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from invoke import Context

from . import log, provide, resolve, supervise, vm
from .errors import BAD_INPUT, FAILED, Failure, Unreachable
from .files import kept_list, typed, write_atomically
from .log import printable
from .settings import Settings
from .validate import make_directory

RECORD = "matrix.json"  # in log-dir
KEPT_BYTES = 4 * 1024 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_CELLS = 64
MIN_SHARE_MIB = 1024  # boots at once without a memory setting: fewer of them, rather than each VM with less than this
# How a cell ended: "passed" (status 0), "failed" (the run's nonzero status), "no-kernel" (it did not build).
PASSED, FAILED_RUN, NO_KERNEL = "passed", "failed", "no-kernel"


@dataclass(frozen=True)
class Cell:
    """One cell's place in the matrix, as the user named it."""

    tag: str
    arch: str
    kconfig_base: str

    def given(self) -> dict[str, str]:
        """Its settings as flags: those the user listed (a None part is the configured value)."""
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}

    @property
    def label(self) -> str:
        return f"{self.tag} {self.arch} {self.kconfig_base}"

    def directory(self, number: int) -> str:
        """Its directory under log-dir/matrix: numbered, and only plain characters of its parts."""
        return f"{number:02d}-" + "-".join(_UNSAFE.sub("_", part) for part in (self.tag, self.arch, self.kconfig_base))


@dataclass(frozen=True)
class Done:
    """A finished cell, as kept and reported."""

    tag: str
    arch: str
    kconfig_base: str
    result: str  # PASSED, FAILED_RUN or NO_KERNEL
    status: int  # the run's exit status; FAILED for a cell without a kernel
    sha: str  # "" when it did not resolve
    release: str
    build_seconds: float
    boot_seconds: float
    cache_hit: bool
    crashes: tuple[str, ...]  # the titles of its kernel's crashes
    tests: dict[str, int] | None  # its test results' totals, with `results`

    @property
    def cell(self) -> Cell:
        return Cell(self.tag, self.arch, self.kconfig_base)


_FIELDS = {"tag": str, "arch": str, "kconfig_base": str, "result": str, "status": int, "sha": str, "release": str,
           "build_seconds": (int, float), "boot_seconds": (int, float), "cache_hit": bool, "crashes": list,
           "tests": (dict, type(None))}  # fmt: skip


def cells(tags: list[str], arch_names: list[str], bases: list[str]) -> list[Cell]:
    """Every combination, tags outermost; at most MAX_CELLS."""
    found = [Cell(tag, arch, base) for tag in tags for arch in arch_names for base in bases]
    if len(found) > MAX_CELLS:
        raise Failure(f"matrix: {len(found)} cells: at most {MAX_CELLS}", BAD_INPUT)
    return found


def split(name: str, value: str) -> list[str]:
    """A matrix flag's comma-separated values, each once, in order; none empty."""
    parts = [part.strip() for part in value.split(",")]
    if not value or any(not part for part in parts):
        raise Failure(f"{name.replace('_', '-')}: a comma-separated list without empty items", BAD_INPUT)
    return list(dict.fromkeys(parts))


def arguments(settings: list[Settings], resolved: list[resolve.Resolved]) -> dict:
    """What a kept file is for: a re-run resumes from it only when all of these are the same (the commits too:
    a branch that moved since is run again)."""
    first = settings[0]
    kconfig = first.kconfig.read_bytes() if first.kconfig else b""
    return {
        "cells": [[s.tag, s.arch.name, str(s.kconfig_base), r.sha] for s, r in zip(settings, resolved, strict=True)],
        "kernel_url": first.kernel_url,
        "name": first.name, "version": first.version, "kconfig_sha256": hashlib.sha256(kconfig).hexdigest(),
        "cc": first.cc, "llvm": first.llvm, "debug": list(first.debug), "run": first.run, "results": first.results,
        "splat_allow": list(first.splat_allow), "splat_check": first.splat_check,
    }  # fmt: skip


def kept_file(cache_dir: Path, wanted: dict) -> Path:
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / "matrix" / f"{digest}.json"


def finished(path: Path, wanted: dict, labels: set[str]) -> dict[str, Done]:
    """The cells kept for the same arguments, by label; none (with a warning) for a damaged file."""
    kept = kept_list(path, KEPT_BYTES, wanted, "cells")
    if kept is None:
        log.warn(f"matrix: {path} is another matrix's or damaged: starting over")
        return {}
    checked = [checked_cell(cell) for cell in kept]
    if not all(done is not None and done.cell.label in labels for done in checked):
        log.warn(f"matrix: {path} has a cell that is not one of this matrix's: starting over")
        return {}
    return {done.cell.label: done for done in checked if done is not None}


def checked_cell(cell: object) -> Done | None:
    """A kept cell as a Done when every field has its type; else None. Its text made printable."""
    if not isinstance(cell, dict) or set(cell) != set(_FIELDS):
        return None
    if not all(typed(cell[name], kind) for name, kind in _FIELDS.items()):
        return None
    if cell["result"] not in (PASSED, FAILED_RUN, NO_KERNEL) or not all(isinstance(t, str) for t in cell["crashes"]):
        return None
    tests = cell["tests"]
    if tests is not None and not all(isinstance(k, str) and typed(v, int) for k, v in tests.items()):
        return None
    text = {name: printable(cell[name]) for name in ("tag", "arch", "kconfig_base", "sha", "release")}
    return Done(**{**cell, **text, "crashes": tuple(printable(t) for t in cell["crashes"])})


@dataclass(frozen=True)
class Todo:
    """A cell to run: its number in the matrix, its settings (its own log-dir, see cell_settings), its commit."""

    number: int
    cell: Cell
    settings: Settings
    resolved: resolve.Resolved

    @property
    def label(self) -> str:
        """What each line of its boot begins with (log.labeled): its directory's name."""
        return self.cell.directory(self.number)


def todo(order: list[Cell], settings: list[Settings], resolved: list[resolve.Resolved], done: set[str]) -> list[Todo]:
    """The cells not done, numbered in the matrix, each with its own log-dir."""
    numbered = enumerate(zip(order, settings, resolved, strict=True), 1)
    return [Todo(n, cell, cell_settings(s, n, cell), r) for n, (cell, s, r) in numbered if cell.label not in done]


def cell_settings(settings: Settings, number: int, cell: Cell) -> Settings:
    """The cell's settings: its logs in its own directory of log-dir."""
    return dataclasses.replace(settings, log_dir=settings.log_dir / "matrix" / cell.directory(number))


def boot_cell(kept: Kept, pending: Todo, built: provide.Built, share: vm.Host) -> None:
    """One cell booted (in a boot thread), its lines labeled; kept when it ends."""
    with log.labeled(pending.label):
        ran = provide.boot_built(pending.settings, built, pending.settings.run, share)
    kept.add(booted(pending.cell, pending.resolved, ran))


def without_kernel(cell: Cell, resolved: resolve.Resolved, built: provide.Built) -> Done:
    log.warn(f"matrix: {cell.label}: no kernel: {built.failure}")
    return Done(*_place(cell), NO_KERNEL, FAILED, resolved.sha, "", round(built.seconds, 1), 0.0, built.cache_hit, (),
                None)  # fmt: skip


def booted(cell: Cell, resolved: resolve.Resolved, ran: provide.Ran) -> Done:
    """A cell whose kernel was booted, as its run was reported."""
    assert ran.record is not None
    record = ran.record
    result = PASSED if record.status == 0 else FAILED_RUN
    titles = tuple(crash.title for crash in record.crashes.found)
    totals = None if record.results is None else dict(record.results.totals)
    return Done(*_place(cell), result, record.status, resolved.sha, record.release, round(ran.build_seconds, 1),
                round(ran.boot_seconds, 1), ran.cache_hit, titles, totals)  # fmt: skip


def _place(cell: Cell) -> tuple[str, str, str]:
    return cell.tag, cell.arch, cell.kconfig_base


class Kept:
    """The kept file of one matrix and its finished cells: each cell added is written at once, the file whole (boots
    finish in threads of their own: they write it in turn)."""

    def __init__(self, path: Path, wanted: dict, done: dict[str, Done]) -> None:
        self.path, self.wanted, self.done = path, wanted, done
        self._turn = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, done: Done) -> None:
        with self._turn:
            self.done[done.cell.label] = done
            text = json.dumps({"arguments": self.wanted, "cells": _json(self.done.values())}) + "\n"
            write_atomically(self.path, text)


def boots_at_once(cells: int, host: vm.Host, cpus: int | None, memory_mib: int | None) -> int:
    """As many VMs at once as the host holds without overcommitting it, at most `cells`, at least 1: each its `cpus`
    (unset: 1 at least) of the host's CPUs, and its `memory` (unset: MIN_SHARE_MIB at least) of the 90% of the
    host's memory a VM may take."""
    by_cpus = host.cpus // (cpus or 1)
    by_memory = host.memory_mib * 9 // 10 // (memory_mib or MIN_SHARE_MIB)
    return max(1, min(cells, by_cpus, by_memory))


def matrix(c: Context, settings: list[Settings]) -> int:
    """Every cell resolved, then each built (one build at a time, or one per build host at once when build-host lists
    several) and booted as soon as its kernel is there, as many at once as boots_at_once allows (kept cells are not
    run again); the table; 0 when every cell passed."""
    first = settings[0]
    provide.check_build_hosts(first)
    resolved = [resolve.resolve_kernel(c, s, record=False) for s in settings]
    wanted = arguments(settings, resolved)
    order = [Cell(s.tag, s.arch.name, str(s.kconfig_base)) for s in settings]
    path = kept_file(first.cache_dir, wanted)
    kept = Kept(path, wanted, finished(path, wanted, {cell.label for cell in order}))
    if kept.done:
        log.info(f"matrix: resumed from {path}: {len(kept.done)} of {len(order)} cell(s) done")
    cells_to_run = todo(order, settings, resolved, set(kept.done))
    host = vm.Host.current()
    at_once = boots_at_once(len(cells_to_run), host, first.cpus, first.memory_mib)
    share = host.divided(at_once)
    hosts = first.build_host
    if cells_to_run:
        builds = f"one build per build host at once ({len(hosts)})" if len(hosts) > 1 else "one build at a time"
        log.info(f"matrix: {len(cells_to_run)} cell(s) to run: {builds}, {at_once} boot(s) at once, "
                 f"each VM with {describe_share(first, share)}")  # fmt: skip
    with Threads(at_once) as boots:
        cell_run = CellRun(c, kept, boots, host, share)
        if len(hosts) > 1:
            spread(cells_to_run, hosts, cell_run.build_and_start)
        else:
            for pending in cells_to_run:
                cell_run.build_and_start(pending)
    return conclude(first.log_dir / RECORD, wanted, [kept.done[cell.label] for cell in order])


@dataclass(frozen=True)
class CellRun:
    """What each cell's build needs to start its boot: the kept file, the boot threads, this host and a VM's share."""

    c: Context
    kept: Kept
    boots: Threads
    host: vm.Host
    share: vm.Host
    guest_roots: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def build_and_start(self, pending: Todo) -> None:
        """The cell's kernel found or built (here, or on its settings' build host), then its boot started in a boot
        thread; a cell without a kernel kept as such."""
        self.boots.check()  # a boot's bad input or missing tool ends the matrix before another build
        log.info(f"matrix: cell {pending.number}: {pending.cell.label} ({pending.resolved.sha12})")
        make_directory("log_dir", pending.settings.log_dir)
        built = provide.find_or_build(self.c, pending.settings, pending.resolved)
        if built.entry is None:
            self.kept.add(without_kernel(pending.cell, pending.resolved, built))
            return
        with self.guest_roots:  # a foreign arch's guest root: made here, once, not by boots (or builds) at once
            vm.guest_root(pending.settings, self.host)
        self.boots.start(boot_cell, self.kept, pending, built, self.share)


def spread(cells_to_run: list[Todo], hosts: tuple[str, ...], build_and_start: Callable[[Todo], None]) -> None:
    """The cells built over `hosts`, one cell per host at a time: each host, in a thread of its own, takes the next
    cell not taken, in order, and builds it there (its settings' build-host that host alone), its lines labeled. A
    host not reached (Unreachable) gives its cell back and takes no more, with a warning, while another host still
    builds; the last one's raises."""
    work = HostWork(cells_to_run, len(hosts))

    def build_on(build_host: str) -> None:
        while (pending := work.next_cell()) is not None:
            on_host = dataclasses.replace(pending.settings, build_host=(build_host,))
            try:
                with log.labeled(pending.label):
                    build_and_start(dataclasses.replace(pending, settings=on_host))
            except Unreachable as failure:
                if not work.give_back(pending):
                    raise
                log.warn(f"matrix: {failure}: no more builds there, its cell goes to another build host")
                return

    with Threads(len(hosts)) as builds:
        for build_host in hosts:
            builds.start(build_on, build_host)


class HostWork:
    """The cells no build host has taken and the hosts still building, under one lock: a cell given back is never
    left behind by hosts that found nothing more to take."""

    def __init__(self, cells_to_run: list[Todo], hosts: int) -> None:
        self._cells, self._hosts, self._turn = deque(cells_to_run), hosts, threading.Lock()

    def next_cell(self) -> Todo | None:
        """The next cell to build; None, and this host counted out, when none is left."""
        with self._turn:
            if self._cells:
                return self._cells.popleft()
            self._hosts -= 1
            return None

    def give_back(self, cell: Todo) -> bool:
        """`cell` given back by a host that takes no more; False when that host is the last building (nobody would
        take it)."""
        with self._turn:
            if self._hosts == 1:
                return False
            self._hosts -= 1
            self._cells.appendleft(cell)
            return True


class Threads:
    """Work in threads of their own, `at_once` at a time (boots, while the main thread builds; builds, one per build
    host). The block's end waits for them all and raises the first failure of one (the others stopped); left by an
    exception (a stopping signal, a failed build), it stops what runs (supervise.stops_when: a VM, a build on a build
    host), drops what has not started, and waits for their cleanup before the exception goes on: no QEMU or remote
    build outlives the task."""

    def __init__(self, at_once: int) -> None:
        self._pool = ThreadPoolExecutor(at_once, thread_name_prefix="vngtasks")
        self._stop = threading.Event()
        self._started: list[Future[None]] = []

    def start(self, work: Callable[..., None], *args: object) -> None:
        self._started.append(self._pool.submit(self._stoppable, work, *args))

    def _stoppable(self, work: Callable[..., None], *args: object) -> None:
        with supervise.stops_when(self._stop):
            work(*args)

    def check(self) -> None:
        """The failure of a thread's work that ended, raised here."""
        for future in list(self._started):
            if future.done():
                future.result()

    def __enter__(self) -> Threads:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is None:
                ended, _ = wait(self._started, return_when=FIRST_EXCEPTION)
                for future in ended:
                    future.result()
        finally:
            self._stop.set()
            self._pool.shutdown(wait=True, cancel_futures=True)


def describe_share(settings: Settings, share: vm.Host) -> str:
    cpus = f"{share.cpus} CPU(s)" if settings.cpus is None else f"{settings.cpus} CPU(s)"
    if settings.memory_mib is not None:
        return f"{cpus} and {settings.memory_mib} MiB"
    return f"{cpus} and 90% of {share.memory_mib} MiB (at most {settings.arch.tcg_memory_cap_mib} MiB under TCG)"


def _json(done: object) -> list[dict]:
    return [dataclasses.asdict(cell) for cell in done]  # type: ignore[attr-defined]


def table(done: list[Done]) -> str:
    """The cells as a markdown table (the terminal's and $GITHUB_STEP_SUMMARY's)."""
    rows = ["| tag | arch | base | commit | result | build s | boot s | kernel | crashes | tests |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for cell in done:
        result = cell.result if cell.result == PASSED else f"{cell.result} ({cell.status})"
        tests = "" if cell.tests is None else " ".join(f"{k} {v}" for k, v in cell.tests.items())
        cells = [
            cell.tag, cell.arch, cell.kconfig_base, cell.sha[:12], result, f"{cell.build_seconds:.0f}",
            f"{cell.boot_seconds:.0f}", "cache" if cell.cache_hit else "built", "; ".join(cell.crashes), tests,
        ]  # fmt: skip
        rows.append("| " + " | ".join(printable(text).replace("|", "\\|") for text in cells) + " |")
    return "\n".join(rows) + "\n"


def conclude(record: Path, wanted: dict, done: list[Done]) -> int:
    """The table printed and in the job summary, the report in log-dir, one line per failed cell; the status."""
    text = table(done)
    log.show_and_summarize(text)
    write_atomically(record, json.dumps({"arguments": wanted, "cells": _json(done)}, indent=2) + "\n", 0o644)
    failed = [cell for cell in done if cell.result != PASSED]
    for cell in failed:
        log.warn(f"matrix: {cell.cell.label}: {cell.result} ({cell.status})")
    return FAILED if failed else 0
