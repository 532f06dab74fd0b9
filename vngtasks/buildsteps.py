"""One kernel build's plan, and its steps outside make, each through an invoke Context.

A `Plan` says what to build and where (paths on the machine that builds, as strings: they
may be remote); a `Machine` says what that machine offers (home, arch, cores, vng, PATH,
CCACHE_DIR). The steps here — fetch the commit into the work tree, write the compiler
wrapper and small files, list what a cache entry keeps — take the Context to run on: invoke's
own for this machine, or a Fabric Connection (which is a Context) for a build host.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from invoke import Context
from invoke.exceptions import UnexpectedExit

from . import distcc, log, remotecache
from .arches import Arch
from .errors import FAILED, Failure, no_space
from .files import module_files
from .settings import Settings

# Fixed build identity: the same sources give the same objects, so ccache hits across trees.
BUILD_TIMESTAMP = "@0"
# ccache hashes these four into every object's key (they change the compiler's messages): pinned, so a
# build host whose SSH sessions set no locale hits what a terminal with LANG=C.UTF-8 compiled, and back.
LOCALE = {"LANG": "C", "LC_ALL": "C", "LC_CTYPE": "C", "LC_MESSAGES": "C"}
# Files of a build tree that a cache entry keeps (besides boot images and modules).
KEPT_FILES = (
    ".config", "System.map", "Module.symvers", "modules.order", "modules.builtin",
    "modules.builtin.modinfo", "include/config/kernel.release", "vmlinux.h", "vmlinux.zst",
)  # fmt: skip


@dataclass(frozen=True)
class Machine:
    """The machine a build runs on, as the build sees it: this one, or a build host surveyed over SSH."""

    home: str
    arch: Arch
    jobs: int
    vng: str  # the vng program there
    path: str  # make's PATH there (vng's directory first)
    ccache_dir: str  # CCACHE_DIR in its environment; "" when unset


@dataclass(frozen=True)
class Plan:
    """One build, decided before it starts."""

    settings: Settings
    sha: str
    tree: str  # path on the build host (a string: it may be remote)
    host_arch: Arch
    jobs: int
    tools_dir: str  # the compiler wrapper and the kconfig files, on the build host

    @property
    def sha12(self) -> str:
        return self.sha[:12]

    @property
    def compiler(self) -> str:
        s = self.settings
        if s.cc:
            return s.cc
        if s.llvm:
            return "clang" if s.llvm == "1" else f"clang{s.llvm}"
        return "gcc" if self.settings.arch == self.host_arch else f"{self.settings.arch.cross_compile}gcc"

    @property
    def host_compiler(self) -> str:
        """What make compiles the build's own tools with (kconfig, fixdep, objtool, resolve_btfids): the
        kernel Makefile's HOSTCC."""
        llvm = self.settings.llvm
        return ("clang" if llvm == "1" else f"clang{llvm}") if llvm else "gcc"


def plan_on(settings: Settings, sha: str, machine: Machine, work: str) -> Plan:
    """A build on `machine` in the work directory `work` there: the tree and the tools under it."""
    return Plan(
        settings=settings,
        sha=sha,
        tree=f"{work}/linux",
        host_arch=machine.arch,
        jobs=distcc.jobs(settings.distcc_hosts, machine.jobs),
        tools_dir=f"{work}/tools",
    )


