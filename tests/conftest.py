"""Shared fixtures: the real `invoke` CLI against this checkout, in a clean home."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from linux_remote import (
    CCACHE_DIR,
    DEBUG,
    DEBUG_KCONFIG,
    FOREIGN_CACHE,
    KCONFIG,
    MOUNT_DEBUGFS,
    PROVOKE,
    TAG,
    tagged_commit,
    without_rustup,
)

from vngtasks.guestroot import ROOTS

ROOT = Path(__file__).resolve().parent.parent
# Every kernel-building test builds through the one ccache the tests keep on this machine.
CCACHE_ENV = {"CCACHE_DIR": str(CCACHE_DIR)}
# A kernel warning's first line as a program writes it to /dev/kmsg: not the kernel's, so never a splat.
FAKE_WARNING = "WARNING: CPU: 0 PID: 1 at fake.c:1 test+0x0/0x10"
# Tests that must not run beside each other when pytest runs several workers (nox runs two, `--dist loadgroup`):
# whatever installs or checks host packages (apt's and dpkg's locks; a foreign arch's packages), and act's jobs,
# some of which install a foreign arch's packages too.
HOST_PACKAGES = pytest.mark.xdist_group("host-packages")
# The session's tiny kernel's work tree, which tests read, configure and build in (bisect, distcc, debug options).
TINY_TREE = pytest.mark.xdist_group("tiny-tree")
# A real kernel warning: LKDTM is built into the kernels the tests build (tests/data/ci-kernel.config).
WARN_WORKLOAD = f"{MOUNT_DEBUGFS}; echo WARNING > {PROVOKE}"


def copy_checkout(dest: Path) -> None:
    """This checkout's own files as they are now (git's: tracked, and new ones it does not ignore) into `dest`:
    never what runs leave in it (.nox's venvs, .ci's results, a developer's build trees)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def assert_at_its_line_of_lkdtm(crash: dict, kernel_tree: tuple[Path, str], file: str = "bugs.c") -> None:
    """A crash of crashes.json provoked through LKDTM: its top frame symbolized to a line of its lkdtm function's
    body in drivers/misc/lkdtm/FILE, as the tests' v6.12 has it."""
    function = crash["frames"][0]["function"]
    assert_in_its_function(crash, kernel_tree, f"drivers/misc/lkdtm/{file}", f"static void {function}(void)")


def assert_in_its_function(crash: dict, kernel_tree: tuple[Path, str], path: str, signature: str) -> None:
    """The crash's top frame symbolized to a line of the body of the function `signature` (its line, as the tests'
    v6.12 has it) in `path`."""
    repo, sha = kernel_tree
    source = subprocess.run(["git", "-C", repo, "show", f"{sha}:{path}"], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    top = crash["frames"][0]
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines, 1) if line == signature)
    end = next(i for i, line in enumerate(lines[start:], start + 1) if line == "}")
    assert (top["file"], top["line"] in range(start + 1, end)) == (path, True), (crash, start)


def path_for_tests(path: str) -> str:
    """PATH for a run under test: this venv first, and no rustup toolchain (see without_rustup)."""
    return os.pathsep.join([str(Path(sys.executable).parent), without_rustup(path)])


@pytest.fixture(scope="session")
def kernel_tree() -> tuple[Path, str]:
    """The real kernel remote made from linux-source-6.12 (a local repository), and the SHA of v6.12."""
    return tagged_commit()


@pytest.fixture(scope="session")
def remote(kernel_tree: tuple[Path, str]) -> tuple[str, str]:
    """The same remote as a file:// URL, and the SHA of v6.12."""
    repo, sha = kernel_tree
    return f"file://{repo}", sha


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A HOME of the test's own: no ~/.invoke.yaml or caches of the user leak in."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


