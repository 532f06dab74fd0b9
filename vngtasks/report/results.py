"""A run's test results: found where the `results` setting says, judged against the failures it expects, told.

`ktap` is the workload's stdout (its start, at most STDOUT_COPY_BYTES, copied on the host as it came), `kunit` the
kernel's log (where KUnit's built-in suites print at boot: the guest's dmesg, else the console), anything else a
workspace file the workload wrote (read after the run, never through a link, bounded). What they hold is parsed as
KTAP/TAP (ktap.py).

How results change a run's status (`status_with`): a new failure (or a test that never got its result) fails
a run the workload passed (exit 1); when every failure is known (known-failures, results-baseline), the
workload's nonzero status is taken to be theirs (exit 0); a nonzero status without any failing test is kept
(something else failed). No test found at all fails a passing run. A VM that never reported keeps its status.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import log
from ..errors import FAILED
from ..files import read_inside
from ..health import kernel_and_program_lines
from ..settings import Settings
from ..supervise import STDOUT_COPY_BYTES
from ..validate import InputError
from . import ktap
from .known import Known, read_baseline, read_rules

KTAP, KUNIT = "ktap", "kunit"  # the `results` values that are not a file
FILE_BYTES = 16 * 1024 * 1024  # the most of a results file read
SHOWN_FAILURES = 50  # failing tests named one line each (terminal, annotations); results.json has all
MESSAGE_CHARS = 300
RESULTS_JSON, RESULTS_XML = "results.json", "results.xml"
BOOT_TIMESTAMP = "[    0.000000]"  # a kernel log's first line, when nothing of it was dropped
_FAILED = (ktap.FAIL, ktap.ERROR)
_SKIPPED = (ktap.SKIP, ktap.XFAIL)
_SAID = {ktap.PASS: "passed", ktap.FAIL: "failed", ktap.SKIP: "skipped", ktap.ERROR: "no result", ktap.XFAIL: "xfail"}


@dataclass(frozen=True)
class Verdict:
    """One leaf test as the run reports it."""

    id: str  # `suite/sub/test`
    suite: str
    status: str  # ktap's PASS, FAIL, SKIP, ERROR or XFAIL
    reason: str
    diagnostics: tuple[str, ...]
    seconds: float | None
    known: str  # what lists it as a known failure ("known-failures line 3 (...)", "results-baseline"); "": new

    @property
    def name(self) -> str:
        """Its id without the suite: the testcase's name in JUnit."""
        prefix = self.suite + "/"
        return self.id[len(prefix) :] if self.id.startswith(prefix) else self.id

    @property
    def failed(self) -> bool:
        return self.status in _FAILED

    def message(self) -> str:
        """One printable line that says why it failed or was skipped."""
        said = self.reason or next((line for line in self.diagnostics if line), "") or _SAID[self.status]
        return log.printable(said)[:MESSAGE_CHARS]


@dataclass(frozen=True)
class Results:
    source: str  # the `results` setting
    release: str  # the guest's kernel
    verdicts: tuple[Verdict, ...]
    fixed: tuple[str, ...]  # known failures that did not fail this time, each as its listing says it
    problem: str = ""  # why fewer results than the run printed may be here (cut, missing file)

    def count(self, *statuses: str) -> int:
        return sum(verdict.status in statuses for verdict in self.verdicts)

    @property
    def totals(self) -> dict[str, int]:
        failed = [verdict for verdict in self.verdicts if verdict.failed]
        return {
            "passed": self.count(ktap.PASS),
            "failed": len(failed),
            "skipped": self.count(*_SKIPPED),
            "errors": self.count(ktap.ERROR),
            "known": sum(bool(verdict.known) for verdict in failed),
            "new": sum(not verdict.known for verdict in failed),
        }

    def suites(self) -> dict[str, list[Verdict]]:
        grouped: dict[str, list[Verdict]] = {}
        for verdict in self.verdicts:
            grouped.setdefault(verdict.suite, []).append(verdict)
        return grouped


