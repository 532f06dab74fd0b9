"""Building a kernel from git with vng, and keeping the trimmed result in the cache.

Every step runs through an invoke Context (`c.run`, `c.cd`), so a Fabric Connection
builds on a remote host with the same code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from invoke import Context

from . import arches, cache, kconfig, log, render, vm
from .arches import Arch
from .errors import FAILED, Failure
from .resolve import Resolved
from .settings import Settings, make_directory

CCACHE_MAX_SIZE = "5G"
# Fixed build identity: the same sources give the same objects, so ccache hits across trees.
BUILD_TIMESTAMP = "@0"
# ccache hashes these four into every object's key (they change the compiler's messages): pinned, so a
# build host whose SSH sessions set no locale hits what a terminal with LANG=C.UTF-8 compiled, and back.
LOCALE = {"LANG": "C", "LC_ALL": "C", "LC_CTYPE": "C", "LC_MESSAGES": "C"}
# Files of a build tree that a cache entry keeps (besides boot images and modules).
KEPT_FILES = (
    ".config", "System.map", "Module.symvers", "modules.order", "modules.builtin",
    "modules.builtin.modinfo", "include/config/kernel.release", "vmlinux.h",
)  # fmt: skip
_SHA = re.compile(r"[0-9a-f]{40}")


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


def vng_argv(plan: Plan, vng: str) -> list[str]:
    s = plan.settings
    cc = str(Path(plan.tools_dir) / "cc") if s.kernel_compile_cache else s.cc
    return render.argv(
        "vng-build.argv.j2",
        vng=vng,
        arch=s.arch,
        host_arch=plan.host_arch,
        jobs=plan.jobs,
        name=s.name,
        sha12=plan.sha12,
        build_timestamp=BUILD_TIMESTAMP,
        cc=cc,
        llvm=s.llvm,
    )


def build_env(plan: Plan, home: str) -> dict[str, str]:
    """Make's environment: a fixed build identity and locale, and ccache's settings when it is on."""
    env = {
        **LOCALE,
        "KBUILD_BUILD_TIMESTAMP": BUILD_TIMESTAMP,
        "KBUILD_BUILD_USER": "vngtasks",
        "KBUILD_BUILD_HOST": "vngtasks",
    }
    if plan.settings.kernel_compile_cache:
        env |= {
            "CCACHE_DIR": os.environ.get("CCACHE_DIR") or f"{home}/.cache/ccache",
            "CCACHE_MAXSIZE": CCACHE_MAX_SIZE,
            "CCACHE_BASEDIR": plan.tree,
            "CCACHE_NOHASHDIR": "true",
        }
    return env


def fetch(c: Context, url: str, tag: str, sha: str, tree: str) -> None:
    """Make `tree` hold exactly commit `sha`: a shallow fetch of the tag, or of the sha itself."""
    if not c.run(f"test -d {shlex.quote(tree)}/.git", warn=True, hide=True, in_stream=False).ok:
        c.run(shlex.join(git_init_argv(tree)), hide=True, in_stream=False)
    for want in fetch_wants(tag, sha):
        fetched = c.run(
            shlex.join(fetch_argv(tree, url, want)), warn=True, in_stream=False, env={"GIT_TERMINAL_PROMPT": "0"}
        )
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
    return _git(tree, "checkout", "-q", "--force", "--detach", sha)


def _progress() -> list[str]:
    # Through invoke git's stderr is a pipe: ask for progress when a person is watching.
    return ["--progress"] if sys.stderr.isatty() else []


def write_tools(c: Context, plan: Plan) -> None:
    """The compiler wrapper: make takes one program as CC."""
    wrapper = f'#!/bin/sh\nexec ccache {shlex.quote(plan.compiler)} "$@"\n'
    cc = f"{plan.tools_dir}/cc"
    c.run(shlex.join(["mkdir", "-p", plan.tools_dir]), in_stream=False)
    _put(c, wrapper, cc)
    c.run(shlex.join(["chmod", "+x", cc]), in_stream=False)


def in_tree(tree: str, argv: list[str]) -> str:
    """A command line that runs `argv` in `tree` (invoke's `cd` would quote spaces only)."""
    return f"cd {shlex.quote(tree)} && {shlex.join(argv)}"


def config_steps(plan: Plan, variables: list[str]) -> list[list[str]]:
    """The commands that make the tree's .config, in the tree: the base, then the fragments merged."""
    s = plan.settings
    context = {"arch": s.arch, "host_arch": plan.host_arch, "variables": variables}
    if s.kconfig_base == "vng":
        steps = [render.argv("configkernel.argv.j2", **context)]
    elif s.kconfig_base == "tiny":
        steps = [render.argv("make.argv.j2", **context, targets=[target]) for target in kconfig.TINY_TARGETS]
    else:
        steps = [["cp", f"{plan.tools_dir}/{kconfig.BASE_FILE}", ".config"]]
    merged = [f"{plan.tools_dir}/{name}" for name, _ in kconfig.fragments(s)]
    if merged:
        steps.append(render.argv("merge-config.argv.j2", fragments=merged))
    return [*steps, render.argv("make.argv.j2", **context, targets=["olddefconfig"])]


def configure(c: Context, plan: Plan, variables: list[str], env: dict[str, str]) -> None:
    """The tree's .config, made afresh from the base and the fragments (see kconfig.py)."""
    s = plan.settings
    fragments = kconfig.fragments(s)
    files = dict(fragments)
    if isinstance(s.kconfig_base, Path):
        files[kconfig.BASE_FILE] = s.kconfig_base.read_text()
    for name, text in files.items():
        _put(c, text, f"{plan.tools_dir}/{name}")
    log.info(f"kconfig: base {s.kconfig_base}" + "".join(f" + {name}" for name, _ in fragments))
    for argv in config_steps(plan, variables):
        done = c.run(in_tree(plan.tree, argv), env=env, hide=True, warn=True, in_stream=False)
        if not done.ok:
            problem = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.exited}").splitlines()[-1]
            raise Failure(f"kconfig: {shlex.join(argv[:2])} failed: {problem}", FAILED)
    config = c.run(shlex.join(["cat", f"{plan.tree}/.config"]), hide=True, in_stream=False).stdout
    for name, text in fragments:
        if name in kconfig.CHECKED:
            kconfig.warn_dropped(kconfig.CHECKED[name], text, config)


