"""nox sessions: `nox` runs lint, the unit tier on Python 3.10 (where one is installed), and the tests that need
this machine (integration and slow, with the unit tier again in a stock Debian root: tests/test_fresh.py);
`nox -s unit|integration|slow|fresh` one tier; `nox -s bench`. Sessions are defined in the order `nox` runs them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"  # not uv: it reads none of pip's settings (a machine's index or proxy)
nox.options.reuse_existing_virtualenvs = True

# Host packages only the tests need, on top of what `invoke deps` installs for users.
# qemu-system-arm: the arm64 KVM probe under TCG; linux-source-6.12: the kernel remote of the build
# tests (tests/linux_remote.py); openssh-server: the build host of the remote-build tests; mmdebstrap: the
# stock Debian root the unit tier is proven in (tests/test_fresh.py); nginx-core (its WebDAV module) and
# redis-server: the shared ccache servers of ccache-remote's tests (tests/test_remote_storage.py); distcc: the
# helpers' distccd of distcc-hosts' test (tests/test_distcc.py).
TEST_PACKAGES = "qemu-system-arm linux-source-6.12 openssh-server mmdebstrap nginx-core redis-server distcc"
# The tiers (tests/conftest.py): what each session selects.
TIERS = {"unit": "unit", "integration": "integration and not slow", "slow": "slow", "machine": "not unit"}
# The root tiers' pytest temporary directories, each session's set aside when it starts (_set_aside): the build
# tests' kernel trees take gigabytes, more than a /tmp in memory holds (half of RAM: Debian 13's, Fedora's, the
# fresh-machine rehearsal's). A guest sees them here as it sees a runner's workspace, through vng's throwaway
# overlay on /var (not under /var/tmp, which virtme-ng's init covers with a tmpfs, nor /root, which vng overlays
# not). Outside the checkout: tests copy it (act, the non-root user's install).
TEMPORARY = Path("/var/lib/vngtasks-tests/pytest")
# Where pytest writes each session's results (.ci/run prints the slowest tests from them).
RESULTS = Path(os.environ.get("VNGTASKS_TEST_RESULTS", ".ci/results"))


def _oldest_python() -> str | None:
    """Python 3.10, the oldest vngtasks supports: pyenv's when it has one (its shim may refuse), else a
    `python3.10` on PATH, else None (stock Debian 12 has none: the session is then not run by default)."""
    found = sorted(Path.home().glob(".pyenv/versions/3.10.*/bin/python3.10"))
    if found:
        return str(found[-1])
    return "3.10" if any(Path(d, "python3.10").exists() for d in os.environ.get("PATH", "").split(os.pathsep)) else None


OLDEST_PYTHON = _oldest_python()
nox.options.sessions = ["lint", *(["unit-3.10"] if OLDEST_PYTHON else []), "tests"]


# pytest workers, one per core (at most 4): the unit tier takes half the time on two; for the tiers that boot and
# build, a boot's waits and a build's fetch and link leave a core idle; what must not run side by side shares an
# xdist group (conftest).
WORKERS = str(min(os.cpu_count() or 1, 4))


def _test(session: nox.Session, marks: str, *paths: str) -> None:
    session.install("-e", ".[test]")
    workers = ["--numprocesses", WORKERS, "--dist", "loadgroup"]
    temporary: list[str] = []
    if marks != TIERS["unit"]:  # unit tests need no root and no host packages
        session.run("invoke", "deps", "--packages", TEST_PACKAGES)
        TEMPORARY.mkdir(parents=True, exist_ok=True)  # pytest makes --basetemp, not its parents
        _set_aside(TEMPORARY / session.name)
        temporary = ["--basetemp", str(TEMPORARY / session.name)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = ["--junitxml", str(RESULTS / f"{session.name}.xml"), "--durations", "10"]
    session.run("pytest", "-m", marks, *workers, *report, *temporary, *paths, *session.posargs)


def _set_aside(directory: Path) -> None:
    """The last run's temporary directory, moved aside and deleted in the background while this run starts: pytest
    would delete it first (kernel trees: 13 GB in 387,000 files after a run, 39 s to delete here)."""
    if directory.exists():
        directory.rename(directory.with_name(f"{directory.name}.old-{os.getpid()}"))
    old = sorted(directory.parent.glob(f"{directory.name}.old-*"))  # with any a killed deletion left
    if old:
        subprocess.Popen(["rm", "-rf", "--", *map(str, old)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


@nox.session
def lint(session: nox.Session) -> None:
    """ruff's checks and formatting; zizmor on the action (shellcheck of its run bodies is in tests)."""
    session.install("ruff", "zizmor")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("zizmor", "--offline", "action.yml", *map(str, sorted(Path("tests/doubles").rglob("action.yml"))))


@nox.session(name="unit-3.10", python=OLDEST_PYTHON or "3.10")
def unit_oldest_python(session: nox.Session) -> None:
    """The unit tier on Python 3.10 (ubuntu-22.04's), the oldest vngtasks supports; before anything is installed."""
    _test(session, TIERS["unit"])


@nox.session
def tests(session: nox.Session) -> None:
    """What needs this machine: integration (root, sshd, act, apt), slow (real kernels built and booted), and
    the unit tier once more, in a stock Debian root as nobody with no network (tests/test_fresh.py)."""
    _test(session, TIERS["machine"])


@nox.session(default=False)
def unit(session: nox.Session) -> None:
    """No root, no host packages, no network; about a minute."""
    _test(session, TIERS["unit"])


@nox.session(default=False)
def fresh(session: nox.Session) -> None:
    """The unit tier in a stock Debian 12 root, as nobody, offline: proof that it needs nothing installed (root)."""
    _test(session, TIERS["integration"], "tests/test_fresh.py")


@nox.session(default=False)
def integration(session: nox.Session) -> None:
    """Root, real git, sshd, act and apt; no kernel built or booted."""
    _test(session, TIERS["integration"])


@nox.session(default=False)
def slow(session: nox.Session) -> None:
    """Real kernels built and booted under QEMU."""
    _test(session, TIERS["slow"])


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Measure the speed goals and print ratios (never asserted in tests)."""
    session.install("-e", ".")
    session.run("python", "tests/bench.py", *session.posargs)
