"""nox sessions: `nox` runs lint and tests; `nox -s bench` prints the speed ratios."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

# Host packages only the tests need, on top of what `invoke deps` installs for users.
# qemu-system-arm: the arm64 KVM probe under TCG; linux-source-6.12: the kernel remote of the build
# tests (tests/linux_remote.py); openssh-server: the build host of the remote-build tests.
TEST_PACKAGES = "qemu-system-arm linux-source-6.12 openssh-server"


@nox.session
def tests(session: nox.Session) -> None:
    """All tests, slow ones (real kernels, real VMs) included; `-- -m 'not slow'` skips those."""
    session.install("-e", ".[test]")
    session.run("invoke", "deps", "--packages", TEST_PACKAGES)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff's checks and formatting; zizmor on the action (shellcheck of its run bodies is in tests)."""
    session.install("ruff", "zizmor")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("zizmor", "--offline", "action.yml", *map(str, sorted(Path("tests/doubles").rglob("action.yml"))))


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Measure the speed goals and print ratios (never asserted in tests)."""
    session.install("-e", ".")
    session.run("python", "tests/bench.py", *session.posargs)
