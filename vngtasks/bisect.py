"""`invoke bisect`: the first commit between a good and a bad one where the workload fails.

Owns: the range (good and bad resolved exactly; only the commits from good to bad fetched, without
their trees where the server filters, and without anything reachable from good when good is a ref),
git's own bisect over it in a repository of its own under cache-dir (git picks each step, the
neighbour of a skipped one, and writes the log that replays it), a step's verdict from its build and
its exit status, and the record: `bisect.json` in log-dir, rewritten after every step. A re-run with the same
arguments resumes without redoing a finished step, from the steps kept beside the range's repository in
cache-dir (`steps.json`): log-dir is the workspace by default, which a guest writes, so bisect.json is a report
only, never read back; the steps file is read as any record on disk, each step checked (a commit of the range,
its fields' types, its verdict). Each step's kernel is found
or built by provide.py (cache, ccache, build-host) and booted by vm.py. No shell runs here: git gets
argument lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from invoke import Context

from . import log, provide, resolve
from .errors import BAD_INPUT, FAILED, MISSING_TOOL, NO_STATUS, SPLAT, Failure
from .files import kept_list, remove_tree, typed, write_atomically
from .log import printable
from .report import ktap
from .runrecord import Record
from .settings import Settings

GOOD, BAD, SKIP = "good", "bad", "skip"
VERDICTS = (GOOD, BAD, SKIP)
BUILD_FAILURE_VERDICTS = (SKIP, BAD)
RECORD = "bisect.json"
FOUND, UNDECIDED = 0, 1  # the task's exit status: the first bad commit named, or not decidable
_RANGE_REFS = "refs/bisect-range"


def verdict(status: int | None, *, splat_ignored: bool, on_build_failure: str) -> str:
    """A step's verdict: `status` is the boot's exit status, None when the commit did not build."""
    if status is None:
        return on_build_failure
    if status == 0:
        return GOOD
    if status == SPLAT:
        return GOOD if splat_ignored else BAD
    if status == NO_STATUS:  # no status came back (panic, no boot): as `git bisect run`'s 125, skip
        return SKIP
    return BAD  # the workload's own failure, or 124: run-timeout expired


@dataclass(frozen=True)
class Step:
    """One finished step of the record."""

    sha: str
    subject: str
    verdict: str
    status: int | None  # None: the commit did not build
    build_seconds: float
    boot_seconds: float
    cache_hit: bool


@dataclass(frozen=True)
class State:
    """Where git's bisect is: the commit to test next, else the first bad one, else the candidates."""

    next: str | None
    first_bad: str | None
    candidates: tuple[str, ...]  # when only skipped commits are left: the first bad is one of them
    untested: int  # commits left that could still be tested