def _put(c: Context, text: str, path: str) -> None:
    c.run(f"cat > {shlex.quote(path)}", in_stream=_Text(text), hide=True)


class _Text:
    """A readable stream for `c.run(in_stream=...)`, which feeds the command's stdin."""

    def __init__(self, text: str) -> None:
        self._chunks: Iterator[str] = iter([text])

    def read(self, size: int = -1) -> str:
        return next(self._chunks, "")


class BuildProgress:
    """Echo make's output and, every `every` compiled objects, a running count."""

    def __init__(self, out: TextIO = sys.stdout, every: int = 250) -> None:
        self.out, self.every, self.objects, self._partial = out, every, 0, ""

    def write(self, data: str) -> int:
        self.out.write(data)
        lines = (self._partial + data).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.lstrip().startswith(("CC ", "CC [M] ", "AS ", "LD [M] ")):
                self.objects += 1
                if self.objects % self.every == 0:
                    self.out.write(f"vngtasks: build: {self.objects} objects built\n")
        return len(data)

    def flush(self) -> None:
        self.out.flush()


@contextlib.contextmanager
def group(title: str) -> Iterator[None]:
    """A foldable group in GitHub Actions' log; a plain heading elsewhere."""
    in_actions = os.environ.get("GITHUB_ACTIONS") == "true"
    print(f"::group::{title}" if in_actions else f"vngtasks: {title}", flush=True)
    try:
        yield
    finally:
        if in_actions:
            print("::endgroup::", flush=True)


def compile_kernel(c: Context, plan: Plan, vng: str, env: dict[str, str]) -> None:
    argv = vng_argv(plan, vng)
    title = f"build {plan.settings.name} {plan.sha12} ({plan.settings.arch.name}, {plan.jobs} jobs)"
    with group(title):
        configure(c, plan, make_variables(argv), env)
        c.run(in_tree(plan.tree, argv), env=env, in_stream=False, out_stream=BuildProgress())


def make_variables(argv: list[str]) -> list[str]:
    """The NAME=value arguments vng passes on to make."""
    return [arg for arg in argv[1:] if not arg.startswith("-") and "=" in arg]


