"""Booting a kernel with vng and running the workload inside, supervised from the host.

The guest script (templates/guest.sh.j2) marks two moments in a run directory that
the guest mounts read-write: "started" when the workload begins and "status" when
it ends. The host therefore knows, without parsing the console, whether the VM
booted, whether it is over its time, and what the workload returned; a VM that
ends without a "status" never reported (panic, stall, no boot).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import accel, arches, log, render
from .arches import Arch
from .errors import BAD_INPUT, MISSING_TOOL, NO_STATUS, TIMEOUT, Failure
from .settings import Settings

POLL_SECONDS = 0.1
# GitHub's step files: the workload may write them, so their folders are shared rw.
GITHUB_FILES = ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH", "GITHUB_STEP_SUMMARY")
# Not carried into the guest: they describe this shell, or bash refuses to set them.
_HOST_ONLY = frozenset(
    ["PWD", "OLDPWD", "SHLVL", "_", "BASHOPTS", "BASH_VERSINFO", "EUID", "PPID", "SHELLOPTS", "UID", "GROUPS"]
)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Host:
    """What this machine brings to a run, read once (tests pass their own)."""

    arch: Arch
    memory_mib: int
    vng: str
    environ: Mapping[str, str]

    @classmethod
    def current(cls) -> Host:
        return cls(arches.host(), host_memory_mib(), vng_program(), dict(os.environ))


@dataclass(frozen=True)
class Boot:
    """Everything one VM run needs, decided before anything starts."""

    settings: Settings
    kernel: Path
    accel: str
    run_dir: Path

    @property
    def guest_script(self) -> Path:
        return self.run_dir / "guest.sh"


def vng_program() -> str:
    """vng from this Python's environment first (a venv need not be activated)."""
    beside = Path(sys.executable).parent / "vng"
    return str(beside) if beside.exists() else "vng"


def host_memory_mib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def memory_mib(settings: Settings, accel_name: str, host_mib: int) -> int:
    if settings.memory_mib is not None:
        return settings.memory_mib
    default = host_mib * 9 // 10
    if accel_name == "tcg":
        return min(default, settings.arch.tcg_memory_cap_mib)
    return default


def qemu_options(settings: Settings, accel_name: str) -> list[str]:
    user = list(settings.qemu_opts)
    if accel_name != "kvm":
        user = _without_cpu_host(user)
    return render.argv("qemu.argv.j2", arch=settings.arch, accel=accel_name, user_opts=user)