class Repo:
    """A repository of the range alone, under cache-dir, where `git bisect` runs without a checkout."""

    def __init__(self, cache_dir: Path, good: str, bad: str) -> None:
        self.path = cache_dir / "bisect" / f"{good[:12]}-{bad[:12]}"
        self.good, self.bad = good, bad
        self._commits: set[str] | None = None

    @property
    def steps_file(self) -> Path:
        """The finished steps, kept for a re-run: beside the repository, where only we write."""
        return self.path / "steps.json"

    def commits(self) -> set[str]:
        """The commits a step may test: those after good, up to bad."""
        if self._commits is None:
            self._commits = set(self.git("rev-list", self.bad, f"^{self.good}").split())
        return self._commits

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                ["git", "-C", str(self.path), *args], capture_output=True, text=True, check=False,
                env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
            )  # fmt: skip
        except FileNotFoundError:
            raise Failure("bisect: git is not installed", MISSING_TOOL) from None

    def git(self, *args: str, check: bool = True) -> str:
        done = self.run(*args)
        if check and done.returncode != 0:
            error = printable((done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1])
            raise Failure(f"bisect: git {args[0]}: {error}", FAILED)
        return done.stdout

    def fetch(self, url: str, good: resolve.Resolved, bad: resolve.Resolved) -> None:
        """The commits from good to bad, no trees (where the server filters) and, when good is a ref,
        nothing reachable from it (`--shallow-exclude`); good itself, alone."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "--bare")
        if url.startswith("/"):  # a local path: git's local transport cannot fetch without trees
            url = Path(url).as_uri()
        common = ["fetch", "-q", "--no-tags", "--filter=tree:0"]
        exclude = [f"--shallow-exclude={good.ref}"] if good.ref else []
        self.git(*common, *exclude, "--", url, f"{bad.ref or bad.sha}:{_RANGE_REFS}/bad")
        # Good alone (already there when it is in bad's history: then only marked where history may stop).
        self.git(*common, "--depth=1", "--", url, f"{good.ref or good.sha}:{_RANGE_REFS}/good")
        for name, sha in (("good", good.sha), ("bad", bad.sha)):
            if self.git("rev-parse", f"{_RANGE_REFS}/{name}^{{commit}}").strip() != sha:
                raise Failure(f"bisect: {name}: the remote moved it while fetching; run again", FAILED)

    def is_ancestor(self) -> bool:
        """Good is an ancestor of bad: in the history fetched, or, where the fetch cut it (nothing reachable
        from good was fetched), a parent of a commit at the cut: a commit object names its parents even so."""
        if self.run("merge-base", "--is-ancestor", self.good, self.bad).returncode == 0:
            return True
        shallow = self.path / "shallow"
        cut = [sha for sha in shallow.read_text().split() if sha != self.good] if shallow.is_file() else []
        return any(f"parent {self.good}" in self.git("cat-file", "commit", sha).splitlines() for sha in cut)

    def start(self) -> None:
        """A fresh `git bisect` of bad and good (HEAD, which bisect reads, on bad; nothing checked out)."""
        self.git("bisect", "reset", check=False)
        self.git("update-ref", "refs/heads/bisect", self.bad)
        self.git("symbolic-ref", "HEAD", "refs/heads/bisect")
        self.git("bisect", "start", "--no-checkout", self.bad, self.good)

    def mark(self, sha: str, said: str) -> None:
        self.git("bisect", said, sha, check=False)  # its status is not 0 when only skipped ones are left

    def _refs(self, pattern: str) -> list[str]:
        return self.git("for-each-ref", "--format=%(objectname)", pattern).split()

    def state(self) -> State:
        bad = self.git("rev-parse", "refs/bisect/bad").strip()
        left = self.git("rev-list", bad, "--not", *self._refs("refs/bisect/good-*")).split()
        skipped = set(self._refs("refs/bisect/skip-*"))
        untested = [sha for sha in left if sha != bad and sha not in skipped]
        if left == [bad]:
            return State(None, bad, (), 0)
        if not untested:
            return State(None, None, tuple(left), 0)
        return State(self.git("rev-parse", "BISECT_HEAD").strip(), None, (), len(untested))

    def describe(self, sha: str) -> tuple[str, str]:
        """(subject, author date) of a commit of the range; the subject, the remote's text, printable only."""
        subject, _, date = self.git("log", "-1", "--format=%s%x00%aI", sha).rstrip("\n").partition("\0")
        return printable(subject), printable(date)

    def log(self) -> str:
        return self.git("bisect", "log", check=False)


def arguments(
    settings: Settings, good: str, bad: str, splat_ignored: bool, on_build_failure: str, test: str = "",
    same_crash: bool = False,
) -> dict:  # fmt: skip
    """What a record is for: a re-run resumes from it only when all of these are the same."""
    kconfig = settings.kconfig.read_bytes() if settings.kconfig else b""
    return {
        "good": good, "bad": bad, "kernel_url": settings.kernel_url, "name": settings.name,
        "version": settings.version, "arch": settings.arch.name, "kconfig_base": str(settings.kconfig_base),
        "kconfig_sha256": hashlib.sha256(kconfig).hexdigest(), "cc": settings.cc, "llvm": settings.llvm,
        "run": settings.run, "splat_ignored": splat_ignored, "on_build_failure": on_build_failure,
        "results": settings.results, "test": test, "same_crash": same_crash, "debug": list(settings.debug),
    }  # fmt: skip


STEP_FIELDS = {"sha": str, "subject": str, "verdict": str, "status": (int, type(None)), "build_seconds": (int, float),
               "boot_seconds": (int, float), "cache_hit": bool}  # fmt: skip
STEPS_BYTES = 4 * 1024 * 1024


