"""Booting a kernel with vng: its command line, the run directory, and the boot flow with its one TCG retry.

`run` decides everything before anything starts (the accelerator, how directories are shared,
which init the guest runs: a `Boot`), writes the run directory the guest reads (its workload,
its environment, templates/guest.sh.j2), starts vng under supervise.py, reads what the guest left
through health.py, and hands the attempt to runrecord.py for its final status. `dry_run_line`
prints the same command line without starting or writing anything.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import accel, arches, guestroot, health, log, reaper, render, vmcore
from .arches import Arch
from .errors import BAD_INPUT, Failure
from .hostprobe import HostProbes, virtme_ng_init_runs
from .reaper import Leftovers
from .report import results
from .runrecord import Attempt, Record, recorded
from .settings import Settings
from .supervise import Marks, Outcome, VmRun, supervise
from .validate import make_directory, plain_path

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
    cpus: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)

    @classmethod
    def current(cls) -> Host:
        return cls(arches.host(), host_memory_mib(), vng_program(), dict(os.environ))

    def divided(self, boots: int) -> Host:
        """This host as each of `boots` VMs at once sees it: its share of the CPUs (at least one) and of the memory,
        which the default cpus and memory are sized from."""
        return dataclasses.replace(self, cpus=max(1, self.cpus // boots), memory_mib=self.memory_mib // boots)


@dataclass(frozen=True)
class HostSide:
    """What the host's probes decided for this run's command line (hostprobe.py), and what they cost."""

    force_9p: bool
    native_init: bool
    probe_seconds: float


@dataclass(frozen=True)
class Boot:
    """Everything one VM run needs, decided before anything starts."""

    settings: Settings
    kernel: Path
    accel: str
    run_dir: Path
    force_9p: bool = False  # vng's virtiofsd cannot start here (see hostprobe.py)
    native_init: bool = True  # virtme-ng-init is built for the guest's arch (see hostprobe.py)
    root: Path | None = None  # a foreign arch's guest root (guestroot.py); None: the host's own

    @property
    def shared(self) -> Path:
        """The part of the run directory the guest may write (the rest is the host's alone)."""
        return self.run_dir / "shared"

    @property
    def guest_script(self) -> Path:
        return self.shared / "guest.sh"

    @property
    def init_path(self) -> Path | None:
        """A directory put first on the PATH of vng's own init (virtme-ng-init takes PATH from the kernel command
        line) holding stand-ins (write_init_stand_ins): `udevd` and `udevadm` that only name the virtio serial
        ports (templates/virtio-ports.sh.j2), so udev's coldplug of every device costs nothing (with a distro
        kernel under TCG, most of the boot) and the workload's stdout and stderr still come back apart, on a
        host without udev too; `systemd-tmpfiles` for the guest's own /run only. None: vng's init runs as it
        would (`udev` true, vng's shell init, a root of its own)."""
        if self.settings.udev or not self.native_init or self.root is not None:
            return None
        return self.run_dir / "init-bin"

    @property
    def console_log(self) -> Path:
        """This run's console, written by QEMU: judged, then published to log-dir (see runrecord.publish)."""
        return self.run_dir / "console.log"

    @property
    def qmp_socket(self) -> Path | None:
        """QEMU's QMP socket, with `vmcore` on-failure (vmcore.py); else None."""
        return self.run_dir / vmcore.QMP_SOCKET if self.settings.vmcore == vmcore.ON_FAILURE else None

    def leftovers(self) -> Leftovers:
        """What this boot leaves on the host until it is removed: its run directory, and in a foreign root the
        empty directories made for it (see guestroot.make_mountpoints)."""
        if self.root is None:
            return Leftovers(self.run_dir)
        runs = self.run_dir.parent.resolve()
        return Leftovers(self.run_dir, guestroot.run_mountpoints(self.root, self.shared.resolve(), runs))

    def supervised(self) -> VmRun:
        """What supervision needs of this boot: plain paths and seconds."""
        s = self.settings
        return VmRun(self.accel, self.shared, self.console_log, boot_timeout=s.boot_timeout, run_timeout=s.run_timeout,
                     qmp_socket=self.qmp_socket, dump_dir=s.log_dir if self.qmp_socket else None)  # fmt: skip


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


def qemu_options(settings: Settings, accel_name: str, console_log: Path, qmp_socket: Path | None = None) -> list[str]:
    """Our QEMU options, then the user's; `console_log` and `qmp_socket` are plain paths (settings.plain_path): no
    "," for QEMU."""
    user = list(settings.qemu_opts)
    if accel_name != "kvm":
        user = _without_cpu_host(user)
    return render.argv("qemu.argv.j2", arch=settings.arch, accel=accel_name, user_opts=user, console_log=console_log,
                       qmp_socket=qmp_socket)  # fmt: skip


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
    """Host directories the guest may write: workspace, extra-rwdirs, GitHub files, the run's shared dir;
    each as vng gets it, resolved, and checked plain after the resolve (a link may lead anywhere)."""
    wanted: list[tuple[str, Path]] = [("workspace", settings.workspace)] if settings.workspace_rw else []
    for extra in settings.extra_rwdirs:
        if extra.is_dir():
            wanted.append(("extra_rwdirs", extra))
        else:
            log.info(f"extra-rwdirs: skipping {extra}: not a directory")
    wanted += github_dirs(environ)
    wanted.append(("cache_dir", run_dir))
    return list(dict.fromkeys(plain_path(name, path.resolve()) for name, path in wanted))


# Where virtme-ng's init (virtme-ng-init, and its shell init) mounts a tmpfs of its own in the guest: what the host
# has there is hidden.
COVERED_IN_GUEST = tuple(
    Path(p) for p in ("/var/tmp", "/var/log", "/var/cache", "/var/lib/apt", "/var/spool/rsyslog", "/var/lib/portables",
                      "/var/lib/machines", "/var/lib/private", "/var/lib/snapd/cookie", "/run", "/dev/shm")
)  # fmt: skip


def visible_dirs(boot: Boot) -> list[Path]:
    """Host directories shared read-only: a workspace the guest may not write, when the guest would not see it
    otherwise: a guest of its own root (the host's, which a host-arch guest sees whole, is not there), or a
    workspace under a directory virtme-ng's init covers (then writes there fail, as the share is read-only,
    instead of landing in the throwaway overlay the rest of the host's root has)."""
    workspace = plain_path("workspace", boot.settings.workspace.resolve())
    if boot.settings.workspace_rw or (boot.root is None and not covered_in_guest(workspace)):
        return []
    return [workspace]


def covered_in_guest(path: Path) -> bool:
    return any(path == covered or covered in path.parents for covered in COVERED_IN_GUEST)


def github_dirs(environ: Mapping[str, str]) -> list[tuple[str, Path]]:
    """(variable, its file's directory) for each of GitHub's step files set: resolved, plain, as vng shares them."""
    found = [(name, Path(environ[name]).parent.resolve()) for name in GITHUB_FILES if environ.get(name)]
    return [(name, plain_path(name, path)) for name, path in found]


def vng_argv(boot: Boot, host: Host) -> list[str]:
    s = boot.settings
    return render.argv(
        "vng-boot.argv.j2",
        vng=host.vng,
        kernel=boot.kernel,
        arch=s.arch,
        host_arch=host.arch,
        accel=boot.accel,
        cpus=host.cpus if s.cpus is None else s.cpus,
        memory_mib=memory_mib(s, boot.accel, host.memory_mib),
        network=s.network,
        verbose=s.verbose,
        append=s.append,
        rwdirs=shared_dirs(s, boot.shared, host.environ),
        rodirs=visible_dirs(boot),
        workdir=s.workspace,
        qemu_opts=qemu_options(s, boot.accel, boot.console_log, boot.qmp_socket),
        panic_waits=boot.qmp_socket is not None,
        kunit=s.results == results.KUNIT,
        guest_script=boot.guest_script,
        force_9p=boot.force_9p,
        native_init=boot.native_init,
        root=boot.root,
        init_path=boot.init_path,
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
    """The run directory, the host's user's alone (0700): the environment in it may hold secrets."""
    boot.run_dir.parent.mkdir(parents=True, exist_ok=True)
    boot.run_dir.mkdir(mode=0o700)
    boot.shared.mkdir(mode=0o700)
    (boot.shared / "workload.sh").write_bytes(workload.encode(errors="surrogateescape") + b"\n")  # bytes as given
    if boot.init_path is not None:  # the host's root is the guest's: the guest finds it at the same path
        write_init_stand_ins(boot.init_path)
    (boot.shared / "environ").write_bytes(guest_environment(environ))
    boot.guest_script.write_text(render.text("guest.sh.j2", run_dir=boot.shared, workdir=boot.settings.workspace))
    if boot.root is not None:
        guestroot.make_mountpoints(boot.root, [*shared_dirs(boot.settings, boot.shared, environ), *visible_dirs(boot)])


def runs_dir(settings: Settings) -> Path:
    return settings.cache_dir / reaper.RUNS


def write_init_stand_ins(init_path: Path) -> None:
    """What vng's init finds first on its PATH (see Boot.init_path): `udevd` and `udevadm` that only name the
    virtio serial ports, and `systemd-tmpfiles` for /run alone (where the host has it)."""
    init_path.mkdir()
    busybox = shutil.which("busybox")  # static: quick to start under TCG (vng needs busybox-static)
    shell = f"{busybox} sh" if busybox else "/bin/sh"
    stand_ins = {name: render.text("virtio-ports.sh.j2", shell=shell) for name in ("udevd", "udevadm")}
    if tmpfiles := shutil.which("systemd-tmpfiles"):
        stand_ins["systemd-tmpfiles"] = render.text("systemd-tmpfiles.sh.j2", shell=shell, tmpfiles=tmpfiles)
    for name, text in stand_ins.items():
        (init_path / name).write_text(text)
        (init_path / name).chmod(0o755)


def new_run_dir(settings: Settings) -> Path:
    return runs_dir(settings) / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def run(settings: Settings, kernel: Path, workload: str) -> int:
    """Boot `kernel`, run `workload` with bash inside, return the exit status to report."""
    return run_recorded(settings, kernel, workload).status


def run_recorded(settings: Settings, kernel: Path, workload: str, host: Host | None = None) -> Record:
    """Boot `kernel`, run `workload` with bash inside: the run as reported (its status, its test results). `host`:
    this machine as the VM may take it (a matrix's share, see Host.divided); None: all of it."""
    host = host or Host.current()
    if settings.arch != host.arch and (why := guestroot.refused(settings.arch)):
        raise Failure(why, BAD_INPUT)
    github_dirs(host.environ)  # refused now, before anything is made, if vng could not share them
    known = results.expected(settings)  # a bad known-failures or baseline file too
    if settings.vmcore == vmcore.ON_FAILURE and not vmcore.socket_fits(new_run_dir(settings) / vmcore.QMP_SOCKET):
        raise Failure(f"cache-dir: too long a path for QEMU's QMP socket under it (vmcore needs a unix socket path of "
                      f"at most {vmcore.SOCKET_PATH_BYTES} bytes): use a shorter one", BAD_INPUT)  # fmt: skip
    accel.qemu_binary(settings.arch)
    make_directory("log_dir", settings.log_dir)
    make_directory("cache_dir", settings.cache_dir)
    reaper.sweep(runs_dir(settings))
    root = guest_root(settings, host)
    probing = time.monotonic()
    probes = HostProbes(settings.cache_dir)
    choice = accel.choose(settings.accel, settings.arch, host.arch, problem_of=probes.kvm_problem)
    host_side = decide_host_side(probes, host, settings.arch, probing)
    if choice.why:
        log.warn(choice.why)
    if not host_side.native_init:
        log.info(f"virtme-ng-init is not built for {settings.arch.name}: the guest uses vng's shell init instead")
    attempted = attempt(settings, kernel, workload, host, choice.accel, host_side, root)
    if attempted.outcome.kvm_error:  # this host's later boots go to TCG at once
        probes.kvm_failed(settings.arch, attempted.outcome.kvm_error)
    if retry_with_tcg(settings.accel, choice.accel, attempted.outcome):
        log.warn(f"{attempted.outcome.result} under KVM picked by accel=auto: retrying once with TCG")
        if attempted.outcome.vmcore is not None:  # that attempt's dump is not this run's
            attempted.outcome.vmcore.unlink(missing_ok=True)
        retried = dataclasses.replace(host_side, probe_seconds=0.0)
        attempted = attempt(settings, kernel, workload, host, "tcg", retried, root)
    return recorded(settings, kernel, attempted, host.environ, known)


def dry_run_line(settings: Settings, kernel: Path) -> str:
    """The vng command line `run` would start, decided as `run` decides it but without probing, making
    or writing anything (the KVM answer kept for this host boot, else whether /dev/kvm opens)."""
    host = Host.current()
    probes = HostProbes(settings.cache_dir, write=False)
    if f"kvm-{host.arch.name}" not in probes.answers and settings.accel == "auto":
        log.info("dry run: no KVM probe answer kept for this host boot: KVM assumed to work where /dev/kvm opens")
    choice = accel.choose(settings.accel, settings.arch, host.arch, problem_of=probes.known_kvm_problem)
    host_side = decide_host_side(probes, host, settings.arch, time.monotonic())
    root = guestroot.current_root(settings.cache_dir, settings.arch) if settings.arch != host.arch else None
    if settings.arch != host.arch and root is None:
        log.info(f"dry run: no {settings.arch.name} guest root made yet (invoke deps --arch {settings.arch.name})")
        root = settings.cache_dir / guestroot.ROOTS / settings.arch.name
    return shlex.join(vng_argv(new_boot(settings, kernel, choice.accel, host_side, root), host))


def guest_root(settings: Settings, host: Host) -> Path | None:
    """The guest root of a foreign arch (made now if `invoke deps --arch` has not); None for the host's own."""
    if settings.arch == host.arch:
        return None
    return plain_path("cache_dir", guestroot.root_for_boot(settings.cache_dir, settings.arch))


def decide_host_side(probes: HostProbes, host: Host, guest: Arch, probing_since: float) -> HostSide:
    """How directories are shared and which init the guest runs, from the probes (see hostprobe.py)."""
    return HostSide(
        force_9p=probes.force_9p(child_environment(host.environ)["PATH"]),
        native_init=virtme_ng_init_runs(guest),
        probe_seconds=time.monotonic() - probing_since,
    )


def new_boot(settings: Settings, kernel: Path, accel_name: str, host_side: HostSide, root: Path | None) -> Boot:
    """A boot of `kernel` with a new run directory (named here, made by prepare)."""
    return Boot(
        settings=settings,
        kernel=kernel,
        accel=accel_name,
        run_dir=new_run_dir(settings),
        force_9p=host_side.force_9p,
        native_init=host_side.native_init,
        root=root,
    )


def retry_with_tcg(requested: str, used: str, outcome: Outcome) -> bool:
    """A KVM that auto chose but that never booted the guest (or stopped it) gets one TCG retry."""
    return requested == "auto" and used == "kvm" and outcome.result in ("boot-timeout", "kvm-error")


def attempt(
    settings: Settings,
    kernel: Path,
    workload: str,
    host: Host,
    accel_name: str,
    host_side: HostSide,
    root: Path | None,
) -> Attempt:
    boot = new_boot(settings, kernel, accel_name, host_side, root)
    marks = Marks(probe=host_side.probe_seconds)
    # The guard outlives this attempt's own cleanup: should invoke die anywhere in it, the guard cleans up.
    with reaper.held(boot.run_dir), reaper.Guard(boot.leftovers()) as guard:
        try:
            prepare(boot, workload, host.environ)
            argv = vng_argv(boot, host)
            stdout = bytearray() if settings.results == results.KTAP else None
            outcome = supervise(boot.supervised(), argv, child_environment(host.environ), marks, guard, stdout)
            report = health.read_guest_report(boot.shared)
            marks.guest_uptime = report.uptime
            marks.guest_init = health.init_started(report.dmesg or b"")
            phases = marks.phases() if outcome.result == "workload" else ()
            outcome = dataclasses.replace(outcome, release=report.release, phases=phases)
            console = health.read_console(boot.console_log)
            return Attempt(outcome, console, report.dmesg, None if stdout is None else bytes(stdout))
        finally:
            boot.leftovers().remove()


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    # vng starts virtme-run and virtme-configkernel through PATH: this environment's bin/ first.
    bindir = str(Path(sys.executable).parent)
    return {**environ, "PATH": f"{bindir}{os.pathsep}{environ.get('PATH', os.defpath)}"}
