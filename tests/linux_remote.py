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
import tempfile
from pathlib import Path

TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
LINUX_REMOTE_HOME = Path(os.environ.get("VNGTASKS_TEST_REMOTES", "/var/tmp/vngtasks-tests"))
TAG = "v6.12"
# Every kernel-building test and bench builds with this one fragment, with this one ccache (kept
# between runs on a machine): one .config, so one set of ccache objects that all of them hit.
KCONFIG = Path(__file__).parent / "data" / "ci-kernel.config"
DEBUG_KCONFIG = Path(__file__).parent / "data" / "ci-debug-kernel.config"  # what the debug kernel adds to KCONFIG
DEBUG = "kasan,kmemleak,lkdtm"  # the debug kernel's `debug`
CCACHE_DIR = LINUX_REMOTE_HOME / "ccache"
# LKDTM is in that fragment: a real kernel crash on demand (echo WARNING > PROVOKE), debugfs mounted first where the
# guest's init has not (under a workload's `set -e` a second mount would fail).
PROVOKE = "/sys/kernel/debug/provoke-crash/DIRECT"
MOUNT_DEBUGFS = f"test -e {PROVOKE} || mount -t debugfs debugfs /sys/kernel/debug"
# LKDTM's WARNING, BUG and EXCEPTION, once each: the last two kill the shell that writes them, so each has its own.
PROVOKE_THREE = "; ".join(f"sh -c 'echo {crash} > {PROVOKE}' || true" for crash in ("WARNING", "BUG", "EXCEPTION"))
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
        # tar, not tarfile: Debian 12's Python 3.11.2 has no extractall(filter=), and tar is faster.
        subprocess.run(["tar", "-xf", str(TARBALL), "-C", tmp], check=True)
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


# invoke bisect's slow test and bench: /proc/version gains a line from one commit of a history on.
MARK = "bisect-mark"
VERSION_C = "fs/proc/version.c"


def kernel_history(remote: Path, sha: str, repo: Path, changes_at: int, count: int = 8) -> list[str]:
    """`count` commits on top of `sha` in a repository borrowing the remote's objects (nothing checked out),
    the same commits on every run: each adds a Documentation file, which no build compiles; commit
    `changes_at` also makes /proc/version print MARK. Tagged bisect-good (the first) and bisect-bad (the
    last); the repository lets a fetch filter (as kernel.org's and GitHub's do)."""
    subprocess.run(["git", "clone", "-q", "--shared", "--no-checkout", str(remote), str(repo)], check=True)
    env = {**os.environ, **_GIT_ENV, "GIT_INDEX_FILE": str(repo / "bisect-index")}

    def run(*args: str, data: str | None = None) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], input=data, capture_output=True, text=True,
                              check=True, env=env)  # fmt: skip
        return done.stdout.strip()

    run("read-tree", sha)
    version_c = run("show", f"{sha}:{VERSION_C}") + "\n"
    printed = "\t\tutsname()->version);\n\treturn 0;"
    marked = version_c.replace(printed, printed.replace("\treturn", f'\tseq_puts(m, "{MARK}\\n");\n\treturn'), 1)
    assert marked != version_c  # v6.12's version_proc_show, as the edit expects
    parent, shas = sha, []
    for number in range(count):
        note = run("hash-object", "-w", "--stdin", data=f"bisect test commit {number}\n")
        run("update-index", "--add", "--cacheinfo", f"100644,{note},Documentation/bisect-test-{number}.txt")
        if number == changes_at:
            run("update-index", "--cacheinfo", f"100644,{run('hash-object', '-w', '--stdin', data=marked)},{VERSION_C}")
        subject = f"bisect test {number}" + (": mark" if number == changes_at else "")
        parent = run("commit-tree", run("write-tree"), "-p", parent, "-m", subject)
        shas.append(parent)
    run("tag", "bisect-good", shas[0])
    run("tag", "bisect-bad", shas[-1])
    run("config", "uploadpack.allowFilter", "true")
    return shas
