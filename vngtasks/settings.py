"""One typed model of every input, validated before anything is touched.

Raw values arrive as strings (task flags, `INVOKE_VNG_*` env, the action's inputs) or
as YAML scalars (`invoke.yaml`). `resolve()` merges them, weakest first, and turns
them into a frozen `Settings`; any bad value raises `InputError` naming the input.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import arches
from .arches import Arch

TORVALDS_URL = "https://git.kernel.org/pub/scm/linux/kernel/git/torvalds/linux.git"

# Every setting, declared once with its default (the seed's where it has one).
# Values are strings, as the action's inputs are: invoke keeps env overrides of a
# string default as strings, so validation below sees exactly what the user typed.
DEFAULTS: dict[str, str] = {
    "name": "default",
    "kernel_url": TORVALDS_URL,
    "tag": "",
    "version": "v2",
    "kconfig": "",
    "kconfig_base": "vng",
    "cpus": "",  # empty: all host CPUs
    "memory": "",  # empty: 90% of host RAM, capped under TCG per the arch table
    "network": "",
    "verbose": "true",
    "cc": "",
    "llvm": "",
    "kernel_compile_cache": "true",
    "append": "mitigations=off",
    "qemu_opts": "",
    "deps_timeout": "90",
    "deps_retries": "3",
    "run_timeout": "0",
    "packages": "",
    "install_recommends": "false",
    "extra_rwdirs": "~/.cargo",
    "vmlinux_h": "true",
    "workspace_rw": "true",
    "apt_cache": "false",
    "arch": "",  # empty: the host's
    "accel": "auto",
    "kernel": "",
    "cache_dir": "",  # empty: $XDG_CACHE_HOME/vngtasks
    "boot_timeout": "300",
    "build_host": "",
    "run": "",  # the workload; `invoke boot -- CMD` overrides it
    "log_dir": "",  # empty: the workspace
    "splat_check": "true",
    "splat_allow": "",
    "build_host_accept_new": "false",
    "reuse_resolved": "false",
}

# One line of help per setting, shown by `invoke --help TASK` for the flags a task takes.
HELP: dict[str, str] = {
    "name": "build name: part of cache keys and of `uname -r`",
    "kernel_url": "git URL (or local path) of the kernel source",
    "tag": "kernel git tag, branch or 40-hex commit to build and boot",
    "version": "cache version: bump it to force a rebuild",
    "kconfig": "kconfig fragment file, relative to the workspace",
    "kconfig_base": "the .config the fragments go on: vng (its defconfig-based one), tiny, or a .config file",
    "cpus": "guest CPUs (default: all host CPUs)",
    "memory": "guest memory, e.g. 512M or 4G (default: 90 percent of host RAM, capped under TCG)",
    "network": "guest network: user, loop, bridge or bridge=NAME (default: none)",
    "verbose": "true: stream the guest console",
    "cc": "C compiler for the kernel build, e.g. clang",
    "llvm": "LLVM toolchain for the kernel build: 1 or a suffix such as -14",
    "kernel_compile_cache": "true: build through ccache",
    "append": "extra kernel command line",
    "qemu_opts": "extra QEMU options (split like a shell would, never run by one)",
    "deps_timeout": "seconds per dependency install attempt",
    "deps_retries": "dependency install attempts",
    "run_timeout": "seconds the workload may run, 0 = no limit (exit 124 on expiry)",
    "packages": "extra Debian packages to install (space-separated)",
    "install_recommends": "true: install recommended packages too",
    "extra_rwdirs": "more host directories the guest may write (space-separated, ~ expanded)",
    "vmlinux_h": "true: generate vmlinux.h from the built kernel's BTF",
    "workspace_rw": "true: the current directory is writable from the guest",
    "apt_cache": "true: keep downloaded .deb files for the action's cache",
    "arch": "target architecture (default: the host's)",
    "accel": "auto, kvm or tcg (auto falls back to tcg when KVM does not work)",
    "kernel": "prebuilt kernel image or build directory (default: the host's distro kernel)",
    "cache_dir": "kernel cache and run directory (default: $XDG_CACHE_HOME/vngtasks)",
    "boot_timeout": "seconds the guest may take to start the workload, 0 = no limit",
    "build_host": "[user@]host[:port] to build on over SSH",
    "run": "the workload, when not given after `--`",
    "log_dir": "where vng-console.log, vng-dmesg.log and vng-run.json go (default: the workspace)",
    "splat_check": "true: kernel warnings, BUGs, oopses, stalls in the guest fail the run (exit 123)",
    "splat_allow": "regexes of kernel splat lines to ignore, one per line",
    "build_host_accept_new": "true: trust the build host's key on first use and record it in ~/.ssh/known_hosts",
    "reuse_resolved": "true: outside GitHub Actions, reuse the commit a resolve recorded for the same tag and URL",
}

ACCELS = ("auto", "kvm", "tcg")
KCONFIG_BASES = ("vng", "tiny")  # or the path of a full .config

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_MEMORY = re.compile(r"([1-9][0-9]*)([MGT]?)", re.IGNORECASE)
_NETWORK = re.compile(r"user|loop|bridge(=[A-Za-z0-9_.-]+)?")
_TOOL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+/-]*")
_LLVM = re.compile(r"1|-[0-9]+")
# Debian's package names (lower case, digits, + - .), with apt's :arch and =version; never a
# trailing '-', which apt reads as "remove this package".
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]*[a-z0-9+.](:[a-z0-9-]+)?(=[A-Za-z0-9.+:~-]+)?")
_BUILD_HOST = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*@)?[A-Za-z0-9][A-Za-z0-9.-]*(?::(?P<port>[0-9]{1,5}))?")
# vng pastes paths and QEMU options into a command line its shell parses (and virtme-run paths into
# virtiofsd's, and QEMU options): only characters no shell, `=`-splitting or QEMU `,` gives a meaning.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/+@%:~-]*")
_PLAIN_QEMU_OPT = re.compile(r"[A-Za-z0-9._/+@%:~=,-]+")
PLAIN = "letters, digits and . _ / + @ % : ~ -"
_SCP_LIKE = re.compile(r"[^/]+:")  # git's [user@]host:path
_MIB = {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}
# Settings whose items may hold spaces: one item per line (a YAML list works too).
_LINE_LISTS = frozenset(["splat_allow"])


class InputError(ValueError):
    """A bad input: the message names it and says what is wrong."""

    def __init__(self, key: str, message: str) -> None:
        self.input = key if key.isupper() else key.replace("_", "-")  # GITHUB_OUTPUT stays as it is
        super().__init__(f"{self.input}: {message}")


@dataclass(frozen=True)
class Settings:
    name: str
    kernel_url: str
    tag: str
    version: str
    kconfig: Path | None
    kconfig_base: str | Path  # "vng", "tiny", or a full .config file
    cpus: int
    memory_mib: int | None  # None: the default, sized when the accelerator is known
    network: str
    verbose: bool
    cc: str
    llvm: str
    kernel_compile_cache: bool
    append: str
    qemu_opts: tuple[str, ...]
    deps_timeout: int
    deps_retries: int
    run_timeout: int
    packages: tuple[str, ...]
    install_recommends: bool
    extra_rwdirs: tuple[Path, ...]
    vmlinux_h: bool
    workspace_rw: bool
    apt_cache: bool
    arch: Arch
    accel: str
    kernel: Path | None
    cache_dir: Path
    boot_timeout: int
    build_host: str
    run: str
    workspace: Path
    log_dir: Path
    splat_check: bool
    splat_allow: tuple[str, ...]  # regexes, each checked by re.compile
    build_host_accept_new: bool
    reuse_resolved: bool


def resolve(
    config: Mapping[str, object],
    flags: Mapping[str, object | None],
    *,
    workspace: Path | None = None,
) -> Settings:
    """Merge config (already layered by invoke) with task flags and validate all of it."""
    unknown = sorted(set(flags) - set(DEFAULTS))
    if unknown:
        raise InputError(unknown[0], "not a known setting")
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:  # a misspelt key in invoke.yaml must not be a silent no-op
        raise InputError(unknown[0], "not a known setting (in the `vng` section of an invoke.yaml)")
    raw = {key: _text(key, config.get(key, default)) for key, default in DEFAULTS.items()}
    raw.update({key: _text(key, value) for key, value in flags.items() if value is not None})
    workspace = (workspace or Path.cwd()).resolve()
    arch = _arch(raw["arch"])
    accel = _match("accel", raw["accel"], re.compile("|".join(ACCELS)), "auto, kvm or tcg")
    kconfig_base = _kconfig_base(raw["kconfig_base"], workspace)
    if kconfig_base == "tiny" and not arch.tiny_kconfig:
        raise InputError("kconfig_base", f"tiny is not available for {arch.name} yet: use vng or a .config file")
    if accel == "kvm" and arch != arches.host():
        raise InputError("accel", f"kvm cannot run {arch.name} guests on a {arches.host().name} host: use tcg")
    return Settings(
        name=_name(raw["name"]),
        kernel_url=_kernel_url(raw["kernel_url"], workspace),
        tag=_tag(raw["tag"]),
        version=_version(raw["version"]),
        kconfig=_existing_file("kconfig", raw["kconfig"], workspace),
        kconfig_base=kconfig_base,
        cpus=_cpus(raw["cpus"]),
        memory_mib=_memory(raw["memory"]),
        network=_match("network", raw["network"], _NETWORK, "user, loop, bridge or bridge=NAME", empty_ok=True),
        verbose=_bool("verbose", raw["verbose"]),
        cc=_match("cc", raw["cc"], _TOOL, "a compiler name such as clang or gcc-12", empty_ok=True),
        llvm=_match("llvm", raw["llvm"], _LLVM, "1 or a version suffix such as -14", empty_ok=True),
        kernel_compile_cache=_bool("kernel_compile_cache", raw["kernel_compile_cache"]),
        append=_append(raw["append"]),
        qemu_opts=_qemu_opts(raw["qemu_opts"]),
        deps_timeout=_count("deps_timeout", raw["deps_timeout"], minimum=0),
        deps_retries=_count("deps_retries", raw["deps_retries"], minimum=1),
        run_timeout=_count("run_timeout", raw["run_timeout"], minimum=0),
        packages=_packages(raw["packages"]),
        install_recommends=_bool("install_recommends", raw["install_recommends"]),
        extra_rwdirs=_rwdirs(raw["extra_rwdirs"], workspace),
        vmlinux_h=_bool("vmlinux_h", raw["vmlinux_h"]),
        workspace_rw=_bool("workspace_rw", raw["workspace_rw"]),
        apt_cache=_bool("apt_cache", raw["apt_cache"]),
        arch=arch,
        accel=accel,
        kernel=_kernel(raw["kernel"], workspace, arch),
        cache_dir=_cache_dir(raw["cache_dir"]),
        boot_timeout=_count("boot_timeout", raw["boot_timeout"], minimum=0),
        build_host=_build_host(raw["build_host"]),
        run=raw["run"],
        workspace=plain_path("workspace", workspace),
        log_dir=_log_dir(raw["log_dir"], workspace),
        splat_check=_bool("splat_check", raw["splat_check"]),
        splat_allow=_regexes("splat_allow", raw["splat_allow"]),
        build_host_accept_new=_bool("build_host_accept_new", raw["build_host_accept_new"]),
        reuse_resolved=_bool("reuse_resolved", raw["reuse_resolved"]),
    )


def _text(key: str, value: object) -> str:
    if isinstance(value, bool):  # YAML true/false in invoke.yaml
        return "true" if value else "false"
    if isinstance(value, int | str):
        return str(value).strip()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ("\n" if key in _LINE_LISTS else " ").join(value)
    raise InputError(key, f"expected a string, got {type(value).__name__}")


def _one_line(key: str, value: str) -> str:
    if any(ord(ch) < 0x20 for ch in value):
        raise InputError(key, "must be a single line without control characters")
    return value


def _match(key: str, value: str, pattern: re.Pattern[str], expected: str, empty_ok: bool = False) -> str:
    if (empty_ok and value == "") or pattern.fullmatch(value):
        return value
    raise InputError(key, f"{value!r} is not valid: expected {expected}")


def _name(value: str) -> str:
    return _match("name", value, _NAME, "letters, digits, '.', '_' or '-', not starting with '.' or '-'")


def _kernel_url(value: str, workspace: Path) -> str:
    """A URL as given; a local path (git's sense: no `scheme://`, no scp-like `host:`) made absolute,
    relative to the workspace, so resolving, fetching in the work tree and pushing all find it."""
    _one_line("kernel_url", value)
    if value == "" or value.startswith("-"):
        raise InputError("kernel_url", f"{value!r} is not a git URL or path")
    if "://" in value or _SCP_LIKE.match(value):
        return value
    return str((workspace / Path(value).expanduser()).resolve())


def _tag(value: str) -> str:
    _one_line("tag", value)
    if value.startswith("-") or " " in value or ".." in value or value.endswith((".lock", "/")):
        raise InputError("tag", f"{value!r} is not a valid git ref name")
    return value


def _version(value: str) -> str:
    return _match("version", value, _NAME, "letters, digits, '.', '_' or '-'")


def _bool(key: str, value: str) -> bool:
    if value in ("true", "false"):
        return value == "true"
    raise InputError(key, f"{value!r} is not a boolean: expected true or false")


def _count(key: str, value: str, minimum: int) -> int:
    if not value.isascii() or not value.isdigit() or int(value) < minimum:
        raise InputError(key, f"{value!r} is not valid: expected a whole number >= {minimum}")
    return int(value)


def _cpus(value: str) -> int:
    if value == "":
        return os.cpu_count() or 1
    return _count("cpus", value, minimum=1)


def _memory(value: str) -> int | None:
    if value == "":
        return None
    found = _MEMORY.fullmatch(value)
    if not found:
        raise InputError("memory", f"{value!r} is not a size: expected e.g. 512M, 4G (no suffix: MiB)")
    return int(found[1]) * _MIB[found[2].upper()]


def _split(key: str, value: str) -> list[str]:
    _one_line(key, value)
    try:
        return shlex.split(value)
    except ValueError as error:
        raise InputError(key, f"cannot split {value!r}: {error}") from None


def _qemu_opts(value: str) -> tuple[str, ...]:
    opts = _split("qemu_opts", value)
    for opt in opts:
        if not _PLAIN_QEMU_OPT.fullmatch(opt):
            raise InputError("qemu_opts", f"{opt!r}: vng pastes QEMU options into a shell command: only {PLAIN} = ,")
    return tuple(opts)


def _append(value: str) -> str:
    _split("append", value)  # vng splits it the same way: it must split cleanly
    return value


def _build_host(value: str) -> str:
    found = _BUILD_HOST.fullmatch(value)
    if value and (not found or not 1 <= int(found["port"] or 22) <= 65535):
        raise InputError("build_host", f"{value!r} is not valid: expected [user@]host[:port]")
    return value


def _packages(value: str) -> tuple[str, ...]:
    names = tuple(value.split())
    for name in names:
        _match("packages", name, _PACKAGE, "Debian package names separated by spaces")
    return names


def plain_path(key: str, path: Path) -> Path:
    """`path` (absolute), when vng may paste it into a shell command: only PLAIN characters."""
    if not _PLAIN_PATH.fullmatch(str(path)):
        raise InputError(key, f"{str(path)!r}: vng pastes this path into a shell command: only {PLAIN} are allowed")
    return path


def _rwdirs(value: str, workspace: Path) -> tuple[Path, ...]:
    """Each directory, ~ expanded and relative to the workspace."""
    return tuple(plain_path("extra_rwdirs", (workspace / Path(item).expanduser()).resolve()) for item in value.split())


def _arch(value: str) -> Arch:
    if value == "":
        return arches.host()
    try:
        return arches.lookup(value)
    except KeyError:
        raise InputError("arch", f"{value!r} is not known: expected one of {', '.join(arches.names())}") from None


def _existing_path(key: str, value: str, workspace: Path) -> Path | None:
    if value == "":
        return None
    path = (workspace / Path(value).expanduser()).resolve()
    if not path.exists():
        raise InputError(key, f"{value!r} does not exist")
    return plain_path(key, path)


def _existing_file(key: str, value: str, workspace: Path) -> Path | None:
    path = _existing_path(key, value, workspace)
    if path is not None and not path.is_file():
        raise InputError(key, f"{value!r} is not a file")
    return path


def _kernel(value: str, workspace: Path, arch: Arch) -> Path | None:
    """A kernel image (a regular file), or a build directory (or cache entry) that holds the arch's."""
    path = _existing_path("kernel", value, workspace)
    if path is None or path.is_file() or (path.is_dir() and any((path / i).is_file() for i in arch.boot_images)):
        return path
    raise InputError("kernel", f"{value!r} is neither a kernel image nor a build directory with {arch.boot_images[0]}")


def _kconfig_base(value: str, workspace: Path) -> str | Path:
    if value in KCONFIG_BASES:
        return value
    path = _existing_file("kconfig_base", value, workspace) if value else None
    if path is None:
        raise InputError("kconfig_base", f"expected {' or '.join(KCONFIG_BASES)} or the path of a .config file")
    return path


def _cache_dir(value: str) -> Path:
    _one_line("cache_dir", value)
    if value:
        path = Path(value).expanduser().resolve()
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")).resolve() / "vngtasks"
    return _directory("cache_dir", value or str(path), plain_path("cache_dir", path))


def _log_dir(value: str, workspace: Path) -> Path:
    _one_line("log_dir", value)
    if value == "":
        return workspace
    path = (workspace / Path(value).expanduser()).resolve()
    return _directory("log_dir", value, plain_path("log_dir", path))


def _directory(key: str, value: str, path: Path) -> Path:
    """`path` when it is a directory or could be made one: its nearest existing ancestor is a directory."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(key, f"{value!r} is not a directory" if existing == path else f"{existing} is not a directory")
    return path


def make_directory(key: str, path: Path) -> None:
    """Make the directory of setting `key`, or fail as bad input naming it (e.g. under /proc)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(key, f"cannot make {path}: {error.strerror}") from None


def _regexes(key: str, value: str) -> tuple[str, ...]:
    patterns = tuple(line.strip() for line in value.splitlines() if line.strip())
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise InputError(key, f"{pattern!r} is not a valid regex: {error}") from None
    return patterns