def finished_steps(repo: Repo, wanted: dict) -> list[Step]:
    """The steps kept for the same arguments; none (with a warning) for another bisect's or a damaged file.
    Read as any record on disk: each step must be a commit of the range, with fields of their types and a
    verdict; its subject made printable."""
    kept = kept_list(repo.steps_file, STEPS_BYTES, wanted, "steps")
    if kept is None:
        log.warn(f"bisect: {repo.steps_file} is another bisect's or damaged: starting over")
        return []
    steps = [checked_step(step, repo.commits()) for step in kept]
    if not all(steps):
        log.warn(f"bisect: {repo.steps_file} has a step that is not one of this range: starting over")
        return []
    return [step for step in steps if step is not None]


def checked_step(step: object, commits: set[str]) -> Step | None:
    """A kept step as a Step when every field has its type, its commit is one of the range's `commits` and its
    verdict is one; else None."""
    if not isinstance(step, dict) or set(step) != set(STEP_FIELDS):
        return None
    if not all(typed(step[name], kind) for name, kind in STEP_FIELDS.items()):
        return None
    if step["sha"] not in commits or step["verdict"] not in VERDICTS:
        return None
    return Step(**{**step, "subject": printable(step["subject"])})


def write_record(record: Path, repo: Repo, wanted: dict, steps: list[Step], result: dict) -> None:
    """The steps kept for a re-run (beside the range's repository), and the report in log-dir."""
    done = [dataclasses.asdict(step) for step in steps]
    write_atomically(repo.steps_file, json.dumps({"arguments": wanted, "steps": done}) + "\n")
    report = {"arguments": wanted, "steps": done, "result": result, "git_bisect_log": repo.log()}
    write_atomically(record, json.dumps(report, indent=2) + "\n", 0o644)