def user_environment(home: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """A user's environment for a run under test: a HOME of its own, and none of this shell's
    INVOKE_/GITHUB_/XDG_ settings."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("INVOKE_", "GITHUB_", "XDG_")) and key != "HOME"
    }
    return {**environ, "HOME": str(home), "PATH": path_for_tests(environ["PATH"]), **(env or {})}


def run_invoke(
    args: tuple[str, ...],
    *,
    home: Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    output=None,
) -> subprocess.CompletedProcess:
    """`invoke -r <checkout> ARGS...` as a user would run it in `cwd` (see user_environment). `output`: an
    open file that takes stdout and stderr (`> file 2>&1`) instead of capturing them."""
    return run_group(
        [sys.executable, "-m", "invoke", "-r", str(ROOT), *args],
        cwd=cwd,
        env=user_environment(home, env),
        stdout=output or subprocess.PIPE,
        stderr=subprocess.STDOUT if output else subprocess.PIPE,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def run_group(argv: list[str], *, timeout: float, **popen) -> subprocess.CompletedProcess:
    """subprocess.run in a process group of its own, the whole group killed on timeout (run kills only the
    child: a QEMU it started would go on)."""
    with subprocess.Popen(argv, start_new_session=True, **popen) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


@pytest.fixture
def cli(home: Path, workspace: Path):
    """Run `invoke -r <checkout> ARGS...` as a user would, in `workspace`."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None, output=None):
        return run_invoke(args, home=home, cwd=cwd or workspace, env=env, timeout=timeout, output=output)

    return run


@dataclass(frozen=True)
class TinyBuild:
    """The session's one tiny kernel, and how `invoke build` made it."""

    done: subprocess.CompletedProcess
    entry: Path  # the cache entry
    args: tuple[str, ...]  # the flags that name it (tag, url, name, kconfig, cache-dir)
    workspace: Path  # holds ci/kernel.config


def tiny_flags(url: str, kconfig: str = "ci/kernel.config") -> tuple[str, ...]:
    """What names the tests' tiny kernel: v6.12 of `url`, kconfig-base tiny, the fragment at ci/kernel.config."""
    base = ("--kconfig-base", "tiny", "--kconfig", kconfig)
    return ("--tag", TAG, "--kernel-url", url, "--name", "ci", *base)


# The tests' shared ccache remote (ccache-remote): an nginx on loopback, for the second machine of
# tests/test_nonroot.py. Started by the first pytest process before any worker (workers inherit its URL in this
# variable), stopped when that process ends; not where nginx is missing (the unit tier's machines), where that test
# fails by name. Its store is kept between runs beside the tests' ccache, as that ccache is: the session's tiny build
# writes its misses there. Until a tiny build has filled the store (a new machine, a run stopped before, or emptied
# when it outgrew REMOTE_STORE_LIMIT), that build also reshares: its local hits fill the store, with no cold compile.
CCACHE_REMOTE_VARIABLE = "VNGTASKS_TEST_CCACHE_REMOTE"
CCACHE_RESHARE_VARIABLE = "VNGTASKS_TEST_CCACHE_RESHARE"
CCACHE_REMOTE_STORE = CCACHE_DIR.parent / "ccache-remote"
CCACHE_REMOTE_FILLED = CCACHE_DIR.parent / "ccache-remote.filled"  # written after a tiny build filled the store
REMOTE_STORE_LIMIT = 2 * 2**30
_NGINX: list = []


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or CCACHE_REMOTE_VARIABLE in os.environ or not shutil.which("nginx"):
        return
    if config.getoption("markexpr", "") == "unit":
        return
    from servers import start_nginx

    if sum(path.stat().st_size for path in CCACHE_REMOTE_STORE.rglob("*") if path.is_file()) > REMOTE_STORE_LIMIT:
        CCACHE_REMOTE_FILLED.unlink(missing_ok=True)
        shutil.rmtree(CCACHE_REMOTE_STORE)
    server = start_nginx(Path(tempfile.mkdtemp(prefix="vngtasks-ccache-remote-", dir="/var/tmp")), CCACHE_REMOTE_STORE)
    _NGINX.append(server)
    os.environ[CCACHE_REMOTE_VARIABLE] = server.url
    os.environ[CCACHE_RESHARE_VARIABLE] = "false" if CCACHE_REMOTE_FILLED.exists() else "true"


def pytest_unconfigure(config: pytest.Config) -> None:
    for server in _NGINX:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


def session_remote_flags() -> tuple[str, ...]:
    """The tiny build's flags that fill the tests' ccache remote, when there is one (see CCACHE_REMOTE_STORE)."""
    url = os.environ.get(CCACHE_REMOTE_VARIABLE)
    return ("--ccache-remote", url, "--ccache-reshare", os.environ[CCACHE_RESHARE_VARIABLE]) if url else ()


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory, remote: tuple[str, str], worker_id: str) -> TinyBuild:
    """v6.12 with kconfig-base tiny and the tests' fragment, built once per test run through the CLI, with the
    tests' ccache: test_build checks how it went; the boot tests boot it. With several pytest workers (nox
    runs two), the first to get here builds it and the others wait for it, under a lock in the run's
    temporary directory: one x86_64 compile per run, whichever worker needs it first."""
    url, _ = remote
    shared = _run_directory(tmp_path_factory, worker_id)
    root = shared / "tiny"
    with open(shared / "tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        args = (*tiny_flags(url), "--cache-dir", str(root / "cache"))
        record = root / "build.json"
        if not record.exists():
            (root / "home").mkdir(parents=True, exist_ok=True)
            (root / "workspace" / "ci").mkdir(parents=True, exist_ok=True)
            (root / "workspace" / "ci" / "kernel.config").write_text(KCONFIG.read_text())
            build = ("build", *args, *session_remote_flags())
            done = run_invoke(build, home=root / "home", cwd=root / "workspace", env=CCACHE_ENV, timeout=3600)
            assert done.returncode == 0, done.stderr[-3000:]
            if session_remote_flags() and "ccache-remote" not in done.stderr:  # no warning: every object stored
                CCACHE_REMOTE_FILLED.touch()
            record.write_text(json.dumps({"stdout": done.stdout, "stderr": done.stderr}))
        built = json.loads(record.read_text())
    done = subprocess.CompletedProcess(["invoke", "build", *args], 0, built["stdout"], built["stderr"])
    return TinyBuild(done, Path(done.stdout.strip().splitlines()[-1]), args, root / "workspace")


@pytest.fixture(scope="session")
def arm64_build(
    tmp_path_factory: pytest.TempPathFactory, remote: tuple[str, str], worker_id: str, tiny_build: TinyBuild
) -> TinyBuild:
    """The tiny kernel cross-built for arm64 once per test run, into the tiny kernel's cache-dir (one cache-dir holds
    both arches: `invoke matrix` takes one), with arm64's guest root (made by `invoke deps --arch arm64` and kept
    between runs) linked in. `invoke deps` installs a foreign arch's packages: its tests are HOST_PACKAGES'."""
    url, _ = remote

    def prepare(root: Path) -> None:
        deps = ("deps", "--arch", "arm64", "--cache-dir", str(FOREIGN_CACHE))
        prepared = run_invoke(deps, home=root / "home", cwd=root / "workspace", timeout=1800)
        assert prepared.returncode == 0, prepared.stderr[-3000:]
        roots = root / "cache" / ROOTS
        if not roots.is_symlink():
            roots.symlink_to(FOREIGN_CACHE / ROOTS)

    shared = _run_directory(tmp_path_factory, worker_id)
    args = (*tiny_flags(url), "--arch", "arm64", "--cache-dir", str(shared / "tiny" / "cache"))
    return built_once(shared, "arm64", args, prepare)


@pytest.fixture(scope="session")
def debug_build(tmp_path_factory: pytest.TempPathFactory, remote: tuple[str, str], worker_id: str) -> TinyBuild:
    """The tests' one debug kernel, built once per test run like the tiny one, into its cache-dir: tiny with the
    tests' fragment, modules and kmemleak's sample module (tests/data/ci-debug-kernel.config), `debug
    kasan,kmemleak,lkdtm`. Every crash test that needs a sanitizer boots it. Its objects are none of the tiny
    kernel's (KASAN instruments every file): a cold compile of its own, then the tests' ccache; not through the tests'
    ccache remote, which holds the tiny kernel's."""
    url, _ = remote

    def prepare(root: Path) -> None:
        (root / "home").mkdir(parents=True, exist_ok=True)
        (root / "workspace" / "ci").mkdir(parents=True, exist_ok=True)
        fragment = KCONFIG.read_text() + DEBUG_KCONFIG.read_text()
        (root / "workspace" / "ci" / "debug-kernel.config").write_text(fragment)

    shared = _run_directory(tmp_path_factory, worker_id)
    args = (*tiny_flags(url, "ci/debug-kernel.config"), "--debug", DEBUG, "--cache-dir", str(shared / "tiny" / "cache"))
    return built_once(shared, "debug", args, prepare)


def _run_directory(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The test run's temporary directory, which every pytest worker shares."""
    return tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent


def built_once(shared: Path, name: str, args: tuple[str, ...], prepare: Callable[[Path], None]) -> TinyBuild:
    """`invoke build ARGS` once per test run, in the tiny kernel's home and workspace (`prepare`d first) with the
    tests' ccache: the first worker to need it builds, under NAME.lock in the run's directory, the others wait and
    take its record. How long it took is printed (pytest -s, and the CI log)."""
    root = shared / "tiny"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = root / f"{name}.json"
        if not record.exists():
            prepare(root)
            started = time.monotonic()
            done = run_invoke(
                ("build", *args), home=root / "home", cwd=root / "workspace", env=CCACHE_ENV, timeout=3600
            )
            assert done.returncode == 0, done.stderr[-3000:]
            seconds = round(time.monotonic() - started)
            record.write_text(json.dumps({"stdout": done.stdout, "stderr": done.stderr, "seconds": seconds}))
        built = json.loads(record.read_text())
    print(f"{name} build: {built['seconds']} s")
    done = subprocess.CompletedProcess(["invoke", "build", *args], 0, built["stdout"], built["stderr"])
    return TinyBuild(done, Path(done.stdout.strip().splitlines()[-1]), args, root / "workspace")


UNGROUPED = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    """Tiers: `slow` (builds or boots real kernels), `integration` (root, real sshd, act, apt; no kernel
    build), and `unit` for everything else (no root, no network, under 2 minutes): marked before `-m` selects.
    Then, under `--dist loadgroup`, a grouped test that xdist could not group fails (pytest 9.2 ignores the node id
    xdist 3.8 sets): its group would run side by side with itself, and act's module fixtures once per worker."""
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in ("slow", "integration")):
            item.add_marker(pytest.mark.unit)
    result = yield
    if config.getoption("loadgroup", False):
        for item in items:
            group = item.get_closest_marker("xdist_group")
            if group and "@" not in item.nodeid:
                item.stash[UNGROUPED] = f"pytest-xdist could not put this test in its group {group.args[0]!r}"
    return result


def pytest_runtest_setup(item: pytest.Item) -> None:
    if UNGROUPED in item.stash:
        pytest.fail(item.stash[UNGROUPED], pytrace=False)
