"""Test results of real suites on real kernels: kselftests of the tests' v6.12 tree run in a guest of the distro
kernel (`results ktap`), KUnit's suites of the session's tiny kernel (`results kunit`), and the results.xml of
both checked against the JUnit schema of Maven Surefire (the one Jenkins and pytest's own tests use), taken
from pytest's source distribution on PyPI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import junitparser
import pytest
import xmlschema
from linux_remote import LINUX_REMOTE_HOME

from vngtasks import health

pytestmark = pytest.mark.slow

QUIET = ("--verbose", "false", "--accel", "tcg")  # TCG on any machine: breakpoint_test's failures are TCG's
# Fast kselftests (about a minute under TCG on 2 cores) in three collections, so three TAP documents one after
# another; breakpoint_test fails two of its subtests under TCG (icebp, int 3), which KVM passes. Never
# breakpoints:step_after_suspend_test: it suspends the guest, which never wakes.
KSELFTESTS = ("size:get_size", "timers:nanosleep", "timers:mqueue-lat", "breakpoints:breakpoint_test")
TCG_FAILURES = (
    "selftests: breakpoints: breakpoint_test/Test icebp",
    "selftests: breakpoints: breakpoint_test/Test int 3 trap",
)
PYTEST_SDIST = "8.3.3"  # whose testing/example_scripts/junit-10.xsd is the schema


@pytest.fixture(scope="session")
def kselftests(kernel_tree: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The collections of KSELFTESTS built from the v6.12 tree (outside it: O=) against the host's kernel
    headers, and installed with run_kselftest.sh (a few seconds)."""
    repo, _ = kernel_tree
    out = tmp_path_factory.mktemp("kselftest")
    targets = " ".join(sorted({test.split(":")[0] for test in KSELFTESTS}))
    subprocess.run(
        ["make", "-s", "-C", str(repo / "tools/testing/selftests"), f"TARGETS={targets}",
         "KHDR_INCLUDES=-isystem /usr/include", f"O={out / 'build'}", "install", f"INSTALL_PATH={out / 'install'}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return out / "install"


@pytest.fixture(scope="session")
def junit_schema() -> xmlschema.XMLSchema:
    """Surefire's JUnit schema, from pytest's sdist (fetched once per machine)."""
    path = LINUX_REMOTE_HOME / f"junit-10-{PYTEST_SDIST}.xsd"
    if not path.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                 f"pytest=={PYTEST_SDIST}", "-d", tmp],
                check=True, capture_output=True,
            )  # fmt: skip
            with tarfile.open(next(Path(tmp).glob("pytest-*.tar.gz"))) as sdist:
                member = sdist.extractfile(f"pytest-{PYTEST_SDIST}/testing/example_scripts/junit-10.xsd")
                assert member is not None
                path.write_bytes(member.read())
    return xmlschema.XMLSchema(str(path))


