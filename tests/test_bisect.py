"""invoke bisect: verdicts, git's bisect over a fetched range, skips, the record and resuming.

The unit tests bisect small real git histories with a cheaper step runner (the commit's file says what
its build and boot would give); the verdict mapping and everything else of bisect.py run as they are.
The slow test bisects real tiny kernels built from the tests' v6.12 remote.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import CCACHE_ENV, TINY_TREE, WARN_WORKLOAD
from linux_remote import KCONFIG, MARK, kernel_history

from vngtasks import bisect, errors, log, resolve, settings
from vngtasks.errors import BAD_INPUT, NO_STATUS, Failure

GIT_ID = ["-c", "user.name=t", "-c", "user.email=t@t"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("status", "splat_ignored", "on_build_failure", "expected"),
    [
        (0, False, "skip", "good"),
        (1, False, "skip", "bad"),
        (3, False, "skip", "bad"),
        (errors.SPLAT, False, "skip", "bad"),
        (errors.SPLAT, True, "skip", "good"),
        (errors.TIMEOUT, False, "skip", "bad"),
        (errors.NO_STATUS, False, "skip", "skip"),
        (None, False, "skip", "skip"),
        (None, False, "bad", "bad"),
    ],
)
def test_a_steps_verdict(status, splat_ignored, on_build_failure, expected):
    assert bisect.verdict(status, splat_ignored=splat_ignored, on_build_failure=on_build_failure) == expected


@pytest.mark.unit
def test_the_remotes_text_reaches_the_terminal_printable():
    assert log.printable("fix \x1b]0;owned\x07 it\x9b2J") == "fix ?]0;owned? it?2J"
    assert log.printable("net: fix ß and 漢字") == "net: fix ß and 漢字"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *GIT_ID, *args], capture_output=True, text=True, check=True).stdout


def history(tmp_path: Path, states: list[str]) -> tuple[Path, list[str]]:
    """A repository whose commit i holds `state` = states[i] ("pass", "fail", "broken", "no-status");
    tags `good` (the first) and `bad` (the last). Returns it and the commits, oldest first."""
    repo = tmp_path / "linux"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "master")
    shas = []
    for number, state in enumerate(states):
        (repo / "state").write_text(f"{state} {number}\n")
        git(repo, "add", "state")
        git(repo, "commit", "-q", "-m", f"commit {number}: {state}")
        shas.append(git(repo, "rev-parse", "HEAD").strip())
    git(repo, "tag", "good", shas[0])
    git(repo, "tag", "bad", shas[-1])
    git(repo, "config", "uploadpack.allowFilter", "true")
    return repo, shas


STATUS = {"pass": 0, "fail": 1, "broken": None, "no-status": errors.NO_STATUS, "crash-a": 123, "crash-b": 123}
CRASHES = {"crash-a": ("WARNING in a",), "crash-b": ("BUG: kernel NULL pointer dereference in b",)}


class FakeSteps:
    """The cheaper step runner: what the commit's `state` file says its build and boot give."""

    def __init__(self, repo: Path) -> None:
        self.repo, self.tested = repo, []

    def __call__(self, c, s, sha: str, workload: str, test: str = ""):
        assert s.run == workload == "./check" and test == ""
        self.tested.append(sha)
        state = git(self.repo, "show", f"{sha}:state").split()[0]
        return bisect.Ran(STATUS[state], 2.0, 1.0, False, CRASHES.get(state, ()))


def run(tmp_path: Path, repo: Path, monkeypatch, **options) -> tuple[int, FakeSteps]:
    steps = FakeSteps(repo)
    monkeypatch.setattr(bisect, "run_step", steps)
    flags = {"cache_dir": str(tmp_path / "cache"), "kernel_url": f"file://{repo}", "run": "./check"}
    s = settings.effective({}, flags, workspace=tmp_path)
    good = resolve.Resolved(git(repo, "rev-parse", "good").strip(), "refs/tags/good", "remote")
    bad = resolve.Resolved(git(repo, "rev-parse", "bad").strip(), "refs/tags/bad", "remote")
    return bisect.bisect(None, s, good, bad, **options), steps


