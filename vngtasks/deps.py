"""Host packages for booting and building kernels, installed through an invoke Context.

Everything goes through `c.run`, so a Fabric `Connection` installs on a remote build
host with the same code. The fast path asks dpkg only: when every package is
there, no apt command runs at all.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from invoke import Context

from . import log
from .arches import Arch
from .errors import FAILED, Failure
from .settings import Settings

RETRY_DELAY_SECONDS = 5.0
KILL_AFTER_SECONDS = 10
TIMED_OUT = (124, 137)  # timeout(1): the limit passed, or the command needed SIGKILL after it

# What vng runs on the host to boot: busybox-static (the initramfs), kmod (a distro kernel's modules), file
# (a kernel image's version, and whether busybox is static: without it vng dies with a traceback).
BOOT_PACKAGES = ("busybox-static", "kmod", "cpio", "file")
BUILD_PACKAGES = (
    "build-essential", "flex", "bison", "bc", "cpio", "kmod", "rsync", "git", "python3",
    "libelf-dev", "libssl-dev", "libzstd-dev", "dwarves", "ccache", "zstd",
)  # fmt: skip

# Packages whose name depends on the distribution: (os-release ID, from VERSION_ID, role) -> names.
# A role missing for a distribution means it needs nothing for it.
DISTRO_PACKAGES: dict[tuple[str, int, str], tuple[str, ...]] = {
    ("debian", 0, "kernel-image"): ("linux-image-{dpkg_arch}",),
    ("ubuntu", 0, "kernel-image"): ("linux-image-generic",),
    ("debian", 0, "bpftool"): ("bpftool",),
    ("ubuntu", 0, "bpftool"): ("linux-tools-common", "linux-tools-generic"),
    # Older releases ship virtiofsd inside qemu-system-common.
    ("debian", 13, "virtiofsd"): ("virtiofsd",),
    ("ubuntu", 24, "virtiofsd"): ("virtiofsd",),
}

_APT_ERROR = re.compile(r"^E: (.*)$", re.MULTILINE)
# apt-get update's error for one index that did not download: the architecture is in its URL.
_FAILED_INDEX = re.compile(r"^Failed to fetch \S*/binary-([a-z0-9]+)/")
_INDEXES_IGNORED = "Some index files failed to download"
_APT_PACKAGE = re.compile(r"(?:Unable to locate package |Package '?)([A-Za-z0-9.+:=~_-]+)")
KVM_RULE = Path("/etc/udev/rules.d/99-vngtasks-kvm.rules")


@dataclass(frozen=True)
class Distro:
    id: str
    version: int

    @classmethod
    def of(cls, os_release: str) -> Distro:
        fields = dict(
            line.split("=", 1) for line in os_release.splitlines() if "=" in line and not line.startswith("#")
        )
        ids = [fields.get("ID", "").strip('"'), *fields.get("ID_LIKE", "").strip('"').split()]
        known = next((i for i in ids if any(key[0] == i for key in DISTRO_PACKAGES)), ids[0])
        version = fields.get("VERSION_ID", "0").strip('"').split(".")[0]
        return cls(known, int(version) if version.isdigit() else 0)

    def names(self, role: str, arch: Arch) -> tuple[str, ...]:
        rows = [
            (since, names)
            for (distro, since, row_role), names in DISTRO_PACKAGES.items()
            if distro == self.id and row_role == role and since <= self.version
        ]
        if not rows:
            return ()
        return tuple(name.format(dpkg_arch=arch.dpkg_arch) for name in max(rows)[1])


def wanted(settings: Settings, distro: Distro, host: Arch, need_kernel_image: bool) -> list[str]:
    """Every package the settings call for, in a stable order, each once."""
    arch = settings.arch
    names = [arch.qemu_package, *BOOT_PACKAGES, *distro.names("virtiofsd", arch)]
    names += [*BUILD_PACKAGES, *distro.names("bpftool", arch)]
    if arch != host:
        names.append("gcc-" + arch.cross_compile.rstrip("-"))
    if settings.llvm or settings.cc.startswith("clang"):
        suffix = settings.llvm if settings.llvm.startswith("-") else ""
        names += [f"clang{suffix}", f"lld{suffix}", f"llvm{suffix}"]
    if settings.distcc_hosts:  # the client; helpers over SSH are reached with the machine's own OpenSSH
        names += ["distcc", *(["openssh-client"] if any(h.kind == "ssh" for h in settings.distcc_hosts) else [])]
    if settings.udev:  # vng's init runs the host's udev in the guest only with it (else vngtasks' stand-ins)
        names.append("udev")
    if need_kernel_image:
        names += distro.names("kernel-image", host)
    names += settings.packages
    return list(dict.fromkeys(names))


def missing(c: Context, packages: list[str]) -> list[str]:
    """The packages dpkg does not list as installed."""
    result = c.run(
        "dpkg-query -W -f '${Package} ${db:Status-Abbrev}\\n' " + shlex.join(packages) + " 2>/dev/null",
        hide=True,
        warn=True,
        in_stream=False,
    )
    installed = {line.split()[0].split(":")[0] for line in result.stdout.splitlines() if line.split()[1:2] == ["ii"]}
    return [name for name in packages if name.split("=")[0].split(":")[0] not in installed]


def install(c: Context, settings: Settings, host: Arch) -> list[str]:
    """Install what is missing; returns what was installed (empty: nothing to do)."""
    distro = Distro.of(c.run("cat /etc/os-release", hide=True, in_stream=False).stdout)
    need_image = not c.run("ls /boot/vmlinuz-* >/dev/null 2>&1", warn=True, hide=True, in_stream=False).ok
    todo = missing(c, wanted(settings, distro, host, need_image))
    sudo = "" if c.run("id -u", hide=True, in_stream=False).stdout.strip() == "0" else "sudo "
    if settings.arch != host:
        _add_architecture(c, sudo, settings.arch)
    if todo:
        _apt(c, sudo, settings, todo, host)
    _kvm_access(c)
    if sudo:
        _kernel_images_readable(c)
    return todo


def _add_architecture(c: Context, sudo: str, arch: Arch) -> None:
    """dpkg learns the foreign arch (its packages become installable as `pkg:ARCH`); a no-op when it knows it."""
    known = c.run("dpkg --print-foreign-architectures", hide=True, in_stream=False).stdout.split()
    if arch.dpkg_arch not in known:
        log.info(f"deps: dpkg --add-architecture {arch.dpkg_arch}")
        c.run(f"{sudo}dpkg --add-architecture {shlex.quote(arch.dpkg_arch)}", hide=True, in_stream=False)


def other_arch_indexes(apt_errors: list[str], host: Arch) -> list[str]:
    """The architectures of the indexes apt-get update failed on, when every error is such an index
    of an architecture other than the host's (whose packages we install); else empty."""
    failed = [_FAILED_INDEX.match(error) for error in apt_errors if not error.startswith(_INDEXES_IGNORED)]
    if not failed or not all(match and match[1] != host.dpkg_arch for match in failed):
        return []
    return list(dict.fromkeys(match[1] for match in failed if match))