def _without_cpu_host(opts: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for i, opt in enumerate(opts):
        if skip:
            skip = False
        elif opt in ("-cpu", "--cpu") and i + 1 < len(opts) and opts[i + 1].startswith("host"):
            log.info(f"qemu-opts: dropping '-cpu {opts[i + 1]}': it needs KVM")
            skip = True
        else:
            kept.append(opt)
    return kept


def shared_dirs(settings: Settings, run_dir: Path, environ: Mapping[str, str]) -> list[Path]:
    """Host directories the guest may write: workspace, extra-rwdirs, GitHub files, run dir."""
    wanted: list[Path] = [settings.workspace] if settings.workspace_rw else []
    for extra in settings.extra_rwdirs:
        if extra.is_dir():
            wanted.append(extra)
        else:
            log.info(f"extra-rwdirs: skipping {extra}: not a directory")
    wanted += [Path(environ[name]).parent for name in GITHUB_FILES if environ.get(name)]
    wanted.append(run_dir)
    return list(dict.fromkeys(path.resolve() for path in wanted))


def vng_argv(boot: Boot, host: Host) -> list[str]:
    s = boot.settings
    return render.argv(
        "vng-boot.argv.j2",
        vng=host.vng,
        kernel=boot.kernel,
        arch=s.arch,
        host_arch=host.arch,
        accel=boot.accel,
        cpus=s.cpus,
        memory_mib=memory_mib(s, boot.accel, host.memory_mib),
        network=s.network,
        verbose=s.verbose,
        append=s.append,
        rwdirs=shared_dirs(s, boot.run_dir, host.environ),
        workdir=s.workspace,
        qemu_opts=qemu_options(s, boot.accel),
        guest_script=boot.guest_script,
    )


def guest_environment(environ: Mapping[str, str]) -> bytes:
    """The host environment as NUL-separated NAME=value pairs for the guest to export."""
    pairs = (
        f"{name}={value}"
        for name, value in environ.items()
        if _IDENTIFIER.fullmatch(name) and name not in _HOST_ONLY and "\0" not in value
    )
    return b"".join(pair.encode(errors="surrogateescape") + b"\0" for pair in pairs)


def prepare(boot: Boot, workload: str, environ: Mapping[str, str]) -> None:
    boot.run_dir.mkdir(parents=True)
    (boot.run_dir / "workload.sh").write_text(workload + "\n")
    (boot.run_dir / "environ").write_bytes(guest_environment(environ))
    boot.guest_script.write_text(render.text("guest.sh.j2", run_dir=boot.run_dir, workdir=boot.settings.workspace))


def new_run_dir(settings: Settings) -> Path:
    return settings.cache_dir / "runs" / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def run(settings: Settings, kernel: Path, workload: str) -> int:
    """Boot `kernel`, run `workload` with bash inside, return the exit status to report."""
    host = Host.current()
    if settings.arch != host.arch:
        raise Failure(
            f"arch: booting {settings.arch.name} on a {host.arch.name} host needs a root filesystem "
            f"of that arch, which vngtasks does not provide yet",
            BAD_INPUT,
        )
    accel.qemu_binary(settings.arch)
    choice = accel.choose(settings.accel, settings.arch, host.arch)
    if choice.why:
        log.warn(choice.why)
    boot = Boot(settings=settings, kernel=kernel, accel=choice.accel, run_dir=new_run_dir(settings))
    prepare(boot, workload, host.environ)
    argv = vng_argv(boot, host)
    try:
        return supervise(boot, argv, _child_environment(host.environ))
    finally:
        shutil.rmtree(boot.run_dir, ignore_errors=True)


def _child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    # vng starts virtme-run through PATH: make this environment's bin/ visible to it.
    bindir = str(Path(sys.executable).parent)
    return {**environ, "PATH": f"{bindir}{os.pathsep}{environ.get('PATH', os.defpath)}"}


def supervise(boot: Boot, argv: list[str], env: Mapping[str, str]) -> int:
    s = boot.settings
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    except FileNotFoundError:
        raise Failure(f"{argv[0]} not found: install virtme-ng (`invoke deps` does)", MISSING_TOOL) from None
    started_at = time.monotonic()
    workload_at: float | None = None
    try:
        while process.poll() is None:
            time.sleep(POLL_SECONDS)
            now = time.monotonic()
            if workload_at is None and (boot.run_dir / "started").exists():
                workload_at = now
                log.info(f"booted in {now - started_at:.1f} s ({boot.accel}); workload running")
            if workload_at is None and s.boot_timeout and now - started_at > s.boot_timeout:
                log.warn(f"boot-timeout: the guest did not start the workload within {s.boot_timeout} s")
                return NO_STATUS
            if workload_at is not None and s.run_timeout and now - workload_at > s.run_timeout:
                log.warn(f"run-timeout: the workload ran over {s.run_timeout} s; VM stopped")
                return TIMEOUT
        return reported_status(boot.run_dir, process.returncode)
    finally:
        stop_session(process)


def reported_status(run_dir: Path, vng_status: int) -> int:
    try:
        return int((run_dir / "status").read_text())
    except (FileNotFoundError, ValueError):
        log.warn(f"the VM ended without reporting a workload status (vng exit {vng_status})")
        return NO_STATUS


def stop_session(process: subprocess.Popen[bytes]) -> None:
    """End vng and everything it started (QEMU, virtiofsd), even ones that left its group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        members = list(session_members(process.pid))
        if not members:
            break
        for pid in members:
            _signal(pid, sig)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(session_members(process.pid)):
            process.poll()
            time.sleep(POLL_SECONDS)
    process.poll()


def session_members(sid: int) -> Iterable[int]:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command name: state, ppid, pgrp, session; zombies are already gone.
        if fields[0] != "Z" and int(fields[3]) == sid:
            yield int(stat.parent.name)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
