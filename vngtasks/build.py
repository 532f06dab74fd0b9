"""The one build sequence: a kernel from git to a cache entry, wherever it runs.

`build_entry` takes a `Site`: the Context the steps run on (invoke's own here, a Fabric
Connection on a build host: a Connection is a Context) and the few things that differ there —
the machine (home, cores, vng, ccache), how the commit reaches the work tree, how the kept files
come home into the cache entry, and how a failure is named. `here` is this machine's site;
buildhost.py makes the build host's. The steps are buildsteps.py's and kernelmake.py's; the
entry's metadata is made here, from the tree where it was built.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from invoke import Context

from . import arches, buildsteps, cache, distcc, files, kconfig, kernelmake, log, remotecache, vm
from .buildsteps import Machine, Plan
from .errors import FAILED, Failure
from .resolve import Resolved
from .settings import Settings

HERE = "localhost"  # `built_on` of a build on this machine


def _unnamed(stage: str) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Site:
    """Where one build runs, and the few things that differ there."""

    c: Context  # runs every step: invoke's Context here, the build host's Connection there
    machine: Machine
    built_on: str  # "localhost", or the build host's HOST:PORT
    source: str  # where the fetch heading says the commit comes: "from URL" here, "on HOST:PORT" there
    bring_source: Callable[[Plan], int | None]  # commit into the tree; bytes pushed (None: nothing is)
    bring_home: Callable[[Plan, list[str], Path], int | None]  # kept files into the entry; bytes received
    metadata: dict[str, object] = field(default_factory=dict)  # what else the entry's metadata says of the site
    stage: Callable[[str], AbstractContextManager[None]] = _unnamed  # names what fails inside (build host)


def build_entry(
    site: Site, plan: Plan, kernels: cache.KernelCache, key: str, resolved: Resolved, started: float
) -> cache.Entry:
    """Build `plan` at `site` and store the result as cache entry `key`."""
    s, c = plan.settings, site.c
    with buildsteps.group(f"fetch {s.tag} ({plan.sha12}) {site.source}"):
        pushed = site.bring_source(plan)
    with site.stage("prepare"):
        buildsteps.write_tools(c, plan)
        if s.distcc_hosts:
            distcc.warn_tcp(s.distcc_hosts)
            buildsteps.write_distcc_files(c, plan, site.machine.home)
    env = buildsteps.make_env(plan, site.machine)
    with site.stage("build"), buildsteps.ccache_config(c, plan, env):
        compiled = kernelmake.compile_measured(c, plan, site.machine.vng, env)
    kernelmake.warn_remote_errors(compiled, s.ccache_remote)
    if compiled.distcc:
        distcc.warn_failures(compiled.distcc, (compiled.ccache or {}).get("misses", 0))
    with site.stage("vmlinux-h"):
        has_header = kernelmake.write_vmlinux_h(c, plan.tree) if s.vmlinux_h else False
    with site.stage("debug-info"):
        debug_info = kernelmake.keep_debug_info(c, plan.tree)
    with site.stage("collect"):
        paths = buildsteps.kept_paths(c, plan.tree, s.arch)
        metadata = {**describe(c, plan, resolved, compiled, has_header), "built_on": site.built_on, **site.metadata}
        metadata |= {"debug_info": kernelmake.DEBUG_INFO if debug_info else None, "tree": plan.tree}
        if pushed is not None:
            metadata["pushed_bytes"] = pushed
    with site.stage("download"):
        metadata["build_seconds"] = round(time.monotonic() - started, 1)
        with kernels.create(key, metadata) as temp:
            received = site.bring_home(plan, paths, temp)
            prepare_modules(temp)
    entry = kernels.lookup(key)
    if entry is None:
        raise Failure(f"cache: {key} missing right after it was stored", FAILED)
    where = "" if site.built_on == HERE else f" built on {site.built_on} and"
    size = files.human_size(entry.size_bytes) + ("" if received is None else f", {files.human_size(received)} received")
    log.info(f"build: {key}{where} stored ({size}) in {round(time.monotonic() - started, 1)} s")
    return entry


def this_machine() -> Machine:
    return Machine(
        home=str(Path.home()),
        arch=arches.host(),
        jobs=os.cpu_count() or 1,
        vng=vm.vng_program(),
        path=vm.child_environment(os.environ)["PATH"],
        ccache_dir=os.environ.get("CCACHE_DIR", ""),
    )


def local_plan(settings: Settings, sha: str, machine: Machine) -> Plan:
    """A build on this machine: a work tree per name and arch, reused (incremental, ccache-warm)."""
    work = settings.cache_dir / "work" / f"{settings.name}-{settings.arch.name}"
    return buildsteps.plan_on(settings, sha, machine, str(work))


def here(c: Context, settings: Settings, machine: Machine) -> Site:
    """This machine: the commit fetched from kernel-url into the work tree, the kept files copied."""

    def bring_source(plan: Plan) -> None:
        buildsteps.fetch(c, settings.kernel_url, settings.tag, plan.sha, plan.tree)

    def bring_home(plan: Plan, paths: list[str], dest: Path) -> None:
        buildsteps.copy_tree_files(c, plan.tree, paths, str(dest))

    return Site(c, machine, HERE, f"from {settings.kernel_url}", bring_source, bring_home)


def build_here(c: Context, settings: Settings, kernels: cache.KernelCache, key: str, resolved: Resolved) -> cache.Entry:
    """Build `resolved` on this machine and store it as cache entry `key`."""
    # One work tree per name and arch: builds of other keys that share it take turns.
    with kernels.lock(f"work-{settings.name}-{settings.arch.name}"):
        machine = this_machine()
        plan = local_plan(settings, resolved.sha, machine)
        return build_entry(here(c, settings, machine), plan, kernels, key, resolved, time.monotonic())


def describe(
    c: Context, plan: Plan, resolved: Resolved, compiled: kernelmake.Compiled, has_header: bool
) -> dict[str, object]:
    """The metadata.json of a build, from its tree where it was built (the site adds where and how long)."""
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
        "debug": list(s.debug),
        "kernel_release": release.stdout.strip(),
        "toolchain": toolchain(c, plan),
        "config_sha256": config_hash(c, plan.tree),
        "vmlinux_h": has_header,
        "compile_seconds": round(compiled.seconds, 1),
        "ccache": compiled.ccache,
        "distcc": {"compiled": compiled.distcc.compiled, "failed": compiled.distcc.failed} if compiled.distcc else None,
        "ccache_remote": remotecache.shown(s.ccache_remote) or None,
        "reproducer": reproducer(s, plan.sha),
    }


def toolchain(c: Context, plan: Plan) -> str:
    done = c.run(f"{shlex.quote(plan.compiler)} --version", hide=True, warn=True, in_stream=False)
    return (done.stdout.splitlines() or [plan.compiler])[0]


def config_hash(c: Context, tree: str) -> str:
    config = c.run(f"cat {shlex.quote(tree)}/.config", hide=True, in_stream=False).stdout
    return hashlib.sha256(config.encode()).hexdigest()


def reproducer(settings: Settings, sha: str) -> str:
    argv = ["invoke", "build", "--kernel-url", settings.kernel_url, "--tag", sha, "--name", settings.name]
    argv += ["--arch", settings.arch.name, "--version", settings.version]
    if settings.kconfig_base != "vng":
        argv += ["--kconfig-base", str(settings.kconfig_base)]
    debug = ",".join(settings.debug)
    for flag, value in (("--cc", settings.cc), ("--llvm", settings.llvm), ("--kconfig", settings.kconfig),
                        ("--debug", debug)):  # fmt: skip
        if value:
            argv += [flag, str(value)]
    return shlex.join(argv)


FAKE_RELEASE = "0.0.0"  # where vng looks for a build directory's modules: .virtme_mods/lib/modules/0.0.0
MODULE_LISTS = ("modules.order", "modules.builtin", "modules.builtin.modinfo")


def prepare_modules(entry_dir: Path) -> None:
    """vng's module directory, as virtme-prep-kdir-mods makes it, but from the entry's own files only and with
    real files (booting never writes into the cache): the `.ko` files modules.order names, hard-linked under
    .virtme_mods/lib/modules/0.0.0/kernel/, the module lists beside them, then depmod's index. A build host
    sends modules.order: a line naming anything but a regular module file inside the entry fails the build."""
    text = files.read_modules_order(entry_dir)
    if text is None:
        return
    if refused := files.refused_module_lines(text):
        raise Failure(f"modules.order: {refused[0]!r} is not a module of the tree", FAILED)
    moddir = entry_dir / ".virtme_mods" / "lib" / "modules" / FAKE_RELEASE
    for name in files.module_files(text):
        source = entry_dir / name
        if not source.exists() and name.startswith("kernel/"):  # before Linux 6.2: kernel/drivers/...
            name = name.removeprefix("kernel/")
            source = entry_dir / name
        if not regular_inside(source, entry_dir):
            raise Failure(f"modules.order: {name!r} is not a regular file of the entry", FAILED)
        (moddir / "kernel" / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(source, moddir / "kernel" / name)
    for name in MODULE_LISTS:
        if regular_inside(entry_dir / name, entry_dir):
            shutil.copy2(entry_dir / name, moddir / name)
    depmod = ["depmod", "-ae", "-F", str(entry_dir / "System.map"), "-b", str(entry_dir / ".virtme_mods"), FAKE_RELEASE]
    subprocess.run(
        depmod,
        check=True,
        capture_output=True,
        env={**os.environ, "PATH": f"{os.environ.get('PATH', '')}:/sbin:/usr/sbin"},
    )


def regular_inside(path: Path, top: Path) -> bool:
    """`path` is a regular file, reached from `top` through no link."""
    here = top
    for part in path.relative_to(top).parts:
        here = here / part
        if here.is_symlink():
            return False
    return path.is_file()


def dry_run_here(settings: Settings, sha: str, key: str) -> list[str]:
    """What building `key` here runs, one line each, after a line saying where and what it writes first
    (the fallbacks a real build may take, such as fetching the commit itself when the tag moved, are left out)."""
    machine = this_machine()
    plan = local_plan(settings, sha, machine)
    written = ", ".join(f"{plan.tools_dir}/{name}" for name in ["cc", *(n for n, _ in kconfig.fragments(settings))])
    argv = kernelmake.vng_argv(plan, machine.vng)
    want = buildsteps.fetch_wants(settings.tag, plan.sha)[0]
    configure = kernelmake.config_steps(plan, kernelmake.make_variables(argv))
    lines = [
        f"# cache miss {key}: built in {plan.tree}, with {written} written first",
        shlex.join(buildsteps.git_init_argv(plan.tree)),
        shlex.join(buildsteps.fetch_argv(plan.tree, settings.kernel_url, want)),
        shlex.join(buildsteps.checkout_argv(plan.tree, plan.sha)),
        *(buildsteps.in_tree(plan.tree, step) for step in configure),
        kernelmake.forget_outputs_command(plan.tree),
        buildsteps.in_tree(plan.tree, argv),
    ]
    return [*lines, kernelmake.vmlinux_h_command(plan.tree)] if settings.vmlinux_h else lines
