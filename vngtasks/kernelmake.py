"""Making the kernel in a fetched work tree: its .config, `vng --build`, and vmlinux.h.

The .config is made afresh every build from the base and the fragments (see kconfig.py, which
decides what they are; the steps here write them beside the tree and run the kernel's own
tools). A reused tree first loses the outputs a build makes only on some configs, so an earlier
build's never pass for this one's in the entry (`forget_outputs_command`). Make runs through vng
with the plan's toolchain, its output echoed with a running object count, timed, with the ccache
hits and misses it caused. Every step takes the Context to run on.
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from invoke import Context, Result

from . import distcc, kconfig, log, remotecache, render
from .buildsteps import BUILD_TIMESTAMP, Plan, group, in_tree, put
from .errors import FAILED, Failure

# What an entry keeps that a build makes only on some configs: vmlinux.h with vmlinux-h and BTF, vmlinux.zst
# with debug info, the module lists with CONFIG_MODULES. The modules themselves stay (make relinks only what
# changed): an entry keeps only those the fresh modules.order names (buildsteps.kept_paths).
MADE_ON_SOME_CONFIGS = ("vmlinux.h", "vmlinux.h.partial", "vmlinux.zst", "modules.order", "Module.symvers")
DEBUG_INFO = "vmlinux.zst"  # vmlinux, compressed, when the kernel has debug info: crash reports symbolize with it


def vng_argv(plan: Plan, vng: str) -> list[str]:
    s = plan.settings
    cc = str(Path(plan.tools_dir) / "cc") if s.kernel_compile_cache else s.cc
    hostcc = str(Path(plan.tools_dir) / "hostcc") if s.kernel_compile_cache else ""
    return render.argv(
        "vng-build.argv.j2",
        hostcc=hostcc,
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


def make_variables(argv: list[str]) -> list[str]:
    """The NAME=value arguments vng passes on to make."""
    return [arg for arg in argv[1:] if not arg.startswith("-") and "=" in arg]


def config_steps(plan: Plan, variables: list[str]) -> list[list[str]]:
    """The commands that make the tree's .config, in the tree: the base, then the fragments merged."""
    s = plan.settings
    context = {"arch": s.arch, "host_arch": plan.host_arch, "llvm": s.llvm, "variables": variables}
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
        put(c, text, f"{plan.tools_dir}/{name}")
    log.info(f"kconfig: base {s.kconfig_base}" + "".join(f" + {name}" for name, _ in fragments))
    for argv in config_steps(plan, variables):
        done = c.run(in_tree(plan.tree, argv), env=env, hide=True, warn=True, in_stream=False)
        if not done.ok:
            raise Failure(f"kconfig: {shlex.join(argv[:2])} failed: {first_error(done)}", FAILED)
    config = c.run(shlex.join(["cat", f"{plan.tree}/.config"]), hide=True, in_stream=False).stdout
    for name, text in fragments:
        if name in kconfig.CHECKED:
            kconfig.warn_dropped(kconfig.CHECKED[name], text, config)


# make's own lines about a failure, which follow its cause: "make[2]: *** [Makefile:12: x] Error 1", ...
_MAKE_SAYS = re.compile(r"^make(\[\d+\])?: (\*\*\*|Entering|Leaving|Nothing)")


def first_error(done: Result) -> str:
    """What a failed make printed first on stderr (the cause, as "Sorry, this assembler is not supported."),
    not make's own lines after it; else its last line of output, else its status."""
    said = [line.strip() for line in done.stderr.splitlines() if line.strip() and not _MAKE_SAYS.match(line)]
    if said:
        return said[0]
    return (done.stderr.strip() or done.stdout.strip() or f"exit status {done.exited}").splitlines()[-1]


class BuildProgress:
    """Echo make's output and, every `every` compiled objects, a running count. For one of builds at once (a log.labeled
    block where it is made: invoke writes from a thread of its own), whole lines only, each labeled."""

    def __init__(self, out: TextIO = sys.stdout, every: int = 250) -> None:
        self.out, self.every, self.objects, self._partial = out, every, 0, ""
        self.label = log.label()

    def write(self, data: str) -> int:
        if not self.label:
            self.out.write(data)
        lines = (self._partial + data).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if self.label:
                self.out.write(f"{self.label}{line}\n")
            if line.lstrip().startswith(("CC ", "CC [M] ", "AS ", "LD [M] ")):
                self.objects += 1
                if self.objects % self.every == 0:
                    self.out.write(f"{self.label}vngtasks: build: {self.objects} objects built\n")
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def compile_kernel(c: Context, plan: Plan, vng: str, env: dict[str, str]) -> None:
    argv = vng_argv(plan, vng)
    title = f"build {plan.settings.name} {plan.sha12} ({plan.settings.arch.name}, {plan.jobs} jobs)"
    with group(title):
        configure(c, plan, make_variables(argv), env)
        c.run(forget_outputs_command(plan.tree), hide=True, in_stream=False)
        c.run(in_tree(plan.tree, argv), env=env, in_stream=False, out_stream=BuildProgress())


