"""Test results as kernel test suites print them: KTAP (kselftest, KUnit) and TAP 13/14, nested at any depth.

A stream may hold several documents one after another (a workload that runs several test programs), each
opened by a version line (`KTAP version 1`, `TAP version 13`) or a plan. A test's subtests come before its
own result line, one level deeper: indented four spaces (KTAP, KUnit), or prefixed `# ` (the kselftest runner
nests a program's own TAP so). Kernel console lines lose their timestamp first. What the parser makes of a
stream is a tree of `Test`s; `leaves` flattens it to the cases a report counts.

Everything that is not a result is kept as the diagnostics of the test that follows it. A test the plan
announced that never got a result (the program crashed, the output was cut off, a bail out) is an error
with that said, never a pass; so is a test whose subtests began and whose own result never came.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PASS, FAIL, SKIP, ERROR, XFAIL = "pass", "fail", "skip", "error", "xfail"
_TIMESTAMP = re.compile(r"^\[\s*[0-9]+\.[0-9]+\]\s?")
_VERSION = re.compile(r"^(?:K?TAP) version [0-9]+\s*$")
_PLAN = re.compile(r"^1\.\.([0-9]+)")
_RESULT = re.compile(r"^(not ok|ok)\b(?:\s+([0-9]+))?\s*(?:-\s*)?(.*?)\s*$")
_DIRECTIVE = re.compile(r"\s*(SKIP|TODO|XFAIL)\b\s*(.*)$", re.IGNORECASE)
_SUBTEST = re.compile(r"^#\s*Subtest:\s*(.*?)\s*$")
_BAIL = re.compile(r"^Bail out!\s*(.*)$")
_DURATION = re.compile(r"(?:time|duration)[=: ]\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s)?\b", re.IGNORECASE)
_UNSAFE = re.compile(r"[^A-Za-z0-9._:@+=, -]+")
_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-_])")  # a terminal's colour or cursor sequence
_OPENING = ("version", "subtest", "plan", "result")  # what may open a document one level deeper
# A stream is what a guest printed: bounded in what a parse keeps. Deeper lines are diagnostics; a test keeps the
# last lines before its result; a line is cut; a plan announces at most so many tests.
MAX_DEPTH = 16
DIAGNOSTIC_LINES = 100
LINE_CHARS = 1000
MAX_PLANNED = 100_000


@dataclass
class Test:
    """One test of a document: its result, and its subtests when it has any."""

    name: str
    status: str  # PASS, FAIL, SKIP, ERROR (no result came) or XFAIL (a failure expected: TODO, XFAIL)
    reason: str = ""  # a directive's text, or why an ERROR is one
    diagnostics: list[str] = field(default_factory=list)  # the lines before its result, its own subtests' aside
    subtests: list[Test] = field(default_factory=list)
    seconds: float | None = None


@dataclass(frozen=True)
class Case:
    """A leaf of the tree, as a report counts it: its id is the names of the path to it, `suite/sub/test`."""

    id: str
    suite: str
    test: Test


@dataclass
class _Document:
    """A document being read at one depth: its tests so far, what it announced, what is pending."""

    depth: int
    name: str = ""  # from a `# Subtest:` line
    planned: int | None = None
    tests: list[Test] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # lines since the last result: the next test's diagnostics
    child: _Document | None = None  # the subtests of the test whose result comes next
    bailed: str | None = None


def parse(text: str) -> list[Test]:
    """Every document of `text`, as one list of top-level tests."""
    parser = _Parser()
    for raw in text.splitlines():
        parser.feed(_TIMESTAMP.sub("", raw.rstrip("\r"))[:LINE_CHARS])
    return parser.close()


class _Parser:
    def __init__(self) -> None:
        self.done: list[Test] = []
        self.top: _Document | None = None

    def feed(self, line: str) -> None:
        depth, content, kind = self._locate(line)
        if kind is None:  # not TAP at any open depth: a diagnostic of the innermost document
            if self.top is not None:
                _keep(self._innermost().pending, line.strip())
            return
        if depth == 0 and kind in ("version", "plan") and self.top is not None and self._finished(self.top):
            self._close_top()
        if self.top is None:
            self.top = _Document(0)
        document = self._at(depth)
        if kind == "version":
            return
        if kind == "subtest":
            document.name = _SUBTEST.match(content)[1]  # type: ignore[index]
        elif kind == "plan":
            document.planned = min(int(_PLAN.match(content)[1]), MAX_PLANNED)  # type: ignore[index]
        elif kind == "bail":
            document.bailed = _BAIL.match(content)[1] or "bail out"  # type: ignore[index]
        elif kind == "diagnostic":
            _keep(document.pending, content.lstrip("#").strip())
        elif kind == "result":
            self._result(document, content)

    def close(self) -> list[Test]:
        if self.top is not None:
            self._close_top()
        return self.done

    def _locate(self, line: str) -> tuple[int, str, str | None]:
        """The depth a line belongs to and what it is there: the deepest reading that an open document (or one a
        level deeper, for a line that opens one) can take. A level is four spaces (KTAP) or `# ` (kselftest)."""
        open_depth = self._open_depth()
        readings = [(0, line)]
        rest = line
        while len(readings) <= MAX_DEPTH:
            if rest.startswith("    "):
                rest = rest[4:]
            elif rest.startswith("# ") and (_is_tap(rest[2:]) or len(readings) <= open_depth):
                rest = rest[2:]
            else:
                break
            readings.append((len(readings), rest))
        for depth, content in reversed(readings):
            kind = _kind(content.strip())
            if kind is None:
                continue
            if depth <= open_depth or (depth == open_depth + 1 and kind in _OPENING):
                return depth, content.strip(), kind
        return 0, line.strip(), None

    def _open_depth(self) -> int:
        depth, document = -1, self.top
        while document is not None:
            depth, document = document.depth, document.child
        return depth

    def _innermost(self) -> _Document:
        document = self.top
        assert document is not None
        while document.child is not None:
            document = document.child
        return document

    def _at(self, depth: int) -> _Document:
        """The document at `depth`, made (as the subtests of the coming result) when one is one level deeper."""
        document = self.top
        assert document is not None
        while document.depth < depth:
            if document.child is None:
                document.child = _Document(document.depth + 1)
            document = document.child
        # A line at `depth` closes nothing: deeper documents stay open until their parent's result.
        return document

    def _result(self, document: _Document, content: str) -> None:
        found = _RESULT.match(content)
        assert found is not None
        ok, description = found[1] == "ok", found[3]
        # After `#`: a directive, or a comment (`# exit=1`).
        name, _, comment = ("", "#", description[1:]) if description.startswith("#") else description.partition(" #")
        directive = _DIRECTIVE.match(comment)
        status = PASS if ok else FAIL
        reason = ""
        if directive:
            kind, reason = directive[1].upper(), directive[2].strip()
            status = SKIP if kind == "SKIP" else (XFAIL if not ok or kind == "XFAIL" else status)
        child, document.child = document.child, None
        subtests = _finished_tests(child) if child is not None else []
        if child is not None and child.name and not name:
            name = child.name
        seconds = _seconds(document.pending)
        document.tests.append(Test(name.strip(), status, reason, document.pending, subtests, seconds))
        document.pending = []

    def _finished(self, document: _Document) -> bool:
        return document.child is None and (document.planned is None or len(document.tests) >= document.planned)

    def _close_top(self) -> None:
        assert self.top is not None
        self.done += _finished_tests(self.top)
        self.top = None


def _finished_tests(document: _Document) -> list[Test]:
    """A document's tests when it ends: a test whose subtests began and whose result never came is an error, as
    is each one the plan announced that never got a result."""
    tests = list(document.tests)
    if document.child is not None:  # a test was running: its subtests came, its own result did not
        running = _finished_tests(document.child)
        name = document.child.name or f"test {len(tests) + 1}"
        why = f"no result: {document.bailed}" if document.bailed else "no result: crashed or cut off while running"
        tests.append(Test(name, ERROR, why, document.pending, running))
    if document.planned is not None:
        why = f"no result: bail out: {document.bailed}" if document.bailed else "no result: crashed or cut off"
        tests += [Test(f"test {number}", ERROR, why) for number in range(len(tests) + 1, document.planned + 1)]
    missing = [test for test in tests[len(document.tests) :] if not test.diagnostics]
    if missing:  # what came after the last result is the running test's: often the crash that ended it
        missing[0].diagnostics = document.pending
    return tests


def _keep(lines: list[str], line: str) -> None:
    lines.append(line)
    if len(lines) > DIAGNOSTIC_LINES:
        del lines[0]


def _is_tap(text: str) -> bool:
    return _kind(text) not in (None, "diagnostic")


def _kind(text: str) -> str | None:
    if _VERSION.match(text):
        return "version"
    if _SUBTEST.match(text):
        return "subtest"
    if _PLAN.match(text):
        return "plan"
    if _RESULT.match(text):
        return "result"
    if _BAIL.match(text):
        return "bail"
    if text.startswith("#"):
        return "diagnostic"
    return None


def _seconds(lines: list[str]) -> float | None:
    """A duration a test's diagnostics state (`time=12ms`, `duration: 0.5 s`), when one does."""
    for line in reversed(lines):
        found = _DURATION.search(line)
        if found:
            value = float(found[1])
            return value / 1000 if (found[2] or "").lower() == "ms" else value
    return None


def leaves(tests: list[Test], suite: str = "") -> list[Case]:
    """The tests without subtests, each with its id (the names on its path, `/`-joined) and its suite (the
    name of the top-level test it is under; a top-level test without subtests is its own suite)."""
    cases = []
    for test in tests:
        top = suite or _id_part(test.name)
        if test.subtests:
            for case in leaves(test.subtests, top):
                cases.append(Case(f"{_id_part(test.name)}/{case.id}", top, case.test))
            if test.status == ERROR:  # it never said how it ended: that is a case of its own
                cases.append(Case(_id_part(test.name), top, test))
        else:
            cases.append(Case(_id_part(test.name), top, test))
    return cases


def _id_part(name: str) -> str:
    """A name as one part of an id: no `/` (the separator), no control characters, no spaces at its ends."""
    return _UNSAFE.sub("_", _ESCAPE.sub("", name).replace("/", "_")).strip() or "_"
