"""nox sessions: `nox` runs lint, the unit tier on Python 3.10 and every test; `nox -s unit|integration|slow`
one tier; `nox -s bench`."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "unit-3.10", "tests"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

# Host packages only the tests need, on top of what `invoke deps` installs for users.
# qemu-system-arm: the arm64 KVM probe under TCG; linux-source-6.12: the kernel remote of the build
# tests (tests/linux_remote.py); openssh-server: the build host of the remote-build tests.
TEST_PACKAGES = "qemu-system-arm linux-source-6.12 openssh-server"
# The tiers (tests/conftest.py): what each session selects.
TIERS = {"unit": "unit", "integration": "integration and not slow", "slow": "slow"}


def _test(session: nox.Session, marks: str | None) -> None:
    session.install("-e", ".[test]")
    if marks != "unit":  # unit tests need no root and no host packages
        session.run("invoke", "deps", "--packages", TEST_PACKAGES)
    session.run("pytest", *(["-m", marks] if marks else []), *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """Every tier: unit, integration (root, sshd, act, apt) and slow (real kernels built and booted)."""
    _test(session, None)


@nox.session(default=False)
def unit(session: nox.Session) -> None:
    """No root, no network, under 2 minutes."""
    _test(session, TIERS["unit"])


def _oldest_python() -> str:
    """Python 3.10, the oldest vngtasks supports: pyenv's when it has one (its shim may refuse), else `python3.10`."""
    found = sorted(Path.home().glob(".pyenv/versions/3.10.*/bin/python3.10"))
    return str(found[-1]) if found else "3.10"


@nox.session(name="unit-3.10", python=_oldest_python())
def unit_oldest_python(session: nox.Session) -> None:
    """The unit tier on Python 3.10 (ubuntu-22.04's), the oldest vngtasks supports."""
    _test(session, TIERS["unit"])


@nox.session(default=False)
def integration(session: nox.Session) -> None:
    """Root, real git, sshd and act; no kernel built or booted."""
    _test(session, TIERS["integration"])


@nox.session(default=False)
def slow(session: nox.Session) -> None:
    """Real kernels built (tiny, one of vng's base) and booted under QEMU."""
    _test(session, TIERS["slow"])


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