def kselftest_counts(stdout: str) -> dict[str, int]:
    """What kselftest itself says it ran, from its raw output: each program's `# Totals:` line, or, for a program
    that prints no TAP of its own, its result line in the runner's document."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    nested: dict[str, int] | None = None
    for line in stdout.splitlines():
        totals = re.match(r"# # Totals: pass:(\d+) fail:(\d+) xfail:(\d+) xpass:(\d+) skip:(\d+) error:(\d+)", line)
        if totals:
            p, f, xf, xp, s, e = map(int, totals.groups())
            nested = {"passed": p + xp, "failed": f + e, "skipped": s + xf}
        result = re.match(r"(not )?ok \d+ selftests: .*?( # SKIP.*)?$", line)
        if result:
            if nested and sum(nested.values()):
                counts = {key: counts[key] + nested[key] for key in counts}
            else:
                counts["skipped" if result[2] else "failed" if result[1] else "passed"] += 1
            nested = None
    return counts


def test_kselftests_in_a_guest_new_failures_fail_known_ones_do_not(
    cli, workspace: Path, kselftests: Path, junit_schema
):
    picks = [arg for test in KSELFTESTS for arg in ("-t", test)]
    done = cli("boot", *QUIET, "--results", "ktap", "--", str(kselftests / "run_kselftest.sh"), *picks, timeout=900)
    assert done.returncode == 1, done.stderr[-3000:]
    record = json.loads((workspace / "results.json").read_text())
    raw = kselftest_counts(done.stdout)
    assert {key: record["totals"][key] for key in raw} == raw and raw["passed"] > 100, (raw, record["totals"])
    failed = [test["id"] for test in record["tests"] if test["status"] == "fail"]
    assert sorted(failed) == sorted(TCG_FAILURES), failed
    for test_id in TCG_FAILURES:
        assert f"vngtasks: results: FAILURE new: {test_id}: failed" in done.stderr
    assert {t["suite"] for t in record["tests"]} >= {"selftests: size: get_size", "selftests: timers: mqueue-lat"}
    xml = junitparser.JUnitXml.fromfile(str(workspace / "results.xml"))
    assert sum(suite.tests for suite in xml) == len(record["tests"])
    junit_schema.validate(str(workspace / "results.xml"))

    # Listed as known (one by its id, one by a glob), they fail no more: breakpoints alone, green.
    (workspace / "known.txt").write_text(f"{TCG_FAILURES[0]}\nselftests: breakpoints: */Test int 3*  # TCG\n")
    done = cli(
        "boot", *QUIET, "--results", "ktap", "--known-failures", "known.txt", "--",
        str(kselftests / "run_kselftest.sh"), "-t", "breakpoints:breakpoint_test", timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        f"FAILURE known (known-failures line 2 (selftests: breakpoints: */Test int 3*)): {TCG_FAILURES[1]}"
        in done.stderr
    )
    assert json.loads((workspace / "results.json").read_text())["totals"]["new"] == 0


def test_kunit_suites_in_the_boot_log_of_a_tiny_kernel(cli, workspace: Path, tiny_build, junit_schema):
    """KUnit's boot-time suites, as the kernel logged them from boot (the guest's dmesg: the console, hvc0, comes up
    mid-boot, after the first suites began when this host is loaded)."""
    done = cli("boot", "--kernel", str(tiny_build.entry), *QUIET, "--results", "kunit", "--", "true")
    assert done.returncode == 0, done.stderr[-3000:]
    kernel, _ = health.kernel_and_program_lines((workspace / "vng-dmesg.log").read_bytes())
    assert kernel[0].startswith("[    0.000000] Linux version"), kernel[:3]
    suites = kunit_suites("\n".join(kernel))
    assert {"list-kunit-test", "bitfields", "string"} <= set(suites), kernel[-50:]
    record = json.loads((workspace / "results.json").read_text())
    said = {key: sum(counts[key] for counts in suites.values()) for key in ("passed", "failed", "skipped")}
    assert {key: record["totals"][key] for key in said} == said
    assert len(record["tests"]) == sum(said.values())
    assert {t["suite"] for t in record["tests"]} == set(suites)
    junit_schema.validate(str(workspace / "results.xml"))


def kunit_suites(console: str) -> dict[str, dict[str, int]]:
    """What KUnit itself says each suite ran: its `# SUITE: pass:…` line counts its test cases, and the
    `# Totals:` line after it every case and parameter (the leaves a report counts). Both are printed when they
    count more than one (the suites here have several), unindented (a parameterised case's are not)."""
    suites: dict[str, dict[str, int]] = {}
    suite = ""
    line = r"(?m)^(?:\[[ \d.]+\] ?)?# (\S+): pass:(\d+) fail:(\d+) skip:(\d+) total:\d+\r?$"
    for found in re.finditer(line, console):
        if found[1] != "Totals":
            suite = found[1]
        if suite:
            suites[suite] = dict(zip(("passed", "failed", "skipped"), map(int, found.groups()[1:]), strict=True))
    return suites
