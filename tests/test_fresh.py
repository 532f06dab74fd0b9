"""The unit tier where nothing is installed: the proof that it needs no host package, no root and no network.

A stock Debian 12 root (mmdebstrap's minbase with python3, python3-venv, git and certificates: what a
container or a fresh cloud image has) is made once per machine from Debian's registry, with a venv of
Debian's own python3 holding vngtasks' dependencies (made again when pyproject.toml's change). Each run
lays a throwaway layer over it (overlayfs), copies this checkout in, and runs `pytest -m unit` there as
`nobody`, in a network namespace of its own that has only loopback. Nothing of `invoke deps` (QEMU,
busybox, a distro kernel in /boot, the build toolchain) is in that root, so a unit test that needs one
fails here, whatever this machine has installed. `nox -s fresh` runs this test alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import copy_checkout
from linux_remote import LINUX_REMOTE_HOME

pytestmark = pytest.mark.integration

SUITE = "bookworm"
INCLUDE = "python3,python3-venv,git,ca-certificates"
# The machine's own apt sources (its registry), as a stock install of it would have them.
SOURCES = next(
    (path for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")) if path.exists()),
    None,
)
NOBODY = 65534
# What the run inside sees: no INVOKE_/GITHUB_/VNGTASKS_ settings of this shell, a home of its own.
INSIDE_ENV = {"HOME": "/tmp/home", "PATH": "/venv/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
              "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip


def requirements() -> list[str]:
    """vngtasks' dependencies and its test extras (hatchling, its build backend, among them), as the installed
    vngtasks names them, and what hatchling needs for an editable install: installing the checkout itself
    then needs no network."""
    return [requirement.split(";")[0].strip() for requirement in metadata.requires("vngtasks") or []] + ["editables"]


def stock_root() -> Path:
    """The stock root with /venv (Debian's python3, the requirements installed), made once per requirements (the
    roots of others are removed then)."""
    key = hashlib.sha256("\n".join([SUITE, INCLUDE, *requirements()]).encode()).hexdigest()[:12]
    root = LINUX_REMOTE_HOME / f"fresh-root-{key}"
    if (root / ".ready").exists():
        return root
    for stale in LINUX_REMOTE_HOME.glob("fresh-root-*"):  # the roots of other requirements: half a GB each
        shutil.rmtree(stale, ignore_errors=True)
    making = root.with_name(root.name + ".making")
    shutil.rmtree(making, ignore_errors=True)
    subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(making),
                    str(SOURCES)], check=True, stdin=subprocess.DEVNULL, timeout=900)  # fmt: skip
    pip_env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}  # this machine's registry settings
    for argv in (["/usr/bin/python3", "-m", "venv", "/venv"], ["/venv/bin/pip", "install", "-q", *requirements()]):
        done = inside(making, argv, network=True, env=pip_env, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
    (making / ".ready").touch()
    making.rename(root)
    return root


def inside(root: Path, argv: list[str], *, network: bool = False, user: int = 0, env: dict | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:  # fmt: skip
    """argv run in `root` (chroot, /proc, /dev and a /tmp of its own), as `user`; with `network`, this machine's
    certificates (its registries may sit behind a proxy of their own), else in a network namespace holding
    loopback only."""
    script = (
        # Private mounts, which --propagation private cannot make inside a chroot (where / is no mount point): there,
        # the chroot's maker chose (../shared/fresh-machine makes them private).
        'set -e; R="$1"; shift; mount --make-rprivate / 2>/dev/null || true;'
        ' mount -t proc proc "$R/proc"; mount --rbind /dev "$R/dev";'
        ' if [ -n "$REGISTRY" ]; then mount --bind -o ro /etc/ssl/certs "$R/etc/ssl/certs"; fi;'
        ' mount -t tmpfs tmpfs "$R/tmp"; mkdir -p "$R/tmp/home"; chown "$USER_ID:$USER_ID" "$R/tmp/home";'
        " ip link set lo up 2>/dev/null || true;"
        ' exec chroot --userspec="$USER_ID:$USER_ID" "$R" "$@"'
    )
    unshare = ["unshare", "--mount", "--propagation", "unchanged", *([] if network else ["--net"])]
    environ = [f"{name}={value}" for name, value in {**INSIDE_ENV, **(env or {})}.items()]
    return subprocess.run(
        [*unshare, "sh", "-c", script, "sh", str(root), "/usr/bin/env", "-i", *environ, *argv],
        env={**os.environ, "USER_ID": str(user), "REGISTRY": "1" if network else ""},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A throwaway layer over the stock root, with this checkout (its files as they are now) at /src."""
    if os.geteuid() != 0 or shutil.which("mmdebstrap") is None or SOURCES is None:
        pytest.skip("needs root, mmdebstrap and apt sources (nox installs mmdebstrap)")
    lower = stock_root()
    upper, work, merged = (tmp_path / name for name in ("upper", "work", "merged"))
    for path in (upper, work, merged):
        path.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
                    str(merged)], check=True)  # fmt: skip
    try:
        copy_checkout(merged / "src")
        done = inside(merged, ["/venv/bin/pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "/src"])
        assert done.returncode == 0, done.stdout + done.stderr
        yield merged
    finally:
        subprocess.run(["umount", "--lazy", str(merged)], check=False)


def test_the_unit_tier_passes_with_nothing_installed_as_nobody_offline(fresh: Path) -> None:
    assert not (fresh / "usr/bin/qemu-system-x86_64").exists() and not list((fresh / "boot").glob("vmlinuz-*"))
    argv = ["/bin/sh", "-c", "cd /src && exec /venv/bin/python -m pytest -m unit -q -p no:cacheprovider -rf"]
    done = inside(fresh, argv, user=NOBODY, timeout=1200)
    print(done.stdout[-3000:], done.stderr[-2000:], file=sys.stderr)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]