def table(steps: list[Step]) -> str:
    """The steps as a markdown table (the terminal's and $GITHUB_STEP_SUMMARY's)."""
    rows = ["| step | commit | subject | verdict | build s | boot s | kernel |", "|---|---|---|---|---|---|---|"]
    for number, step in enumerate(steps, 1):
        said = step.verdict if step.status is None else f"{step.verdict} ({step.status})"
        cells = [
            str(number), step.sha[:12], step.subject, said, f"{step.build_seconds:.0f}", f"{step.boot_seconds:.0f}",
            "cache" if step.cache_hit else "built",
        ]  # fmt: skip
        rows.append("| " + " | ".join(printable(cell).replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def tested(record: Record, test: str) -> int:
    """The status a step gets from one test of its results (`--test`): 1 when it failed (or never got its result),
    0 when it passed, NO_STATUS (a skip) when it was skipped or is not in the results; a VM that never reported
    keeps its status. The rest of the run (other tests, the workload's status, splats) does not count."""
    if record.outcome.result != "workload":
        return record.status
    found = [v for v in (record.results.verdicts if record.results else ()) if v.id == test]
    if not found or all(verdict.status == ktap.SKIP for verdict in found):
        log.warn(f"bisect: test {test} {'was skipped' if found else 'is not in the results'}: the step is skipped")
        return NO_STATUS
    return FAILED if any(verdict.failed for verdict in found) else 0


def crash_verdict(titles: list[str], wanted: str) -> str:
    """`--same-crash` (syzbot's rule): a step is bad when the bad end's crash happened, skipped when another
    crash did (it may hide the one bisected), good when the kernel did not crash (whatever the workload said)."""
    if wanted in titles:
        return BAD
    return SKIP if titles else GOOD


@dataclass(frozen=True)
class Ran:
    """One commit built (or found) and booted."""

    status: int | None  # None: it did not build
    build_seconds: float
    boot_seconds: float
    cache_hit: bool
    crashes: tuple[str, ...] = ()  # the titles of its kernel's crashes


def run_step(c: Context, settings: Settings, sha: str, workload: str, test: str = "") -> Ran:
    """Build (or find) and boot one commit. With `test`, the status is that test's (see tested)."""
    step = dataclasses.replace(settings, tag=sha)
    ran = provide.build_and_boot(c, step, resolve.Resolved(sha=sha, ref="", source="sha"), workload)
    if ran.record is None:
        log.warn(f"bisect: {sha[:12]} did not build: {ran.failure}")
        return Ran(None, ran.build_seconds, 0.0, ran.cache_hit)
    status = tested(ran.record, test) if test else ran.record.status
    titles = tuple(crash.title for crash in ran.record.crashes.found)
    return Ran(status, ran.build_seconds, ran.boot_seconds, ran.cache_hit, titles)


def bad_crash(c: Context, settings: Settings, bad: resolve.Resolved) -> str:
    """`--same-crash`: the title of the bad end's first crash, from a run of it (built, or found in the cache)."""
    log.info(f"bisect: --same-crash: running the bad end {bad.sha12} for its crash")
    ran = run_step(c, settings, bad.sha, settings.run)
    if ran.status is None:
        raise Failure(f"bisect: --same-crash: the bad end {bad.sha12} did not build", FAILED)
    if not ran.crashes:
        raise Failure(f"bisect: --same-crash: the bad end {bad.sha12} did not crash: no crash to bisect", FAILED)
    log.info(f"bisect: --same-crash: bisecting {ran.crashes[0]}")
    return ran.crashes[0]


def bisect(
    c: Context, settings: Settings, good: resolve.Resolved, bad: resolve.Resolved, *,
    splat_ignored: bool = False, on_build_failure: str = SKIP, test: str = "", same_crash: bool = False,
) -> int:  # fmt: skip
    """Bisect from good to bad, each step built and booted; FOUND or UNDECIDED. With `test` (an id of the
    run's results), a step is bad only when that test fails; with `same_crash`, only when the bad end's crash
    happens (see crash_verdict)."""
    if good.sha == bad.sha:
        raise Failure(f"bisect: good and bad are the same commit {good.sha12}", BAD_INPUT)
    repo = Repo(settings.cache_dir, good.sha, bad.sha)
    repo.fetch(settings.kernel_url, good, bad)
    if not repo.is_ancestor():
        remove_tree(repo.path)  # bad input leaves nothing behind
        raise Failure(f"bisect: good {good.sha12} is not an ancestor of bad {bad.sha12}", BAD_INPUT)
    record = settings.log_dir / RECORD
    wanted = arguments(settings, good.sha, bad.sha, splat_ignored, on_build_failure, test, same_crash)
    steps = finished_steps(repo, wanted)
    crash = bad_crash(c, settings, bad) if same_crash else ""
    repo.start()
    for step in steps:
        repo.mark(step.sha, step.verdict)
    if steps:
        log.info(f"bisect: resumed from {repo.steps_file}: {len(steps)} step(s) done")
    started = time.monotonic()
    state = repo.state()
    while state.next is not None:
        number = len(steps) + 1
        about = len(steps) + math.ceil(math.log2(state.untested + 1))
        subject, _ = repo.describe(state.next)
        elapsed = time.monotonic() - started
        log.info(f"bisect: step {number} of about {about}: {state.next[:12]} {subject} ({elapsed:.0f} s so far)")
        ran = run_step(c, settings, state.next, settings.run, test)
        said = verdict(ran.status, splat_ignored=splat_ignored, on_build_failure=on_build_failure)
        if crash and ran.status is not None:
            said = crash_verdict(list(ran.crashes), crash)
        build_s, boot_s = round(ran.build_seconds, 1), round(ran.boot_seconds, 1)
        steps.append(Step(state.next, subject, said, ran.status, build_s, boot_s, ran.cache_hit))
        repo.mark(state.next, said)
        write_record(record, repo, wanted, steps, {})
        tested, state = state.next, repo.state()
        if state.next == tested:
            raise Failure(f"bisect: git bisect {said} {tested[:12]} did not take", FAILED)
    return conclude(repo, record, wanted, steps, state, crash)


def conclude(repo: Repo, record: Path, wanted: dict, steps: list[Step], state: State, crash: str = "") -> int:
    """The result printed, written to the record and the job summary: FOUND or UNDECIDED."""
    lines = [table(steps)]
    if crash:
        lines.append(f"bisected crash: {crash}")
    if state.first_bad:
        subject, date = repo.describe(state.first_bad)
        result = {"first_bad": {"sha": state.first_bad, "subject": subject, "author_date": date}}
        lines.append(f"first bad commit: {state.first_bad} {subject} ({date})")
    else:
        described = [(sha, *repo.describe(sha)) for sha in state.candidates]
        result = {"candidates": [{"sha": s, "subject": subj, "author_date": d} for s, subj, d in described]}
        lines.append("not decidable: skipped commits are left; the first bad commit is one of:")
        lines += [f"  {sha} {subj} ({d})" for sha, subj, d in described]
    if crash:
        result["crash"] = crash
    write_record(record, repo, wanted, steps, result)
    text = "\n".join(lines) + "\n"
    log.show_and_summarize(text)
    return FOUND if state.first_bad else UNDECIDED
