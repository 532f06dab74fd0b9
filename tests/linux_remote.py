"""A real kernel git remote made from Debian's linux-source-6.12, with tag v6.12.

Made once per machine under LINUX_REMOTE_HOME (kept between runs: ~1 min to make) and
reused; `file://` URLs of it behave like any remote to git and to vngtasks.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
LINUX_REMOTE_HOME = Path(os.environ.get("VNGTASKS_TEST_REMOTES", "/var/tmp/vngtasks-tests"))
TAG = "v6.12"
# Every kernel-building test and bench builds with this one fragment, with this one ccache (kept
# between runs on a machine): one .config, so one set of ccache objects that all of them hit.
KCONFIG = Path(__file__).parent / "data" / "ci-kernel.config"
CCACHE_DIR = LINUX_REMOTE_HOME / "ccache"
# The foreign arches' guest roots and Debian kernels, kept as the ccache is: made once per package version.
FOREIGN_CACHE = LINUX_REMOTE_HOME / "foreign"
_DEBIAN_BLOCK = "\n#\n# Debian packaging:"
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "vngtasks tests",
    "GIT_AUTHOR_EMAIL": "tests@vngtasks.invalid",
    "GIT_COMMITTER_NAME": "vngtasks tests",
    "GIT_COMMITTER_EMAIL": "tests@vngtasks.invalid",
    "GIT_AUTHOR_DATE": "2024-11-17T00:00:00Z",
    "GIT_COMMITTER_DATE": "2024-11-17T00:00:00Z",
}


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, **_GIT_ENV}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout


def without_rustup(path: str) -> str:
    """PATH minus a rustup toolchain: a rustc on PATH changes a kernel's .config
    (CONFIG_RUSTC_VERSION), hence every object's ccache key; a build host's ssh session never
    sees ~/.cargo/bin, so no kernel-building test or bench does."""
    return os.pathsep.join(entry for entry in path.split(os.pathsep) if "/.cargo/" not in entry + "/")


def tagged_commit() -> tuple[Path, str]:
    """The remote (made if missing) and the full SHA its TAG names."""
    repo = linux_remote()
    return repo, git(repo, "rev-parse", f"{TAG}^{{commit}}").strip()


def linux_remote() -> Path:
    """The path of the repository (a work tree with .git), made if missing."""
    target = LINUX_REMOTE_HOME / "linux-6.12"
    LINUX_REMOTE_HOME.mkdir(parents=True, exist_ok=True)
    with open(LINUX_REMOTE_HOME / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".git").is_dir():
            _make(target)
    return target


def _make(target: Path) -> None:
    if not TARBALL.exists():
        raise FileNotFoundError(f"{TARBALL} missing: install linux-source-6.12")
    with tempfile.TemporaryDirectory(dir=LINUX_REMOTE_HOME, prefix=".making-") as tmp:
        print(f"making {target} from {TARBALL} ...", file=sys.stderr)
        with tarfile.open(TARBALL) as archive:
            archive.extractall(tmp, filter="tar")
        (tree,) = Path(tmp).iterdir()
        gitignore = tree / ".gitignore"
        text = gitignore.read_text()
        if _DEBIAN_BLOCK in text:
            gitignore.write_text(text[: text.index(_DEBIAN_BLOCK)] + "\n")
        git(tree, "init", "-q", "-b", "master")
        git(tree, "add", "-A")
        git(tree, "commit", "-q", "-m", "Linux 6.12 (from Debian's linux-source-6.12)")
        git(tree, "tag", "-a", TAG, "-m", "Linux 6.12")
        # One pack of undeltified objects: serving a shallow fetch then copies, never recompresses.
        git(tree, "config", "pack.window", "0")
        git(tree, "repack", "-a", "-d", "-q")
        shutil.rmtree(target, ignore_errors=True)
        tree.rename(target)


if __name__ == "__main__":
    print(linux_remote())
