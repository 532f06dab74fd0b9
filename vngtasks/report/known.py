"""Failures a run expects: the `known-failures` file's rules and an earlier run's `results.json` (its baseline).

A known-failures line is a test id or a glob of ids (`*` and `?` match any characters, `/` too), then
optionally a regex in brackets that scopes it to the kernels whose release (`uname -r` in the guest) it matches:

    # TCG is too slow for these
    selftests: timers: nsleep-lat/*
    list-kunit-test/list_test_list_add [^6\\.1\\.]

Blank lines and lines starting with `#` are skipped; ` #` starts a comment at the end of a line. Both files are
the user's, but a baseline is a record on disk an earlier run wrote: read bounded, every field checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from ..files import read_regular

KNOWN_FAILURES_BYTES = 1024 * 1024
BASELINE_BYTES = 64 * 1024 * 1024
FORMAT = "vngtasks-results 1"  # results.json's `format`: what a baseline must say it is
FAILED_STATUSES = ("fail", "error")
_SCOPE = re.compile(r"^(.*?)\s+\[(.*)\]$")


@dataclass(frozen=True)
class Rule:
    """One line of known-failures: the ids it names, on the kernels it names."""

    line: int
    ids: str  # an id or a glob of ids
    kernel: re.Pattern[str] | None  # searched in the guest's release; None: every kernel

    def covers(self, case_id: str, release: str) -> bool:
        return fnmatchcase(case_id, self.ids) and (self.kernel is None or self.kernel.search(release) is not None)

    def shown(self) -> str:
        return f"known-failures line {self.line} ({self.ids})"


@dataclass(frozen=True)
class Known:
    """What a run may fail without failing: the rules, and the ids that failed in the baseline."""

    rules: tuple[Rule, ...] = ()
    baseline: frozenset[str] = frozenset()

    def listing(self, case_id: str, release: str) -> str:
        """What makes a failure of `case_id` known (the rule, or the baseline), or "" when it is new."""
        for rule in self.rules:
            if rule.covers(case_id, release):
                return rule.shown()
        return "results-baseline" if case_id in self.baseline else ""


def parse_rules(text: str) -> tuple[Rule, ...]:
    """The rules of a known-failures file; a bad line raises ValueError naming it."""
    rules = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.split(" #", 1)[0].rstrip()
        scope = _SCOPE.match(line)
        kernel = None
        if scope:
            line = scope[1]
            try:
                kernel = re.compile(scope[2])
            except re.error as error:
                raise ValueError(f"line {number}: {scope[2]!r} is not a valid regex: {error}") from None
        if not line.isprintable():
            raise ValueError(f"line {number}: holds a control character")
        rules.append(Rule(number, line, kernel))
    return tuple(rules)


def read_rules(path: Path) -> tuple[Rule, ...]:
    """A known-failures file's rules; ValueError says what is wrong with it."""
    data = read_regular(path, KNOWN_FAILURES_BYTES + 1)
    if data is None or len(data) > KNOWN_FAILURES_BYTES:
        raise ValueError(f"{path} is not a regular file of at most {KNOWN_FAILURES_BYTES // 1024} KiB")
    try:
        return parse_rules(data.decode())
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None


def read_baseline(path: Path) -> frozenset[str]:
    """The ids that failed in an earlier run's results.json (its `fail` and `error` tests); ValueError says what
    is wrong with it."""
    data = read_regular(path, BASELINE_BYTES + 1)
    if data is None or len(data) > BASELINE_BYTES:
        raise ValueError(f"{path} is not a regular file of at most {BASELINE_BYTES // 2**20} MiB")
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError(f"{path} is not JSON") from None
    tests = record.get("tests") if isinstance(record, dict) and record.get("format") == FORMAT else None
    if not isinstance(tests, list):
        raise ValueError(f"{path} is not a results.json of vngtasks (format {FORMAT!r})")
    failed = set()
    for test in tests:
        if not (isinstance(test, dict) and isinstance(test.get("id"), str) and isinstance(test.get("status"), str)):
            raise ValueError(f"{path}: a test without a string id and status")
        if test["status"] in FAILED_STATUSES:
            failed.add(test["id"])
    return frozenset(failed)