def _apt(c: Context, sudo: str, settings: Settings, packages: list[str], host: Arch) -> None:
    """apt-get update, then install, each attempt bounded by deps-timeout where stopping is safe: the update
    whole, and in the install apt's wait for the dpkg lock (another apt, unattended-upgrades) and a stalled
    download, which apt gives up by itself. dpkg is never stopped: stopped half way, it leaves the machine
    needing `dpkg --configure -a` (a fresh machine's first install, with a kernel and its initramfs, takes
    minutes)."""
    bounded = [f"-oDPkg::Lock::Timeout={settings.deps_timeout}"] if settings.deps_timeout else []
    for scheme in ("http", "https") if settings.deps_timeout else ():
        bounded.append(f"-oAcquire::{scheme}::Timeout={settings.deps_timeout}")
    options = ["-y", "-q", *bounded]
    if not settings.install_recommends:
        options.append("--no-install-recommends")
    archives = settings.cache_dir / "apt" / "archives"
    if settings.apt_cache:
        options.append(f"-oDir::Cache::Archives={archives}")
        c.run(f"mkdir -p {shlex.quote(str(archives / 'partial'))}", in_stream=False)
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    update = f"{sudo}apt-get update -q"
    install = f"{sudo}apt-get install {shlex.join(options)} {shlex.join(packages)}"
    log.info(f"deps: installing {' '.join(packages)}")
    for attempt in range(1, settings.deps_retries + 1):
        problem = _attempt(c, update, env, settings.deps_timeout, host, last=attempt == settings.deps_retries)
        problem = problem or _attempt(c, install, env, 0, host, lock_wait=settings.deps_timeout)
        if problem is None:
            if settings.apt_cache and sudo:  # apt ran as root: the .deb files are for this user's cache
                c.run(f"sudo chown -R {os.getuid()}:{os.getgid()} {shlex.quote(str(archives))}", in_stream=False)
            return
        log.warn(f"deps: attempt {attempt}/{settings.deps_retries} failed: {problem}")
        if attempt < settings.deps_retries:
            c.run(f"{sudo}dpkg --configure -a", warn=True, hide=True, in_stream=False, env=env)
            time.sleep(RETRY_DELAY_SECONDS * attempt)
    raise Failure(f"deps: apt-get failed {settings.deps_retries} times: {problem}", FAILED)