def build_env(plan: Plan, home: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Make's environment: a fixed build identity and locale, and ccache's settings when it is on.
    `home` and `environ` are the building machine's: its CCACHE_DIR, else its ~/.cache/ccache."""
    env = {
        **LOCALE,
        "KBUILD_BUILD_TIMESTAMP": BUILD_TIMESTAMP,
        "KBUILD_BUILD_USER": "vngtasks",
        "KBUILD_BUILD_HOST": "vngtasks",
    }
    if plan.settings.kernel_compile_cache:
        env |= {
            "CCACHE_DIR": environ.get("CCACHE_DIR") or f"{home}/.cache/ccache",
            "CCACHE_MAXSIZE": plan.settings.ccache_max_size,
            "CCACHE_BASEDIR": plan.tree,
            "CCACHE_NOHASHDIR": "true",
            # This build's own counts (the directory's counters add up every build sharing it, at once too).
            "CCACHE_STATSLOG": f"{plan.tools_dir}/ccache-stats.log",
        }
        if plan.settings.ccache_remote:  # the URL is in that file, never in an environment (see remotecache)
            env["CCACHE_CONFIGPATH"] = f"{plan.tools_dir}/{remotecache.CONFIG_FILE}"
        if plan.settings.distcc_hosts:
            env |= distcc.environment(plan.settings.distcc_hosts, plan.tools_dir)
    return env


def make_env(plan: Plan, machine: Machine) -> dict[str, str]:
    """build_env on `machine`: its ccache, and its PATH with vng's directory first."""
    return {**build_env(plan, machine.home, {"CCACHE_DIR": machine.ccache_dir}), "PATH": machine.path}


def fetch(c: Context, url: str, tag: str, sha: str, tree: str) -> None:
    """Make `tree` hold exactly commit `sha`: a shallow fetch of the tag, or of the sha itself."""
    if not c.run(f"test -d {shlex.quote(tree)}/.git", warn=True, hide=True, in_stream=False).ok:
        c.run(shlex.join(git_init_argv(tree)), hide=True, in_stream=False)
    for want in fetch_wants(tag, sha):
        fetched = c.run(
            shlex.join(fetch_argv(tree, url, want)), warn=True, in_stream=False, env={"GIT_TERMINAL_PROMPT": "0"}
        )
        if no_space(fetched.stdout, fetched.stderr):
            raise Failure(f"tag: cannot fetch commit {sha[:12]} of {tag}: no space left on device under {tree}", FAILED)
        if not fetched.ok:
            continue
        got = c.run(shlex.join(_git(tree, "rev-parse", "FETCH_HEAD^{commit}")), hide=True, in_stream=False)
        if got.stdout.strip() == sha:
            break
        log.warn(f"tag: {tag} now points at {got.stdout.strip()[:12]}, not the resolved {sha[:12]}; fetching that")
    else:
        raise Failure(f"tag: cannot fetch commit {sha[:12]} of {tag} from {url}", FAILED)
    c.run(shlex.join(checkout_argv(tree, sha)), in_stream=False)
    head = c.run(shlex.join(_git(tree, "rev-parse", "HEAD")), hide=True, in_stream=False).stdout.strip()
    if head != sha:
        raise Failure(f"tag: checked out {head[:12]}, expected {sha[:12]}", FAILED)


def fetch_wants(tag: str, sha: str) -> list[str]:
    """What to fetch, in order: the tag (or branch), else the commit itself (a tag that moved since)."""
    return [sha] if tag == sha else [f"refs/tags/{tag}", f"refs/heads/{tag}", sha]


def _git(tree: str, *args: str) -> list[str]:
    return ["git", "-C", tree, *args]


def git_init_argv(tree: str) -> list[str]:
    return ["git", "init", "-q", tree]


def fetch_argv(tree: str, url: str, want: str) -> list[str]:
    return _git(tree, "fetch", "--depth", "1", "--no-tags", *_progress(), "--", url, want)


def checkout_argv(tree: str, sha: str) -> list[str]:
    # Parallel checkout, one worker per core: a kernel tree is 80,000 files, and writing them is mostly the
    # kernel's time (here, 2 cores: 54-58 s with one worker, 21-25 s with two).
    return _git(tree, "-c", "checkout.workers=0", "checkout", "-q", "--force", "--detach", sha)


def _progress() -> list[str]:
    # Through invoke git's stderr is a pipe: ask for progress when a person is watching.
    return ["--progress"] if sys.stderr.isatty() else []


def write_tools(c: Context, plan: Plan) -> None:
    """The compiler wrappers (make takes one program as CC, and as HOSTCC): the kernel's objects and the build's
    own tools, which a fresh work tree compiles again, both through ccache."""
    c.run(shlex.join(["mkdir", "-p", plan.tools_dir]), in_stream=False)
    for name, compiler in (("cc", plan.compiler), ("hostcc", plan.host_compiler)):
        put(c, f'#!/bin/sh\nexec ccache {shlex.quote(compiler)} "$@"\n', f"{plan.tools_dir}/{name}")
        c.run(shlex.join(["chmod", "+x", f"{plan.tools_dir}/{name}"]), in_stream=False)


def write_distcc_files(c: Context, plan: Plan, home: str) -> None:
    """With distcc-hosts: the ssh wrapper distcc runs, its config (the building machine's ~/.ssh: `home` is its
    $HOME, the keys those that exist there), distcc's state directory, and no log of an earlier build."""
    tools = plan.tools_dir
    keys = [f"{home}/.ssh/{name}" for name in distcc.IDENTITIES]
    listed = c.run(shlex.join(["ls", "-d", "--", *keys]), hide=True, warn=True, in_stream=False).stdout.splitlines()
    put(c, distcc.ssh_config(home, [key for key in keys if key in listed]), f"{tools}/{distcc.SSH_CONFIG}")
    put(c, distcc.ssh_wrapper(), f"{tools}/{distcc.SSH_WRAPPER}")
    c.run(shlex.join(["chmod", "+x", f"{tools}/{distcc.SSH_WRAPPER}"]), in_stream=False)
    c.run(shlex.join(["rm", "-rf", "--", f"{tools}/{distcc.STATE_DIR}", f"{tools}/{distcc.LOG_FILE}"]), in_stream=False)
    c.run(shlex.join(["mkdir", "--", f"{tools}/{distcc.STATE_DIR}"]), in_stream=False)


@contextlib.contextmanager
def ccache_config(c: Context, plan: Plan, env: Mapping[str, str]) -> Iterator[None]:
    """The build's own ccache configuration file while it builds, when ccache-remote is set: the machine's
    ccache.conf (from the CCACHE_DIR in `env`) and the remote storage, 0600; removed afterwards (it holds
    the URL, maybe a password)."""
    s = plan.settings
    if "CCACHE_CONFIGPATH" not in env:
        yield
        return
    path = env["CCACHE_CONFIGPATH"]
    own = c.run(shlex.join(["head", "-c", "65536", "--", f"{env['CCACHE_DIR']}/ccache.conf"]), hide=True, warn=True,
                in_stream=False)  # fmt: skip
    put(c, remotecache.config_text(s.ccache_remote, s.ccache_reshare, own.stdout if own.ok else ""), path,
        private=True)  # fmt: skip
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a lost build host: its work directory goes anyway
            c.run(shlex.join(["rm", "-f", "--", path]), hide=True, warn=True, in_stream=False)


def in_tree(tree: str, argv: list[str]) -> str:
    """A command line that runs `argv` in `tree` (invoke's `cd` would quote spaces only)."""
    return f"cd {shlex.quote(tree)} && {shlex.join(argv)}"


def put(c: Context, text: str, path: str, private: bool = False) -> None:
    """Write `text` to the file `path` where `c` runs; `private`: a new file only its owner can read (0600)."""
    quoted = shlex.quote(path)
    command = f"rm -f -- {quoted} && umask 077 && cat > {quoted}" if private else f"cat > {quoted}"
    c.run(command, in_stream=_Text(text), hide=True)


class _Text:
    """A readable stream for `c.run(in_stream=...)`, which feeds the command's stdin."""

    def __init__(self, text: str) -> None:
        self._chunks: Iterator[str] = iter([text])

    def read(self, size: int = -1) -> str:
        return next(self._chunks, "")


@contextlib.contextmanager
def group(title: str) -> Iterator[None]:
    """A foldable group in GitHub Actions' log; a plain heading elsewhere, and for one of builds at once (labeled: a
    group would fold the other builds' lines into it)."""
    in_actions = os.environ.get("GITHUB_ACTIONS") == "true" and not log.label()
    print(f"::group::{title}" if in_actions else f"{log.label()}vngtasks: {title}", flush=True)
    try:
        yield
    finally:
        if in_actions:
            print("::endgroup::", flush=True)


def kept_paths(c: Context, tree: str, arch: Arch) -> list[str]:
    """Tree-relative paths a cache entry keeps: what vng boots from and what users read, and the modules this
    build's modules.order names (a reused tree may hold others, of an earlier config)."""
    order = c.run(f"cat {shlex.quote(tree)}/modules.order 2>/dev/null", hide=True, warn=True, in_stream=False)
    wanted = [*KEPT_FILES, *arch.boot_images, *module_files(order.stdout)]
    listing = c.run(f"cd {shlex.quote(tree)} && ls -d -- {shlex.join(wanted)} 2>/dev/null", hide=True, warn=True,
                    in_stream=False)  # fmt: skip
    return sorted(set(listing.stdout.splitlines()))


def copy_tree_files(c: Context, tree: str, paths: list[str], dest: str) -> None:
    """Copy `paths` of `tree` into the directory `dest` on the same machine, keeping their layout."""
    copied = c.run(
        f"tar -C {shlex.quote(tree)} -cf - --files-from=- | tar -C {shlex.quote(dest)} -xf -",
        in_stream=_Text("\n".join(paths) + "\n"),
        hide=True,
        warn=True,
    )
    if no_space(copied.stderr):
        raise Failure(f"cache: no space left on device under {dest}", FAILED)
    if not copied.ok:
        raise UnexpectedExit(copied)