def record(tmp_path: Path) -> dict:
    return json.loads((tmp_path / bisect.RECORD).read_text())


@pytest.mark.unit
def test_the_first_bad_commit_is_named_with_a_record_that_replays(tmp_path, monkeypatch, capsys):
    repo, shas = history(tmp_path, ["pass"] * 5 + ["fail"] * 4)
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    status, steps = run(tmp_path, repo, monkeypatch)
    assert status == bisect.FOUND
    assert len(steps.tested) <= 4 and shas[0] not in steps.tested and shas[-1] not in steps.tested
    out = capsys.readouterr().out
    assert f"first bad commit: {shas[5]} commit 5: fail (" in out and "| step | commit |" in out
    kept = record(tmp_path)
    assert kept["result"]["first_bad"]["sha"] == shas[5]
    assert [step["sha"] for step in kept["steps"]] == steps.tested
    assert "git bisect start" in kept["git_bisect_log"] and f"# first bad commit: [{shas[5]}]" in kept["git_bisect_log"]
    assert not (repo / ".git" / "shallow").exists()  # the user's remote is only read
    # git bisect replay of the record's log, in a clone of the remote, ends where the bisect did.
    (tmp_path / "replay.log").write_text(kept["git_bisect_log"])
    subprocess.run(["git", "clone", "-q", str(repo), str(tmp_path / "clone")], check=True)
    git(tmp_path / "clone", "bisect", "replay", str(tmp_path / "replay.log"))
    assert git(tmp_path / "clone", "rev-parse", "refs/bisect/bad").strip() == shas[5]
    assert (tmp_path / "summary.md").read_text().startswith("\n| step | commit |")
    fetched = tmp_path / "cache" / "bisect" / f"{shas[0][:12]}-{shas[-1][:12]}"
    assert git(fetched, "cat-file", "-t", shas[1]).strip() == "commit"  # the range, and no trees (git's report
    # of the first bad commit fetched its and its parent's later): --missing=print never fetches one.
    missing = git(fetched, "rev-list", "--objects", "--missing=print", shas[-1]).split()
    tree = git(repo, "rev-parse", f"{shas[1]}^{{tree}}").strip()
    assert f"?{tree}" in missing


@pytest.mark.unit
def test_a_commit_that_does_not_build_is_skipped_and_its_neighbour_tested(tmp_path, monkeypatch):
    repo, shas = history(tmp_path, ["pass", "pass", "pass", "broken", "pass", "fail", "fail", "fail"])
    status, _ = run(tmp_path, repo, monkeypatch)
    assert status == bisect.FOUND and record(tmp_path)["result"]["first_bad"]["sha"] == shas[5]
    verdicts = {step["sha"]: step["verdict"] for step in record(tmp_path)["steps"]}
    assert verdicts.get(shas[3], "skip") == "skip"


@pytest.mark.unit
def test_skips_that_hide_the_first_bad_commit_leave_the_candidates(tmp_path, monkeypatch, capsys):
    repo, shas = history(tmp_path, ["pass", "pass", "no-status", "broken", "fail", "fail"])
    status, _ = run(tmp_path, repo, monkeypatch)
    assert status == bisect.UNDECIDED
    candidates = {c["sha"] for c in record(tmp_path)["result"]["candidates"]}
    assert candidates == {shas[2], shas[3], shas[4]}
    assert "not decidable" in capsys.readouterr().out


@pytest.mark.unit
def test_on_build_failure_bad_counts_a_broken_commit_as_bad(tmp_path, monkeypatch):
    repo, shas = history(tmp_path, ["pass", "pass", "broken", "fail", "fail"])
    status, _ = run(tmp_path, repo, monkeypatch, on_build_failure="bad")
    assert status == bisect.FOUND and record(tmp_path)["result"]["first_bad"]["sha"] == shas[2]


