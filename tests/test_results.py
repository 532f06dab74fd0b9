"""Test results judged and told: known failures and baselines, the run's status, results.json and results.xml
(read back by junitparser), the step summary, annotations and terminal lines, the boot step's outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import junitparser
import pytest

from vngtasks import arches, runrecord, supervise, vm
from vngtasks.errors import FAILED, SPLAT
from vngtasks.report import junit, known, results
from vngtasks.settings import DEFAULTS, effective
from vngtasks.validate import InputError

KSELFTEST = """\
TAP version 13
1..3
# selftests: timers: nsleep-lat
# TAP version 13
# 1..2
# ok 1 CLOCK_REALTIME
# # CLOCK_MONOTONIC: latency 6000000 ns over the limit
# not ok 2 CLOCK_MONOTONIC
not ok 1 selftests: timers: nsleep-lat # exit=1
# selftests: size: get_size
ok 2 selftests: size: get_size
ok 3 selftests: breakpoints: step_after_suspend_test # SKIP no suspend
"""
NSLEEP = "selftests: timers: nsleep-lat/CLOCK_MONOTONIC"


def make(tmp_path: Path, **flags: str):
    return effective(DEFAULTS, {"extra_rwdirs": "", "cache_dir": str(tmp_path / "cache"), **flags}, workspace=tmp_path)


def outcome(status: int = 0, result: str = "workload") -> supervise.Outcome:
    return supervise.Outcome(accel="tcg", status=status, result=result, boot_seconds=4.0, workload_seconds=2.0)


def attempt(status: int = 0, stdout: str = KSELFTEST, console: str = "", result: str = "workload"):
    return runrecord.Attempt(outcome(status, result), console.encode(), b"", stdout.encode())


def judged(text: str = KSELFTEST, rules: str = "", baseline: frozenset[str] = frozenset(), release: str = "6.12.0"):
    return results.judge(text, "ktap", release, known.Known(known.parse_rules(rules), baseline))


def test_known_failure_lines_globs_comments_and_kernel_scopes() -> None:
    rules = known.parse_rules(
        "# TCG is slow\n\nselftests: timers: */CLOCK_* [^6\\.12\\.]  # nsleep\nlist/exact\n  # indented comment\n"
    )
    assert [(rule.line, rule.ids) for rule in rules] == [(3, "selftests: timers: */CLOCK_*"), (4, "list/exact")]
    listed = known.Known(rules)
    assert listed.listing(NSLEEP, "6.12.0-tiny") == "known-failures line 3 (selftests: timers: */CLOCK_*)"
    assert listed.listing(NSLEEP, "6.1.0-57-amd64") == ""  # not on this kernel
    assert listed.listing("list/exact", "any") == "known-failures line 4 (list/exact)"
    assert known.Known(baseline=frozenset({"a/b"})).listing("a/b", "x") == "results-baseline"


@pytest.mark.parametrize(
    "text, said",
    [("a [(]\n", "line 1: '(' is not a valid regex"), ("ok\nb\x1bc\n", "line 2: holds a control character")],
)
def test_a_bad_known_failures_line_is_named(text: str, said: str) -> None:
    with pytest.raises(ValueError, match=said.replace("(", r"\(").replace("[", r"\[")):
        known.parse_rules(text)


def test_bad_files_are_bad_input_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "known").write_text("x [(]\n")
    with pytest.raises(InputError, match=r"^known-failures: line 1"):
        make(tmp_path, results="ktap", known_failures="known")
    (tmp_path / "base.json").write_text('{"format": "something else", "tests": []}')
    with pytest.raises(InputError, match=r"results-baseline: .* is not a results\.json of vngtasks"):
        make(tmp_path, results="ktap", results_baseline="base.json")
    (tmp_path / "base.json").write_text('{"format": "vngtasks-results 1", "tests": [{"id": 1, "status": "fail"}]}')
    with pytest.raises(InputError, match="a test without a string id and status"):
        make(tmp_path, results="ktap", results_baseline="base.json")
    (tmp_path / "base.json").write_text("[" * 100_000)
    with pytest.raises(InputError, match="is not JSON"):
        make(tmp_path, results="ktap", results_baseline="base.json")
    (tmp_path / "fine").write_text("a\n")
    with pytest.raises(InputError, match="known-failures: needs `results`"):
        make(tmp_path, known_failures="fine")


@pytest.mark.parametrize("value", ["/abs/file", "../up", "a/../b", "a b", "a\nb", "a//b"])
def test_a_results_file_is_plain_and_inside_the_workspace(tmp_path: Path, value: str) -> None:
    with pytest.raises(InputError, match=r"^results: expected ktap, kunit or a path relative to the workspace"):
        make(tmp_path, results=value)
    assert make(tmp_path, results="./out/results.tap").results == "out/results.tap"


def test_a_new_failure_fails_a_passing_workload_and_known_ones_turn_it_green() -> None:
    new = judged()
    assert new.totals == {"passed": 2, "failed": 1, "skipped": 1, "errors": 0, "known": 0, "new": 1}
    assert results.status_with(new, 0, reported=True) == FAILED
    assert results.status_with(new, 3, reported=True) == 3  # the workload's own failure is kept
    listed = judged(rules=f"{NSLEEP}\n")
    assert results.status_with(listed, 1, reported=True) == 0  # the runner's exit 1 was for the known failure
    assert results.status_with(judged("TAP version 13\n1..1\nok 1 a\n"), 2, reported=True) == 2  # not the tests'
    assert results.status_with(judged(""), 0, reported=True) == FAILED  # no test at all
    assert results.status_with(new, 125, reported=False) == 125  # the VM never reported: its status stays


def test_a_known_failure_that_passed_is_reported_as_fixed() -> None:
    passing = KSELFTEST.replace("# not ok 2 CLOCK_MONOTONIC", "# ok 2 CLOCK_MONOTONIC")
    found = judged(passing, rules=f"{NSLEEP}\nnever/ran/*\n", baseline=frozenset({"selftests: size: get_size"}))
    assert found.fixed == (f"known-failures line 1 ({NSLEEP})", "selftests: size: get_size (results-baseline)")


def test_tests_that_never_got_a_result_say_how_the_run_ended(tmp_path: Path) -> None:
    cut = "KTAP version 1\n1..2\nok 1 a\n"
    s = make(tmp_path, results="ktap")
    runrecord.conclude(s, Path("/k"), attempt(0, cut, "[ 3.0] BUG: kernel NULL pointer\n", "panic"), {})
    (test,) = [t for t in json.loads((tmp_path / "results.json").read_text())["tests"] if t["status"] == "error"]
    assert test["reason"] == "no result: the kernel panicked: BUG: kernel NULL pointer"


def test_conclude_writes_results_and_tells_them(tmp_path: Path, capsys) -> None:
    s = make(tmp_path, results="ktap")
    out = tmp_path / "github-output"
    summary = tmp_path / "summary"
    status = runrecord.conclude(
        s, Path("/k"), attempt(1), {"GITHUB_OUTPUT": str(out), "GITHUB_STEP_SUMMARY": str(summary)}
    )
    assert status == 1
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["totals"]["failed"] == 1 and record["tests"][1]["id"] == NSLEEP
    assert record["tests"][1]["diagnostics"] == ["CLOCK_MONOTONIC: latency 6000000 ns over the limit"]
    assert json.loads((tmp_path / runrecord.RUN_JSON).read_text())["tests"]["failed"] == 1
    assert out.read_text() == "tests-passed=2\ntests-failed=1\ntests-skipped=1\n"
    text = summary.read_text()
    assert "| selftests: timers: nsleep-lat | 1 | 1 | 0 |" in text and f"**New failures:** `{NSLEEP}`" in text
    err = capsys.readouterr().err
    assert f"vngtasks: results: FAILURE new: {NSLEEP}: CLOCK_MONOTONIC: latency 6000000 ns over the limit" in err
    assert "vngtasks: results: 2 passed, 1 failed, 1 skipped" in err
    # A second run in the same summary starts its row's table again, below the first run's test results.
    second = attempt(0, "TAP version 13\n1..1\nok 1 x\n")
    runrecord.conclude(s, Path("/k"), second, {"GITHUB_STEP_SUMMARY": str(summary)})
    assert summary.read_text().count(runrecord.SUMMARY_HEADER) == 2


def test_known_failures_in_actions_are_notices_and_new_ones_errors(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    text = KSELFTEST + "TAP version 13\n1..1\nnot ok 1 a,b: c%d\r\n"
    (tmp_path / "known").write_text(f"{NSLEEP}\n")
    s = make(tmp_path, results="ktap", known_failures="known")
    assert runrecord.conclude(s, Path("/k"), attempt(0, text), {}, results.expected(s)) == FAILED
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "::error title=new test failure::a,b: c_d: failed",
        f"::notice title=known test failure::{NSLEEP}: CLOCK_MONOTONIC: latency 6000000 ns over the limit "
        f"(known-failures line 1 ({NSLEEP}))",
    ]


@pytest.mark.parametrize(("given", "enabled"), [("kunit", True), ("ktap", False), ("", False)])
def test_kunit_results_run_kunits_suites_at_boot_in_a_kernel_whose_kunit_is_off_by_default(given, enabled) -> None:
    """The tests' kernels are built so (tests/data/ci-kernel.config): KUnit's suites run only when asked."""
    s = effective(DEFAULTS, {"results": given, "append": "kunit.enable=0"}, workspace=Path("/work/project"))
    boot = vm.Boot(s, Path("/boot/vmlinuz-6.12.0"), "tcg", Path("/cache/runs/1"), False, True, None)
    argv = vm.vng_argv(boot, vm.Host(arch=arches.host(), memory_mib=4096, vng="vng", environ={}))
    appended = [arg for arg in argv if arg.startswith("--append=kunit.enable=")]
    assert appended == ["--append=kunit.enable=0", "--append=kunit.enable=1"][: 2 if enabled else 1]  # ours last: wins


def test_a_splat_still_fails_runs_whose_tests_passed(tmp_path: Path) -> None:
    s = make(tmp_path, results="kunit")
    console = "[ 1.0] KTAP version 1\n[ 1.0] 1..1\n[ 1.1] ok 1 list\n[ 2.0] WARNING: CPU: 0 PID: 1 at a.c:1 f\n"
    assert runrecord.conclude(s, Path("/k"), attempt(0, "", console), {}) == SPLAT


def test_results_of_a_file_are_read_without_following_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "r.tap").write_text("TAP version 13\n1..1\nnot ok 1 planted\n")
    (tmp_path / "out").symlink_to(outside)
    s = make(tmp_path, results="out/r.tap")
    assert runrecord.conclude(s, Path("/k"), attempt(0, ""), {}) == FAILED  # nothing read: no tests
    assert json.loads((tmp_path / "results.json").read_text())["problem"].startswith("out/r.tap was not written")
    (tmp_path / "out").unlink()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "r.tap").write_text("TAP version 13\n1..1\nok 1 real\n")
    assert runrecord.conclude(s, Path("/k"), attempt(0, ""), {}) == 0


def test_a_run_without_results_leaves_no_stale_results(tmp_path: Path) -> None:
    runrecord.conclude(make(tmp_path, results="ktap"), Path("/k"), attempt(0), {})
    assert (tmp_path / "results.xml").exists()
    runrecord.conclude(make(tmp_path), Path("/k"), attempt(0), {})
    assert not (tmp_path / "results.xml").exists() and not (tmp_path / "results.json").exists()


def test_results_xml_is_read_back_by_junitparser(tmp_path: Path) -> None:
    text = KSELFTEST + (
        "KTAP version 1\n1..1\n    # Subtest: k\n    1..2\n    not ok 1 t # TODO why\n"
        "    # a guest's \u0000 and \ufffe\n    not ok 2 u\nnot ok 1 k\n"
    )
    path = tmp_path / "results.xml"
    path.write_bytes(junit.render(judged(text, rules="selftests: timers: */*\n")))
    xml = junitparser.JUnitXml.fromfile(str(path))
    suites = {suite.name: suite for suite in xml}
    assert set(suites) == {"selftests: timers: nsleep-lat", "selftests: size: get_size",
                           "selftests: breakpoints: step_after_suspend_test", "k"}  # fmt: skip
    cases = {case.name: case for suite in xml for case in suite}
    (failure,) = cases["CLOCK_MONOTONIC"].result
    assert isinstance(failure, junitparser.Failure)
    assert failure.message == "CLOCK_MONOTONIC: latency 6000000 ns over the limit"
    assert failure.type == "known: known-failures line 1 (selftests: timers: */*)"
    (skipped,) = cases["selftests: breakpoints: step_after_suspend_test"].result
    assert isinstance(skipped, junitparser.Skipped) and skipped.message == "no suspend"
    assert cases["t"].result[0].message == "expected failure: why"
    assert cases["CLOCK_REALTIME"].is_passed and cases["CLOCK_REALTIME"].classname == "selftests: timers: nsleep-lat"
    assert cases["u"].result[0].message == "a guest's ? and ?" and cases["u"].result[0].type == "new"
    assert sum(suite.tests for suite in xml) == 6


def test_the_stdout_copy_keeps_the_start_and_relays_everything(tmp_path: Path) -> None:
    read, write = os.pipe()
    target = os.open(tmp_path / "relayed", os.O_WRONLY | os.O_CREAT)
    data = b"x" * (supervise.STDOUT_COPY_BYTES + 70000)
    head = bytearray()
    with os.fdopen(read, "rb") as source:
        import threading

        thread = threading.Thread(target=supervise._copy, args=(source, target, None, head))
        thread.start()
        with os.fdopen(write, "wb") as sink:
            sink.write(data)
        thread.join()
    os.close(target)
    assert len(head) == supervise.STDOUT_COPY_BYTES and (tmp_path / "relayed").stat().st_size == len(data)


KUNIT_BOOT = [
    "[    0.000000] Linux version 6.12.0",
    "[    1.509399] KTAP version 1",
    "[    1.509400] 1..1",
    "[    1.510255]     KTAP version 1",
    "[    1.510338]     # Subtest: string",
    "[    1.510340]     1..2",
    "[    1.858936]     ok 1 string_test_memset16",
    "[    2.568518]     ok 2 string_test_memset32",
    "[    2.568600] ok 1 string",
]


def test_kunit_results_come_from_the_kernels_log_from_boot_when_the_guest_wrote_its_dmesg() -> None:
    """The console (hvc0) comes up mid-boot, after KUnit began when the host is loaded: its log starts at a test
    line. The guest's dmesg holds the kernel's log from boot (a program's line in it is not the kernel's); with
    none (the guest never reported), the console."""
    s = effective(DEFAULTS, {"results": "kunit"}, workspace=Path("/nonexistent"))
    console = "\n".join(KUNIT_BOOT[6:]).encode()
    dmesg = "\n".join([f"kern  :info  : {line}" for line in KUNIT_BOOT] + ["user  :warn  : [ 3.0] not ok 9 x"])
    text, problem = results.stream(s, None, console, dmesg.encode())
    judged = results.judge(text, "kunit", "6.12.0", known.Known())
    assert problem == "" and [(t.id, t.suite) for t in judged.verdicts] == [
        ("string/string_test_memset16", "string"),
        ("string/string_test_memset32", "string"),
    ]
    text, _ = results.stream(s, None, console, None)  # the console alone: the header lost, tests taken for suites
    assert "string_test_memset16" in [t.suite for t in results.judge(text, "kunit", "6.12.0", known.Known()).verdicts]