def expected(s: Settings) -> Known:
    """The failures the run expects (the files were checked with the settings: see validate.known_failures)."""
    try:
        rules = read_rules(s.known_failures) if s.known_failures else ()
        baseline = read_baseline(s.results_baseline) if s.results_baseline else frozenset()
    except ValueError as error:  # changed since the settings were read
        raise InputError("known_failures" if s.known_failures else "results_baseline", str(error)) from None
    return Known(rules, baseline)


def stream(s: Settings, stdout: bytes | None, console: bytes, dmesg: bytes | None) -> tuple[str, str]:
    """The text `results` names, and a problem with it to tell ("" when none)."""
    if s.results == KTAP:
        data = stdout or b""
        cut = f"the workload's stdout is over {STDOUT_COPY_BYTES // 2**20} MiB: the rest is not parsed"
        return data.decode(errors="replace"), cut if len(data) >= STDOUT_COPY_BYTES else ""
    if s.results == KUNIT:
        return kernel_log(console, dmesg), ""
    data = read_inside(s.workspace, s.results, FILE_BYTES + 1)
    if data is None:
        return "", f"{s.results} was not written (or is not a regular file in the workspace)"
    cut = f"{s.results} is over {FILE_BYTES // 2**20} MiB: the rest is not parsed"
    return data[:FILE_BYTES].decode(errors="replace"), cut if len(data) > FILE_BYTES else ""


def kernel_log(console: bytes, dmesg: bytes | None) -> str:
    """Where KUnit's boot-time suites are whole: the kernel's own lines of the guest's dmesg when it holds the log
    from boot (the console, hvc0, comes up mid-boot: on a loaded host, after KUnit began), else the console."""
    if dmesg is not None:
        kernel = kernel_and_program_lines(dmesg)[0]
        if kernel and kernel[0].startswith(BOOT_TIMESTAMP):
            return "\n".join(kernel)
    return console.decode(errors="replace")


def judge(text: str, source: str, release: str, known: Known, ended: str = "", problem: str = "") -> Results:
    """The leaves of `text` with what lists each failure; `ended` (how a run that never reported ended) is the
    reason of each test whose result never came."""
    verdicts = []
    for case in ktap.leaves(ktap.parse(text)):
        test = case.test
        reason = f"no result: {ended}" if ended and test.status == ktap.ERROR else test.reason
        listing = known.listing(case.id, release) if test.status in _FAILED else ""
        verdicts.append(
            Verdict(case.id, case.suite, test.status, reason, tuple(test.diagnostics), test.seconds, listing)
        )
    return Results(source, release, tuple(verdicts), fixed_ones(known, verdicts, release), problem)


def fixed_ones(known: Known, verdicts: list[Verdict], release: str) -> tuple[str, ...]:
    """Known failures that did not fail: a rule that names tests that ran, none of them failing; a baseline
    failure that passed."""
    fixed = []
    for rule in known.rules:
        named = [verdict for verdict in verdicts if rule.covers(verdict.id, release)]
        if named and not any(verdict.failed for verdict in named):
            fixed.append(rule.shown())
    fixed += [
        f"{verdict.id} (results-baseline)"
        for verdict in verdicts
        if verdict.status == ktap.PASS and verdict.id in known.baseline
    ]
    return tuple(fixed)


def status_with(results: Results, status: int, reported: bool) -> int:
    """The run's status once its results are in (see the module's docstring); `reported`: the workload's own
    status came back."""
    if not reported:
        return status
    totals = results.totals
    if not results.verdicts:
        return status or FAILED
    if totals["new"]:
        return status or FAILED
    return 0 if totals["known"] else status