def kept_steps(tmp_path: Path) -> Path:
    """The steps file a re-run resumes from (beside the range's repository in cache-dir)."""
    (found,) = (tmp_path / "cache" / "bisect").glob("*/steps.json")
    return found


@pytest.mark.unit
def test_a_rerun_resumes_from_the_kept_steps_and_redoes_none(tmp_path, monkeypatch):
    repo, _ = history(tmp_path, ["pass"] * 3 + ["fail"] * 6)
    first, _ = run(tmp_path, repo, monkeypatch)
    done = record(tmp_path)
    second, steps = run(tmp_path, repo, monkeypatch)
    assert first == second == bisect.FOUND and steps.tested == []
    assert record(tmp_path)["steps"] == done["steps"] and record(tmp_path)["result"] == done["result"]
    # Interrupted after one step: the rest is done, the first not again.
    kept = json.loads(kept_steps(tmp_path).read_text())
    kept_steps(tmp_path).write_text(json.dumps({**kept, "steps": kept["steps"][:1]}))
    third, steps = run(tmp_path, repo, monkeypatch)
    assert third == bisect.FOUND and done["steps"][0]["sha"] not in steps.tested
    assert len(steps.tested) == len(done["steps"]) - 1


@pytest.mark.unit
def test_kept_steps_of_other_arguments_or_damaged_are_not_used(tmp_path, monkeypatch):
    repo, shas = history(tmp_path, ["pass"] * 3 + ["fail"] * 3)
    run(tmp_path, repo, monkeypatch)
    done = record(tmp_path)
    _, steps = run(tmp_path, repo, monkeypatch, splat_ignored=True)  # another bisect: starts over
    assert len(steps.tested) == len(done["steps"])
    kept = json.loads(kept_steps(tmp_path).read_text())
    good_one = kept["steps"][0]
    for damaged in ({"verdict": "rm -rf"}, {"sha": shas[0]}, {"sha": "f" * 40}, {"build_seconds": "soon"},
                    {"subject": {"a": "dict"}}, {"status": True}):  # fmt: skip
        kept_steps(tmp_path).write_text(json.dumps({**kept, "steps": [{**good_one, **damaged}]}))
        _, steps = run(tmp_path, repo, monkeypatch, splat_ignored=True)
        assert len(steps.tested) == len(done["steps"]), damaged


@pytest.mark.unit
def test_the_report_in_log_dir_is_never_read_back(tmp_path, monkeypatch, capsys):
    """log-dir is the workspace, which a guest writes: a forged bisect.json (steps out of the range, made-up
    verdicts, wrong types, a subject with escapes) changes nothing; the next run's table is its own."""
    repo, shas = history(tmp_path, ["pass"] * 3 + ["fail"] * 3)
    forged = {"arguments": {}, "result": {}, "steps": [
        {"sha": "f" * 40, "subject": "\x1b[2Jowned\x07", "verdict": "bad", "status": 1, "build_seconds": "soon",
         "boot_seconds": 1.0, "cache_hit": False},
        {"sha": shas[1], "subject": {"a": "dict"}, "verdict": "bad", "status": 1, "build_seconds": 1.0,
         "boot_seconds": 1.0, "cache_hit": False},
    ]}  # fmt: skip
    (tmp_path / bisect.RECORD).write_text(json.dumps(forged))
    status, steps = run(tmp_path, repo, monkeypatch)
    assert status == bisect.FOUND and record(tmp_path)["result"]["first_bad"]["sha"] == shas[3]
    assert steps.tested and "\x1b" not in capsys.readouterr().out


@pytest.mark.unit
def test_the_table_shows_a_remotes_subject_printable() -> None:
    step = bisect.Step("a" * 40, "fix \x1b]0;owned\x07 | it", "bad", 1, 1.0, 2.0, False)
    assert "| fix ?]0;owned? \\| it | bad (1) |" in bisect.table([step])


