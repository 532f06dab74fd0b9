"""`invoke matrix`: refs x arches x kconfig bases, each cell resolved, built (or found) and booted, one table.

A cell is one setting of (tag, arch, kconfig-base), the other settings shared. Cells run one after another: the
build by provide.py (the cache, ccache, the build host when one is set), the boot by vm.py with the cell's own
directory of log-dir (`matrix/NN-TAG-ARCH-BASE/`). After every cell the kept cells are written beside the kernel
cache (cache-dir/matrix/ARGUMENTS-HASH.json): a re-run with the same arguments takes the finished cells from
there, without building or booting them again. log-dir/matrix.json is the report only (log-dir is the workspace
by default, which a guest writes), never read back; the kept file is read as any record on disk: bounded, each
cell's fields of their types, one of this matrix's cells.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from invoke import Context

from . import log, provide, resolve
from .errors import BAD_INPUT, FAILED, Failure
from .files import kept_list, typed, write_atomically
from .log import printable
from .settings import Settings
from .validate import make_directory

RECORD = "matrix.json"  # in log-dir
KEPT_BYTES = 4 * 1024 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_CELLS = 64
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


def run_cell(c: Context, settings: Settings, resolved: resolve.Resolved, number: int, cell: Cell) -> Done:
    """One cell built (or found) and booted, its logs in its own directory of log-dir."""
    log.info(f"matrix: cell {number}: {cell.label} ({resolved.sha12})")
    s = dataclasses.replace(settings, log_dir=settings.log_dir / "matrix" / cell.directory(number))
    make_directory("log_dir", s.log_dir)
    ran = provide.build_and_boot(c, s, resolved, s.run)
    build_s, boot_s = round(ran.build_seconds, 1), round(ran.boot_seconds, 1)
    if ran.record is None:
        log.warn(f"matrix: {cell.label}: no kernel: {ran.failure}")
        return Done(*_place(cell), NO_KERNEL, FAILED, resolved.sha, "", build_s, 0.0, ran.cache_hit, (), None)
    record = ran.record
    result = PASSED if record.status == 0 else FAILED_RUN
    titles = tuple(crash.title for crash in record.crashes.found)
    totals = None if record.results is None else dict(record.results.totals)
    return Done(*_place(cell), result, record.status, resolved.sha, record.release, build_s, boot_s, ran.cache_hit,
                titles, totals)  # fmt: skip


def _place(cell: Cell) -> tuple[str, str, str]:
    return cell.tag, cell.arch, cell.kconfig_base


def matrix(c: Context, settings: list[Settings]) -> int:
    """Every cell resolved, then each built and booted in order, once (kept cells are not run again); the table;
    0 when every cell passed."""
    first = settings[0]
    resolved = [resolve.resolve_kernel(c, s, record=False) for s in settings]
    wanted = arguments(settings, resolved)
    kept = kept_file(first.cache_dir, wanted)
    order = [Cell(s.tag, s.arch.name, str(s.kconfig_base)) for s in settings]
    done = finished(kept, wanted, {cell.label for cell in order})
    if done:
        log.info(f"matrix: resumed from {kept}: {len(done)} of {len(order)} cell(s) done")
    kept.parent.mkdir(parents=True, exist_ok=True)
    for number, (cell, s, r) in enumerate(zip(order, settings, resolved, strict=True), 1):
        if cell.label not in done:
            done[cell.label] = run_cell(c, s, r, number, cell)
            write_atomically(kept, json.dumps({"arguments": wanted, "cells": _json(done.values())}) + "\n")
    ended = [done[cell.label] for cell in order]
    return conclude(first.log_dir / RECORD, wanted, ended)


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
