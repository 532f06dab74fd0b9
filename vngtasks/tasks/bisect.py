"""`invoke bisect`: the first commit from --good to --bad where the workload fails, each step built and booted."""

from __future__ import annotations

import dataclasses

from invoke import Context
from invoke.exceptions import Exit

from ..errors import BAD_INPUT
from . import _common

OPTIONS = {
    "good": "a tag, branch or 40-hex commit where the workload passes",
    "bad": "a later one, descended from --good, where it fails",
    "on_build_failure": "the verdict on a commit that does not build: skip (default) or bad",
    "test": "bisect one test: a step is bad only when this id of the run's results fails (needs results)",
}
SWITCHES = {
    "splat_ignored": "a splat (exit 123) of a passing workload is good, not bad",
    "same_crash": "a step is bad only when the bad end's crash (its title) happens; another crash skips it",
}


@_common.settings_task("bisect", switches=SWITCHES, options=OPTIONS)
def bisect(c: Context, splat_ignored: bool = False, same_crash: bool = False, **flags: str | None):
    """Bisect --good..--bad: build and boot each step, run the command after `--`, name the first bad commit."""
    given = {name: flags.pop(name) for name in OPTIONS}
    s = _common.settings(c, **flags, run=_common.remainder() or None)
    if not s.run:
        raise Exit("vngtasks: run: nothing to run: put the command after `--`", code=BAD_INPUT)
    for name in ("good", "bad"):
        if not given[name]:
            raise Exit(f"vngtasks: {name}: required: a tag, branch or 40-hex commit", code=BAD_INPUT)
    on_build_failure = given["on_build_failure"] or "skip"
    from .. import bisect as bisecting  # here: other tasks start without it
    from ..resolve import resolve_kernel
    from ..validate import git_ref, make_directory

    if on_build_failure not in bisecting.BUILD_FAILURE_VERDICTS:
        raise Exit(f"vngtasks: on-build-failure: {on_build_failure!r} is not skip or bad", code=BAD_INPUT)
    test = given["test"] or ""
    if test and not s.results:
        raise Exit("vngtasks: test: needs `results`: a test is an id of the run's test results", code=BAD_INPUT)
    if not test.isprintable():
        raise Exit("vngtasks: test: holds a control character", code=BAD_INPUT)
    if test and same_crash:
        raise Exit("vngtasks: same-crash: bisects a crash, --test a test: choose one", code=BAD_INPUT)
    with _common.stopped_by_signals(), _common.exit_statuses():
        ends = {name: git_ref(name, given[name], None) for name in ("good", "bad")}  # type: ignore[arg-type]
        make_directory("log_dir", s.log_dir)
        good, bad = (resolve_kernel(c, dataclasses.replace(s, tag=ends[n]), record=False) for n in ("good", "bad"))
        status = bisecting.bisect(
            c, s, good, bad, splat_ignored=splat_ignored, on_build_failure=on_build_failure, test=test,
            same_crash=same_crash,
        )  # fmt: skip
    if status:
        raise Exit(code=status)