@pytest.mark.unit
def test_good_that_is_not_an_ancestor_of_bad_is_bad_input(tmp_path, monkeypatch):
    repo, _ = history(tmp_path, ["pass", "pass", "fail"])
    git(repo, "checkout", "-q", "-b", "side", "good")
    (repo / "other").write_text("x\n")
    git(repo, "add", "other")
    git(repo, "commit", "-q", "-m", "side")
    git(repo, "tag", "-f", "good", "HEAD")
    with pytest.raises(Failure, match="is not an ancestor of bad") as refused:
        run(tmp_path, repo, monkeypatch)
    assert refused.value.code == BAD_INPUT
    assert not list((tmp_path / "cache" / "bisect").iterdir())  # nothing left behind


@pytest.mark.unit
def test_commits_named_by_sha_fetch_the_history_and_bisect_it(tmp_path, monkeypatch):
    repo, shas = history(tmp_path, ["pass"] * 4 + ["fail"] * 2)
    steps = FakeSteps(repo)
    monkeypatch.setattr(bisect, "run_step", steps)
    s = settings.effective({}, {"cache_dir": str(tmp_path / "c"), "kernel_url": str(repo), "run": "./check"},
                           workspace=tmp_path)  # fmt: skip
    good, bad = resolve.Resolved(shas[1], "", "sha"), resolve.Resolved(shas[-1], "", "sha")
    assert bisect.bisect(None, s, good, bad) == bisect.FOUND
    assert record(tmp_path)["result"]["first_bad"]["sha"] == shas[4] and shas[0] not in steps.tested


CHECK = f"if grep -q {MARK} /proc/version; then echo SAW-MARK; exit 1; fi; echo NO-MARK"


@pytest.mark.slow
@TINY_TREE
def test_bisect_names_the_commit_that_changed_what_the_guest_sees_then_resumes(
    cli, tmp_path, workspace, remote, tiny_build
):
    """Its steps build in the session's tiny tree (its cache-dir and name): each commit differs from v6.12 by a few
    files, so make compiles those only (in a tree of its own, the first step compiled every object again)."""
    url, sha = remote
    cache_dir = Path(tiny_build.args[tiny_build.args.index("--cache-dir") + 1])
    shas = kernel_history(Path(url.removeprefix("file://")), sha, tmp_path / "linux", changes_at=2, count=4)
    (workspace / "ci").mkdir()
    (workspace / "ci" / "kernel.config").write_text(KCONFIG.read_text())
    args = ["bisect", "--good", "bisect-good", "--bad", "bisect-bad", "--kernel-url", str(tmp_path / "linux"),
            "--name", "ci", "--kconfig-base", "tiny", "--kconfig", "ci/kernel.config",
            "--cache-dir", str(cache_dir), "--verbose", "false", "--", CHECK]  # fmt: skip
    done = cli(*args, env=CCACHE_ENV, timeout=3600)
    assert done.returncode == bisect.FOUND, done.stderr[-4000:]
    assert f"first bad commit: {shas[2]} bisect test 2: mark (" in done.stdout, done.stdout
    kept = json.loads((workspace / bisect.RECORD).read_text())
    steps = kept["steps"]
    assert len(steps) == 2 and {step["verdict"] for step in steps} == {"good", "bad"}
    assert all(step["status"] in (0, 1) and not step["cache_hit"] for step in steps)
    assert "bisect: step 1 of about 2:" in done.stderr
    # Run again with the same arguments: resumed from the record, nothing built or booted.
    again = cli(*args, env=CCACHE_ENV, timeout=600)
    assert again.returncode == bisect.FOUND, again.stderr[-4000:]
    assert "step(s) done" in again.stderr and f"resumed from {cache_dir / 'bisect'}/" in again.stderr
    assert "cache: " not in again.stderr and "booted in" not in again.stderr
    assert f"first bad commit: {shas[2]}" in again.stdout
    assert json.loads((workspace / bisect.RECORD).read_text())["steps"] == steps

    # --same-crash up to the first bad commit (named by SHA), whose kernel and commit 1's the steps above built: the
    # MARK commits provoke LKDTM's WARNING, commit 1's workload fails without a crash (good: only the crash counts).
    # The bad end is run first for its crash's title.
    crash = f"if grep -q {MARK} /proc/version; then {WARN_WORKLOAD}; fi; grep -qv {shas[1][:12]} /proc/version"
    same_args = [shas[2] if arg == "bisect-bad" else arg for arg in args[:-2]]
    same = cli(*same_args, "--same-crash", "--", crash, env=CCACHE_ENV, timeout=3600)
    assert same.returncode == bisect.FOUND, same.stderr[-4000:]
    assert f"first bad commit: {shas[2]} bisect test 2: mark (" in same.stdout, same.stdout
    kept = json.loads((workspace / bisect.RECORD).read_text())
    assert kept["result"]["crash"] == "WARNING in lkdtm_WARNING"
    assert [(step["sha"], step["verdict"], step["cache_hit"]) for step in kept["steps"]] == [(shas[1], "good", True)]
    assert "cache: miss" not in same.stderr, same.stderr[-4000:]  # nothing built