def forget_outputs_command(tree: str) -> str:
    """Remove from a reused tree what an entry keeps that this build may not make again."""
    return in_tree(tree, ["rm", "-f", *MADE_ON_SOME_CONFIGS])


@dataclass(frozen=True)
class Compiled:
    seconds: float
    ccache: dict[str, int] | None  # hits and misses of this build; None without ccache
    distcc: distcc.Outcome | None = None  # with distcc-hosts


def compile_measured(c: Context, plan: Plan, vng: str, env: dict[str, str]) -> Compiled:
    """compile_kernel, timed, with the ccache hits and misses it caused."""
    cached = plan.settings.kernel_compile_cache
    if cached:
        forget_ccache_counts(c, env)
    started = time.monotonic()
    compile_kernel(c, plan, vng, env)
    seconds = time.monotonic() - started
    helpers = plan.settings.distcc_hosts
    counts = ccache_counts(c, env) if cached else None
    return Compiled(seconds, counts, distcc_outcome(c, env, helpers) if helpers else None)


def distcc_outcome(c: Context, env: dict[str, str], helpers: tuple[distcc.Helper, ...]) -> distcc.Outcome:
    """What the build's distcc log says, read where it was written (each answer bounded)."""
    answers = {}
    for name, argv in distcc.outcome_commands(env["DISTCC_LOG"]).items():
        answers[name] = c.run(shlex.join(argv), hide=True, warn=True, in_stream=False).stdout[: distcc.ANSWER_BYTES]
    return distcc.outcome(answers, helpers)


def forget_ccache_counts(c: Context, env: dict[str, str]) -> None:
    """Start the build's ccache stats log (CCACHE_STATSLOG) empty."""
    c.run(shlex.join(["rm", "-f", env["CCACHE_STATSLOG"]]), hide=True, in_stream=False)


# ccache's counters (one per line of a stats log, several per compilation) that a build's counts add up.
CCACHE_COUNTERS = {
    "hits": ("direct_cache_hit", "preprocessed_cache_hit"),
    "misses": ("cache_miss",),
    "local_hits": ("local_storage_hit",),
    "remote_hits": ("remote_storage_hit",),
    "remote_errors": ("remote_storage_error", "remote_storage_timeout"),
}
_MAX_STATS = 1 << 20  # bytes of `uniq -c` output read back (a few hundred in practice)


def ccache_counts(c: Context, env: dict[str, str]) -> dict[str, int]:
    """This build's counts (CCACHE_COUNTERS) from its stats log since forget_ccache_counts: of its compilations
    only, while other builds share the ccache directory (ccache's --print-stats counts the directory's). Zeros
    when there is no log."""
    done = c.run(f"sort -- {shlex.quote(env['CCACHE_STATSLOG'])} | uniq -c", hide=True, warn=True, in_stream=False)
    return count_stats(done.stdout[:_MAX_STATS] if done.ok else "")


def count_stats(uniq_counted: str) -> dict[str, int]:
    """CCACHE_COUNTERS from `uniq -c` lines (`   COUNT NAME`); a line that is not one is left out."""
    seen: dict[str, int] = {}
    for line in uniq_counted.splitlines():
        number, _, name = line.strip().partition(" ")
        if number.isascii() and number.isdigit() and len(number) < 12:
            seen[name] = seen.get(name, 0) + int(number)
    return {key: sum(seen.get(name, 0) for name in names) for key, names in CCACHE_COUNTERS.items()}


def warn_remote_errors(compiled: Compiled, remote: str) -> None:
    """One warning when compilations could not reach ccache-remote (ccache then compiled or hit locally)."""
    counts = compiled.ccache or {}
    if remote and counts.get("remote_errors"):
        compilations = counts.get("hits", 0) + counts.get("misses", 0)
        log.warn(f"ccache-remote: {remotecache.shown(remote)} failed {counts['remote_errors']} times in "
                 f"{compilations} compilations; the build went on with the local ccache")  # fmt: skip


def keep_debug_info(c: Context, tree: str) -> bool:
    """vmlinux compressed into DEBUG_INFO when the kernel has DWARF (CONFIG_DEBUG_INFO), for the entry to keep;
    False without (a warning when zstd fails)."""
    config = c.run(f"cat {shlex.quote(tree)}/.config", hide=True, in_stream=False).stdout
    if "CONFIG_DEBUG_INFO=y" not in config.splitlines():
        return False
    argv = ["zstd", "-q", "-f", "-T0", "-3", "vmlinux", "-o", DEBUG_INFO]
    done = c.run(in_tree(tree, argv), warn=True, hide=True, in_stream=False)
    if not done.ok:
        log.warn(f"debug info: zstd failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return done.ok


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
