"""Resolving `tag` against real git remotes (git daemon over git://, and file://), no mocks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from invoke import Context

from vngtasks import arches, cache, resolve, settings
from vngtasks.errors import Failure

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}


@dataclass(frozen=True)
class Remote:
    """A bare repository with known refs, and the commits they point at."""

    path: Path
    commits: dict[str, str]  # what each name must resolve to
    tag_object: str  # the annotated tag's own object id, which must never be returned


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def free_port() -> int:
    """A port nothing listens on (bound and closed at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Remote:
    base = tmp_path_factory.mktemp("remotes")
    work = base / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    shas = []
    for n in range(4):
        (work / "file").write_text(f"{n}\n")
        git(work, "add", "file")
        git(work, "commit", "-q", "-m", f"commit {n}")
        shas.append(git(work, "rev-parse", "HEAD"))
    git(work, "tag", "-a", "-m", "annotated", "v6.12", shas[0])
    git(work, "tag", "-a", "-m", "tag of a tag", "v6.12-retag", "v6.12")
    git(work, "tag", "light", shas[1])
    git(work, "branch", "feature", shas[2])
    # Traps: refs that merely end in a name must never match it.
    git(work, "tag", "foo/v6.12", shas[3])
    git(work, "branch", "x/v6.12", shas[2])
    git(work, "tag", "foo/deep", shas[1])
    git(work, "branch", "x/deep", shas[2])
    # A tag and a branch of the same name.
    git(work, "tag", "same", shas[1])
    git(work, "branch", "same", shas[3])
    git(base, "clone", "-q", "--bare", str(work), "linux.git")
    return Remote(
        path=base / "linux.git",
        commits={"v6.12": shas[0], "v6.12-retag": shas[0], "light": shas[1], "feature": shas[2], "same": shas[1]},
        tag_object=git(work, "rev-parse", "v6.12"),
    )


@pytest.fixture(scope="session")
def daemon_url(remote: Remote) -> Iterator[str]:
    port = free_port()
    base = remote.path.parent
    daemon = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", f"--base-path={base}", "--export-all", "--listen=127.0.0.1", f"--port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError("git daemon did not start") from None
                time.sleep(0.05)
        yield f"git://127.0.0.1:{port}/linux.git"
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


@pytest.fixture(params=["git", "file"])
def url(request: pytest.FixtureRequest, remote: Remote) -> str:
    if request.param == "git":
        return request.getfixturevalue("daemon_url")
    return remote.path.as_uri()


@pytest.fixture
def closed_url() -> str:
    return f"git://127.0.0.1:{free_port()}/linux.git"


def make_settings(workspace: Path, cache_dir: Path, **flags: str) -> settings.Settings:
    workspace.mkdir(exist_ok=True)
    return settings.effective({}, {"cache_dir": str(cache_dir), **flags}, workspace=workspace)


def attempts(stderr: str) -> int:
    return sum("to reach" in line and "failed" in line for line in stderr.splitlines())


@pytest.mark.parametrize("tag", ["v6.12", "v6.12-retag", "light", "feature"])
def test_ref_resolves_to_its_commit(url: str, remote: Remote, tag: str):
    resolved = resolve.remote(Context(), url, tag)
    assert resolved.sha == remote.commits[tag] and resolved.source == "remote"
    assert resolved.sha != remote.tag_object  # an annotated tag is peeled to its commit
    assert resolved.sha12 == remote.commits[tag][:12]
    kind = "heads" if tag == "feature" else "tags"
    assert resolved.ref == f"refs/{kind}/{tag}"


def test_refs_that_only_end_in_the_name_never_match(url: str, remote: Remote):
    assert resolve.remote(Context(), url, "v6.12").sha == remote.commits["v6.12"]  # not foo/v6.12, x/v6.12
    with pytest.raises(Failure) as raised:
        resolve.remote(Context(), url, "deep")  # only foo/deep and x/deep exist
    assert not isinstance(raised.value, resolve.RemoteFailed)
    assert raised.value.code == resolve.FAILED
    assert str(raised.value).startswith("tag: 'deep'") and url in str(raised.value)


def test_tag_beats_branch_of_the_same_name_and_says_so(url: str, remote: Remote, capsys: pytest.CaptureFixture[str]):
    resolved = resolve.remote(Context(), url, "same")
    assert (resolved.sha, resolved.ref) == (remote.commits["same"], "refs/tags/same")
    assert "both a tag and a branch: using the tag" in capsys.readouterr().err


def test_full_sha_needs_no_network(tmp_path: Path, closed_url: str, remote: Remote):
    sha = remote.commits["feature"].upper()
    s = make_settings(tmp_path / "ws", tmp_path / "cache", tag=sha, kernel_url=closed_url)
    start = time.monotonic()
    resolved = resolve.resolve_kernel(Context(), s)
    assert time.monotonic() - start < 0.5  # a single attempt at the closed port would warn and sleep 1 s
    assert resolved == resolve.Resolved(sha=sha.lower(), ref="", source="sha")


def test_unreachable_remote_is_tried_three_times(closed_url: str, capsys: pytest.CaptureFixture[str]):
    start = time.monotonic()
    with pytest.raises(resolve.RemoteFailed) as raised:
        resolve.remote(Context(), closed_url, "v6.12")
    assert time.monotonic() - start >= 3  # backoff: 1 s, then 2 s
    assert attempts(capsys.readouterr().err) == 3
    assert raised.value.code == resolve.FAILED and "after 3 attempts" in str(raised.value)


def test_unreachable_remote_and_empty_cache_fails(tmp_path: Path, closed_url: str):
    s = make_settings(tmp_path / "ws", tmp_path / "cache", tag="v6.12", kernel_url=closed_url, name="nightly")
    with pytest.raises(resolve.RemoteFailed, match=f"no cached kernel for nightly-{arches.host().name}"):
        resolve.resolve_kernel(Context(), s, retry_delay=0.01)


def test_unreachable_remote_falls_back_to_the_newest_cached_kernel(
    tmp_path: Path, closed_url: str, capsys: pytest.CaptureFixture[str]
):
    s = make_settings(tmp_path / "ws", tmp_path / "cache", tag="v6.12", kernel_url=closed_url, name="nightly")
    store = cache.KernelCache(cache.kernels_root(s))
    arch = arches.host().name
    built = (("a", "nightly", "v2"), ("b", "nightly", "v2"), ("c", "nightly-2", "v2"), ("e", "nightly", "v3"))
    for digit, name, version in built:
        sha = digit * 40
        with store.create(cache.key(name, arch, sha[:12], version), {"name": name, "arch": arch, "sha": sha}):
            pass
    resolved = resolve.resolve_kernel(Context(), s, retry_delay=0.01)
    assert resolved == resolve.Resolved(sha="b" * 40, ref="", source="stale")  # not another name's, nor v3's
    err = capsys.readouterr().err
    assert attempts(err) == 3 and "may be stale" in err
    assert not resolve.sha_file(s.workspace, "nightly").exists()  # a stale answer is not propagated


RUN = {"GITHUB_RUN_ID": "4242", "GITHUB_RUN_ATTEMPT": "1"}  # a job of a workflow run


def test_remote_answer_is_propagated_then_used_without_network(tmp_path: Path, remote: Remote):
    mine = tmp_path / "linux.git"  # a remote of this test's own, made unreachable later
    subprocess.run(["git", "clone", "-q", "--mirror", str(remote.path), str(mine)], check=True)
    url = mine.as_uri()
    s = make_settings(tmp_path / "ws", tmp_path / "cache", tag="light", kernel_url=url, name="nightly")
    assert resolve.resolve_kernel(Context(), s, environ=RUN).source == "remote"
    shared = resolve.sha_file(s.workspace, "nightly")
    record = {"tag": "light", "kernel_url": url, "run_id": "4242", "run_attempt": "1", "sha": remote.commits["light"]}
    assert json.loads(shared.read_text()) == record
    assert [p.name for p in shared.parent.iterdir()] == ["resolved.json"]  # no temp file left behind
    # Another job of the run: the remote is now unreachable, the file answers alone.
    mine.rename(tmp_path / "gone")
    start = time.monotonic()
    resolved = resolve.resolve_kernel(Context(), s, environ=RUN)
    assert time.monotonic() - start < 0.5
    assert resolved == resolve.Resolved(sha=remote.commits["light"], ref="", source="propagated")


@pytest.mark.parametrize(
    ("later_environ", "later_flags"),
    [
        ({"GITHUB_RUN_ID": "4343"}, {}),  # another workflow run
        (RUN, {"kernel_url": "OTHER"}),  # another URL
        ({}, {}),  # outside GitHub Actions, not asked for
    ],
    ids=["another-run", "another-url", "outside-actions"],
)
def test_a_recorded_answer_is_only_for_its_run_and_url(tmp_path: Path, remote: Remote, later_environ, later_flags):
    """A branch must move: a record from another run, for another URL, or on a laptop is not used."""
    url = remote.path.as_uri()
    other = tmp_path / "other.git"
    subprocess.run(["git", "clone", "-q", "--mirror", str(remote.path), str(other)], check=True)
    flags = {"tag": "light", "kernel_url": url, "name": "nightly"}
    resolve.propagate(tmp_path / "ws", "nightly", resolve.Question("light", url, "4242", False), "f" * 40, RUN)
    later = {**flags, **{k: other.as_uri() if v == "OTHER" else v for k, v in later_flags.items()}}
    resolved = resolve.resolve_kernel(
        Context(), make_settings(tmp_path / "ws", tmp_path / "cache", **later), environ=later_environ
    )
    assert (resolved.sha, resolved.source) == (remote.commits["light"], "remote")


def test_outside_actions_reuse_resolved_uses_the_record(tmp_path: Path, remote: Remote):
    url = remote.path.as_uri()
    resolve.propagate(tmp_path / "ws", "nightly", resolve.Question("light", url, "", True), "f" * 40, {})
    s = make_settings(
        tmp_path / "ws", tmp_path / "c", tag="light", kernel_url=url, name="nightly", reuse_resolved="true"
    )
    assert resolve.resolve_kernel(Context(), s, environ={}) == resolve.Resolved("f" * 40, "", "propagated")


def test_bad_propagated_file_is_ignored(tmp_path: Path, url: str, remote: Remote, capsys: pytest.CaptureFixture[str]):
    s = make_settings(tmp_path / "ws", tmp_path / "cache", tag="feature", kernel_url=url)
    resolve.sha_file(s.workspace, s.name).parent.mkdir()
    for bad in ('{"tag": "feature", "sha": "not a sha"}', "not json", '["a list"]'):
        resolve.sha_file(s.workspace, s.name).write_text(bad)
        resolved = resolve.resolve_kernel(Context(), s, environ=RUN)
        assert (resolved.sha, resolved.source) == (remote.commits["feature"], "remote")
        assert "ignoring" in capsys.readouterr().err
        assert json.loads(resolve.sha_file(s.workspace, s.name).read_text())["sha"] == remote.commits["feature"]


def test_propagated_sha_of_another_tag_is_not_used(tmp_path: Path, url: str, remote: Remote):
    first = make_settings(tmp_path / "ws", tmp_path / "cache", tag="light", kernel_url=url)
    resolve.resolve_kernel(Context(), first)
    later = make_settings(tmp_path / "ws", tmp_path / "cache", tag="feature", kernel_url=url)
    resolved = resolve.resolve_kernel(Context(), later)
    assert (resolved.sha, resolved.source) == (remote.commits["feature"], "remote")


def outputs(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_cli_writes_github_outputs(cli, tmp_path: Path, workspace: Path, daemon_url: str, remote: Remote):
    out = tmp_path / "github_output"
    args = ("resolve", "--tag", "v6.12", "--kernel-url", daemon_url, "--cache-dir", str(tmp_path / "c"))
    done = cli(*args, env={"GITHUB_OUTPUT": str(out)})
    assert done.returncode == 0, done.stderr
    sha = remote.commits["v6.12"]
    key = f"vng-kernel-default-{arches.host().name}-{sha[:12]}-v2"
    expected = {"sha12": sha[:12], "sha": sha, "key": key, "remote-failed": "false", "cache-hit": "false"}
    assert outputs(out) == {**expected, "kernel-sha": sha[:12]}
    assert dict(line.split("=", 1) for line in done.stdout.splitlines()) == expected
    assert json.loads(resolve.sha_file(workspace, "default").read_text())["sha"] == sha
    # The kernel gets cached: the next resolve (propagated, no network) reports a hit.
    store = cache.KernelCache(tmp_path / "c" / "kernels")
    with store.create(key, {"name": "default", "arch": arches.host().name, "sha": sha}):
        pass
    again = cli(*args[:3], "--kernel-url", f"git://127.0.0.1:{free_port()}/x", *args[5:])
    assert again.returncode == 0 and "cache-hit=true" in again.stdout.splitlines(), again.stderr


def test_cli_reports_a_stale_kernel_when_the_remote_fails(cli, tmp_path: Path, closed_url: str):
    store = cache.KernelCache(tmp_path / "c" / "kernels")
    arch, sha = arches.host().name, "d" * 40
    key = cache.key("default", arch, sha[:12], "v2")
    with store.create(key, {"name": "default", "arch": arch, "sha": sha}):
        pass
    done = cli("resolve", "--tag", "v6.12", "--kernel-url", closed_url, "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 0, done.stderr
    shown = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert shown == {"sha12": sha[:12], "sha": sha, "key": key, "remote-failed": "true", "cache-hit": "true"}
    assert attempts(done.stderr) == 3


def test_cli_unknown_ref_exits_1(cli, tmp_path: Path, daemon_url: str):
    done = cli("resolve", "--tag", "deep", "--kernel-url", daemon_url, "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 1 and done.stderr.startswith("vngtasks: tag: 'deep' is no tag or branch"), done.stderr


def test_cli_without_tag_is_bad_input(cli, home: Path):
    done = cli("resolve")
    assert done.returncode == 2 and done.stderr.startswith("vngtasks: tag: required"), done.stderr
    assert list(home.iterdir()) == []


def test_a_reader_never_gets_one_tags_sha_for_another(tmp_path: Path):
    """A writer process flips the record between two tags while this one reads it: never a mixed pair."""
    shas = {"v1": "1" * 40, "v2": "2" * 40}
    resolve.propagate(tmp_path, "race", question("v1"), shas["v1"], RUN)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), json.dumps(shas)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
    seen: dict[str, int] = {"v1": 0, "v2": 0}
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for tag, sha in shas.items():
            found = resolve.propagated(tmp_path, "race", question(tag))
            if found is not None:
                assert found.sha == sha, (tag, found.sha)
                seen[tag] += 1
    writer.kill()
    writer.wait()
    assert min(seen.values()) > 10, seen  # both answers were read, many times


def question(tag: str) -> resolve.Question:
    return resolve.Question(tag, "file:///k", RUN["GITHUB_RUN_ID"], False)


WRITER = """
import json, sys
from pathlib import Path
from vngtasks import resolve
shas = json.loads(sys.argv[2])
print("writing", flush=True)
while True:
    for tag, sha in shas.items():
        resolve.propagate(Path(sys.argv[1]), "race", resolve.Question(tag, "file:///k", "4242", False), sha, {})
"""