@pytest.mark.parametrize(
    "text, result, expected",
    [
        ("ok 1 t", "workload", 0),
        ("not ok 1 t", "workload", 1),
        ("ok 1 t # SKIP no device", "workload", NO_STATUS),  # the test did not run: this step says nothing
        ("ok 1 other", "workload", NO_STATUS),
        ("not ok 1 t", "panic", NO_STATUS),  # the VM never reported: its status, as without --test
    ],
)
def test_with_test_a_step_is_that_tests_result(text: str, result: str, expected: int) -> None:
    """`--test`: only that test counts; its neighbours failing, the workload's status and splats do not."""
    from vngtasks import runrecord, supervise
    from vngtasks.report import known, results

    tests = results.judge(f"TAP version 13\n1..2\n{text}\nnot ok 2 neighbour\n", "ktap", "6.12", known.Known())
    outcome = supervise.Outcome("tcg", 1 if result == "workload" else NO_STATUS, result, 1.0, 1.0)
    record = runrecord.Record(Path("/k"), "6.12", "x86_64", outcome, outcome.status, ("WARNING: x",), tests)
    assert bisect.tested(record, "t") == expected


@pytest.mark.unit
def test_same_crash_bisects_the_bad_ends_crash_skipping_others_and_passing_failures(tmp_path, monkeypatch, capsys):
    """syzbot's rule: the bad end runs first for its crash's title; a step is bad only when that crash happens,
    skipped when another does (commit 3, git's first pick), good when none does (commit 4's workload fails,
    without a crash)."""
    states = ["pass", "pass", "pass", "crash-b", "fail", "crash-a", "crash-a", "crash-a"]
    repo, shas = history(tmp_path, states)
    status, steps = run(tmp_path, repo, monkeypatch, same_crash=True)
    assert status == bisect.FOUND and steps.tested[0] == shas[-1]
    assert f"first bad commit: {shas[5]} commit 5: crash-a (" in capsys.readouterr().out
    kept = record(tmp_path)
    assert kept["result"]["crash"] == "WARNING in a" and kept["arguments"]["same_crash"] is True
    verdicts = {step["sha"]: step["verdict"] for step in kept["steps"]}
    expected = {shas[1]: "good", shas[2]: "good", shas[3]: "skip", shas[4]: "good", shas[5]: "bad", shas[6]: "bad"}
    assert verdicts == {sha: expected[sha] for sha in verdicts} and "skip" in verdicts.values(), verdicts


@pytest.mark.unit
def test_same_crash_without_a_crash_at_the_bad_end_is_refused(tmp_path, monkeypatch):
    repo, _ = history(tmp_path, ["pass", "pass", "fail"])
    with pytest.raises(Failure, match="did not crash: no crash to bisect"):
        run(tmp_path, repo, monkeypatch, same_crash=True)