def _attempt(
    c: Context, command: str, env: dict[str, str], timeout: int, host: Arch, last: bool = False, lock_wait: int = 0
) -> str | None:
    """One try of one apt command: None when it worked, else why not (output shown). An index of
    another architecture than the host's that fails to download (a mirror syncing) is a problem to
    retry, and on the `last` try only a warning: the host's packages do not come from it. With
    `timeout`, the command is stopped after it (never the install: see _apt); `lock_wait` names apt's own.

    coreutils' timeout, not invoke's: on expiry it signals its whole process group, so no
    apt-get is left behind still waiting for a lock or half way through a download.
    """
    if timeout:
        command = f"timeout --kill-after={KILL_AFTER_SECONDS} {timeout} sh -c {shlex.quote(command)}"
    result = c.run(command, env=env, hide=True, warn=True, in_stream=False)
    if result.ok:
        return None
    _show(result.stdout + result.stderr)
    if timeout and result.exited in TIMED_OUT:
        return f"timed out after {timeout} s (deps-timeout)"
    errors = _APT_ERROR.findall(result.stderr + result.stdout)
    if lock_wait and any(error.startswith("Could not get lock") for error in errors):
        return f"timed out after {lock_wait} s (deps-timeout) waiting for the dpkg lock: {errors[0]}"
    others = other_arch_indexes(errors, host)
    if others and last:
        log.warn(f"deps: going on without the {', '.join(others)} package index: {errors[0]}")
        return None
    named = [m for error in errors for m in _APT_PACKAGE.findall(error)]
    if named:
        return f"package {', '.join(dict.fromkeys(named))}: {errors[0]}"
    return errors[-1] if errors else f"exit status {result.exited}"


def _show(output: str) -> None:
    for line in output.strip().splitlines()[-40:]:
        log.info(f"apt: {line}")


def _kernel_images_readable(c: Context) -> None:
    """vng reads the distro kernel as you: Ubuntu installs /boot/vmlinuz-* readable by root only (0600)."""
    unreadable = 'for image in /boot/vmlinuz-*; do test -e "$image" && ! test -r "$image" && exit 0; done; exit 1'
    if c.run(unreadable, warn=True, hide=True, in_stream=False).ok:
        log.info(
            "deps: making /boot/vmlinuz-* readable to all (vng reads the distro kernel as you; Ubuntu installs it 0600)"
        )
        c.run("sudo chmod a+r /boot/vmlinuz-*", hide=True, in_stream=False)


def _kvm_access(c: Context) -> None:
    """Let non-root users open /dev/kvm (root already can; no device, nothing to do)."""
    probe = "test -e /dev/kvm && ! test -r /dev/kvm -a -w /dev/kvm"
    if not c.run(probe, warn=True, hide=True, in_stream=False).ok:
        return
    rule = 'KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"'
    done = c.run(
        f"echo {shlex.quote(rule)} | sudo tee {KVM_RULE} >/dev/null"
        " && sudo udevadm control --reload-rules && sudo udevadm trigger --name-match=kvm",
        hide=True,
        warn=True,
        in_stream=False,
    )
    if not done.ok:  # no udevd (a container): the rule waits for the next boot, and boots use TCG meanwhile
        problem = (done.stderr.strip() or f"exit status {done.exited}").splitlines()[-1]
        log.warn(f"deps: /dev/kvm stays closed to this user until udev reads {KVM_RULE} ({problem}); boots use TCG")