def write_vmlinux_h(c: Context, tree: str) -> bool:
    """vmlinux.h from the kernel's BTF with the distro's bpftool; False (and a warning) without BTF."""
    config = c.run(f"cat {shlex.quote(tree)}/.config", hide=True, in_stream=False).stdout
    if "CONFIG_DEBUG_INFO_BTF=y" not in config.splitlines():
        log.warn("vmlinux-h: the kernel has no BTF (CONFIG_DEBUG_INFO_BTF unset: pahole missing or too old?)")
        return False
    done = c.run(vmlinux_h_command(tree), warn=True, hide=True, in_stream=False)
    if not done.ok:
        log.warn(f"vmlinux-h: bpftool failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done.ok


def vmlinux_h_command(tree: str) -> str:
    """vmlinux.h from the tree's vmlinux, written whole or not at all (the distro's bpftool)."""
    bpftool = "$(command -v bpftool || echo /usr/sbin/bpftool)"
    quoted = shlex.quote(tree)
    return (
        f"{bpftool} btf dump file {quoted}/vmlinux format c > {quoted}/vmlinux.h.partial"
        f" && mv {quoted}/vmlinux.h.partial {quoted}/vmlinux.h"
    )


def planned_commands(plan: Plan, vng: str) -> list[str]:
    """What building `plan` runs, one line each, for a dry run (the fallbacks a real build may take,
    such as fetching the commit itself when the tag moved, are left out)."""
    s = plan.settings
    argv = vng_argv(plan, vng)
    lines = [
        shlex.join(git_init_argv(plan.tree)),
        shlex.join(fetch_argv(plan.tree, s.kernel_url, fetch_wants(s.tag, plan.sha)[0])),
        shlex.join(checkout_argv(plan.tree, plan.sha)),
        *(in_tree(plan.tree, step) for step in config_steps(plan, make_variables(argv))),
        in_tree(plan.tree, argv),
    ]
    return [*lines, vmlinux_h_command(plan.tree)] if s.vmlinux_h else lines


def kept_paths(c: Context, tree: str, arch: Arch) -> list[str]:
    """Tree-relative paths a cache entry keeps: what vng boots from and what users read."""
    wanted = [*KEPT_FILES, *arch.boot_images]
    listing = c.run(
        f"cd {shlex.quote(tree)} && ls -d {shlex.join(wanted)} 2>/dev/null;"
        " find . -path ./.virtme_mods -prune -o -name '*.ko' -type f -printf '%P\\n'",
        hide=True,
        warn=True,
        in_stream=False,
    )
    return sorted(set(listing.stdout.split()))


def copy_tree_files(c: Context, tree: str, paths: list[str], dest: Path) -> None:
    """Copy `paths` of `tree` into the local directory `dest`, keeping their layout."""
    c.run(
        f"tar -C {shlex.quote(tree)} -cf - --files-from=- | tar -C {shlex.quote(str(dest))} -xf -",
        in_stream=_Text("\n".join(paths) + "\n"),
        hide=True,
    )


def ccache_stats(c: Context, env: dict[str, str]) -> dict[str, int]:
    done = c.run("ccache --print-stats", env=env, hide=True, warn=True, in_stream=False)
    stats = dict(line.split("\t", 1) for line in done.stdout.splitlines() if "\t" in line)
    hits = sum(int(stats.get(k, 0)) for k in ("direct_cache_hit", "preprocessed_cache_hit"))
    return {"hits": hits, "misses": int(stats.get("cache_miss", 0))}


def config_hash(c: Context, tree: str) -> str:
    config = c.run(f"cat {shlex.quote(tree)}/.config", hide=True, in_stream=False).stdout
    return hashlib.sha256(config.encode()).hexdigest()


def reproducer(settings: Settings, sha: str) -> str:
    argv = ["invoke", "build", "--kernel-url", settings.kernel_url, "--tag", sha, "--name", settings.name]
    argv += ["--arch", settings.arch.name, "--version", settings.version]
    if settings.kconfig_base != "vng":
        argv += ["--kconfig-base", str(settings.kconfig_base)]
    for flag, value in (("--cc", settings.cc), ("--llvm", settings.llvm), ("--kconfig", settings.kconfig)):
        if value:
            argv += [flag, str(value)]
    return shlex.join(argv)


def local_plan(settings: Settings, sha: str) -> Plan:
    """A build on this machine: a work tree per name and arch, reused (incremental, ccache-warm)."""
    work = settings.cache_dir / "work" / f"{settings.name}-{settings.arch.name}"
    return Plan(
        settings=settings,
        sha=sha,
        tree=str(work / "linux"),
        host_arch=arches.host(),
        jobs=os.cpu_count() or 1,
        tools_dir=str(work / "tools"),
    )


def dry_run(settings: Settings, resolved: Resolved) -> tuple[Path, list[str]]:
    """The cache entry of the resolved commit (there now, or where a build would put it) and, on a miss,
    the commands that build it: found without making, locking or writing anything."""
    kernels = cache.KernelCache(cache.kernels_root(settings))
    key = cache.key_for(settings, resolved.sha12)
    if kernels.lookup(key) is not None:
        return kernels.root / key, [f"# cache hit {key}: nothing to build"]
    if settings.build_host:
        return kernels.root / key, [f"# cache miss {key}: built on {settings.build_host} over SSH, then kept here"]
    plan = local_plan(settings, resolved.sha)
    files = ["cc", *(name for name, _ in kconfig.fragments(settings))]
    written = ", ".join(f"{plan.tools_dir}/{name}" for name in files)
    return kernels.root / key, [
        f"# cache miss {key}: built in {plan.tree}, with {written} written first",
        *planned_commands(plan, vm.vng_program()),
    ]


def ensure_kernel(c: Context, settings: Settings, resolved: Resolved) -> cache.Entry:
    """The cache entry of the resolved commit: found, or built once (others wait on the lock)."""
    make_directory("cache_dir", settings.cache_dir)
    kernels = cache.KernelCache(cache.kernels_root(settings))
    key = cache.key_for(settings, resolved.sha12)
    with kernels.lock(key):
        entry = kernels.lookup(key)
        if entry is not None:
            log.info(f"cache: hit {key}")
            return entry
        if resolved.source == "stale":
            raise Failure(f"cache: {key} vanished while the remote is unreachable", FAILED)
        log.info(f"cache: miss {key}: building")
        if settings.build_host:
            from . import remote  # remote builds reuse this module's steps

            return remote.build_entry(c, settings, kernels, key, resolved)
        # One work tree per name and arch: builds of other keys that share it take turns.
        with kernels.lock(f"work-{settings.name}-{settings.arch.name}"):
            return build_entry(c, local_plan(settings, resolved.sha), kernels, key, resolved)


def build_entry(c: Context, plan: Plan, kernels: cache.KernelCache, key: str, resolved: Resolved) -> cache.Entry:
    s = plan.settings
    started = time.monotonic()
    with group(f"fetch {s.tag} ({plan.sha12}) from {s.kernel_url}"):
        fetch(c, s.kernel_url, s.tag, plan.sha, plan.tree)
    write_tools(c, plan)
    env = {**build_env(plan, str(Path.home())), "PATH": vm.child_environment(os.environ)["PATH"]}
    compiled = compile_measured(c, plan, vm.vng_program(), env)
    has_header = write_vmlinux_h(c, plan.tree) if s.vmlinux_h else False
    metadata = {
        **describe(c, plan, resolved, compiled, has_header),
        "built_on": "localhost",
        "build_seconds": round(time.monotonic() - started, 1),
    }
    with kernels.create(key, metadata) as temp:
        copy_tree_files(c, plan.tree, kept_paths(c, plan.tree, s.arch), temp)
        prepare_modules(temp)
    entry = kernels.lookup(key)
    if entry is None:
        raise Failure(f"cache: {key} missing right after it was stored", FAILED)
    log.info(f"build: {key} stored ({cache.human_size(entry.size_bytes)}) in {metadata['build_seconds']} s")
    return entry


@dataclass(frozen=True)
class Compiled:
    seconds: float
    ccache: dict[str, int] | None  # hits and misses of this build; None without ccache


def compile_measured(c: Context, plan: Plan, vng: str, env: dict[str, str]) -> Compiled:
    """compile_kernel, timed, with the ccache hits and misses it caused."""
    before = ccache_stats(c, env)
    started = time.monotonic()
    compile_kernel(c, plan, vng, env)
    seconds = time.monotonic() - started
    after = ccache_stats(c, env)
    delta = {k: after[k] - before[k] for k in after} if plan.settings.kernel_compile_cache else None
    return Compiled(seconds, delta)


def describe(c: Context, plan: Plan, resolved: Resolved, compiled: Compiled, has_header: bool) -> dict[str, object]:
    """The metadata.json of a build, from its tree on the build host (which adds where and how long)."""
    s = plan.settings
    release = c.run(f"cat {shlex.quote(plan.tree)}/include/config/kernel.release", hide=True, in_stream=False)
    return {
        "name": s.name,
        "arch": s.arch.name,
        "url": s.kernel_url,
        "tag": s.tag,
        "ref": resolved.ref,
        "sha": plan.sha,
        "version": s.version,
        "kconfig_base": str(s.kconfig_base),
        "kernel_release": release.stdout.strip(),
        "toolchain": toolchain(c, plan),
        "config_sha256": config_hash(c, plan.tree),
        "vmlinux_h": has_header,
        "compile_seconds": round(compiled.seconds, 1),
        "ccache": compiled.ccache,
        "reproducer": reproducer(s, plan.sha),
    }


def toolchain(c: Context, plan: Plan) -> str:
    done = c.run(f"{shlex.quote(plan.compiler)} --version", hide=True, warn=True, in_stream=False)
    return (done.stdout.splitlines() or [plan.compiler])[0]


def prepare_modules(entry_dir: Path) -> None:
    """vng's module directory, made now with real files, so booting never writes into the cache."""
    if not (entry_dir / "modules.order").exists():
        return
    script = Path(sys.executable).parent / "virtme-prep-kdir-mods"
    subprocess.run([str(script)], cwd=entry_dir, check=True, capture_output=True)
    for link in (entry_dir / ".virtme_mods").rglob("*"):
        if link.is_symlink():
            target = link.resolve()
            link.unlink()
            if target.is_file():
                shutil.copy2(target, link)