def tell(results: Results, in_actions: bool) -> None:
    """One line per failing test (new, then known) and per known failure that did not fail, then the totals;
    in GitHub Actions, annotations."""
    if results.problem:
        log.warn(f"results: {results.problem}")
    if not results.verdicts:
        log.warn(f"results: no test results found in {_where(results.source)}")
        return
    failing = sorted((v for v in results.verdicts if v.failed), key=lambda v: bool(v.known))
    for verdict in failing[:SHOWN_FAILURES]:
        _say(verdict, in_actions)
    if len(failing) > SHOWN_FAILURES:
        log.info(f"results: {len(failing) - SHOWN_FAILURES} more failing tests: see {RESULTS_JSON}")
    for listing in results.fixed[:SHOWN_FAILURES]:
        log.warn(f"results: fixed? {listing} did not fail")
    t = totals_line(results)
    log.info(f"results: {t}")


def totals_line(results: Results) -> str:
    t = results.totals
    failed = f"{t['failed']} failed ({t['new']} new, {t['known']} known)" if t["known"] else f"{t['failed']} failed"
    return f"{t['passed']} passed, {failed}, {t['skipped']} skipped"


def _say(verdict: Verdict, in_actions: bool) -> None:
    kind = "error" if verdict.status == ktap.ERROR else "failure"
    if in_actions:
        command, said = ("notice", f" ({verdict.known})") if verdict.known else ("error", "")
        title = f"{'known' if verdict.known else 'new'} test {kind}"
        log.annotate(command, title, f"{verdict.id}: {verdict.message()}{said}")
    else:
        said = f"known ({verdict.known})" if verdict.known else "new"
        log.info(f"results: {kind.upper()} {said}: {verdict.id}: {verdict.message()}")


def _where(source: str) -> str:
    return {KTAP: "the workload's stdout", KUNIT: "the kernel's log (is KUnit built in?)"}.get(source, source)


def record_json(results: Results) -> dict[str, object]:
    """results.json: the totals and every leaf test, with what makes a failure known."""
    return {
        "format": "vngtasks-results 1",
        "source": results.source,
        "kernel": results.release,
        "totals": results.totals,
        "problem": results.problem,
        "fixed": list(results.fixed),
        "tests": [
            {
                "id": verdict.id,
                "suite": verdict.suite,
                "status": verdict.status,
                "reason": verdict.reason,
                "known": verdict.known,
                "seconds": verdict.seconds,
                "diagnostics": list(verdict.diagnostics),
            }
            for verdict in results.verdicts
        ],
    }


def summary_markdown(results: Results) -> str:
    """The step summary's part: a table of suites, then the failing tests' ids, new first."""
    rows = [
        f"\n#### Test results ({_where(results.source)})\n",
        "| suite | passed | failed | skipped |",
        "|---|---|---|---|",
    ]
    for suite, verdicts in results.suites().items():
        passed = sum(v.status == ktap.PASS for v in verdicts)
        failed = sum(v.failed for v in verdicts)
        skipped = sum(v.status in _SKIPPED for v in verdicts)
        rows.append(f"| {log.table_cell(suite)} | {passed} | {failed} | {skipped} |")
    rows.append(f"\n{totals_line(results)}\n")
    new = [v.id for v in results.verdicts if v.failed and not v.known]
    known = [v.id for v in results.verdicts if v.failed and v.known]
    for title, ids in (("New failures", new), ("Known failures", known), ("Fixed?", list(results.fixed))):
        if ids:
            shown = ", ".join(f"`{log.table_cell(i)}`" for i in ids[:SHOWN_FAILURES])
            more = f" and {len(ids) - SHOWN_FAILURES} more" if len(ids) > SHOWN_FAILURES else ""
            rows.append(f"**{title}:** {shown}{more}\n")
    return "\n".join(rows) + "\n"


def action_outputs(results: Results) -> dict[str, str]:
    t = results.totals
    return {"tests-passed": str(t["passed"]), "tests-failed": str(t["failed"]), "tests-skipped": str(t["skipped"])}
