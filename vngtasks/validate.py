"""Checking one raw value: the parsers the settings table names, the plain-path rule, `InputError`.

Every parser takes `(key, value, given)`: the setting's key (for the error), its raw text, and what
is known before any setting is parsed (the workspace, the target arch). It returns the typed value
or raises `InputError` naming the input.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import arches, sanitizers
from .arches import Arch
from .log import printable
from .report import known

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
_BUILD_HOST = re.compile(
    r"(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]*)@)?(?P<host>[A-Za-z0-9_][A-Za-z0-9._-]*)(?::(?P<port>[0-9]{1,5}))?"
)
# vng pastes paths and QEMU options into a command line its shell parses (and virtme-run paths into
# virtiofsd's, and QEMU options): only characters no shell, `=`-splitting or QEMU `,` gives a meaning.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/+@%:~-]*")
# Stricter, for paths a remote shell, invoke's `cd` or an ssh config reads (ssh expands % and ~ in its options).
STRICT_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")
_PLAIN_QEMU_OPT = re.compile(r"[A-Za-z0-9._/+@%:~=,-]+")
PLAIN = "letters, digits and . _ / + @ % : ~ -"
_SCP_LIKE = re.compile(r"[^/]+:")  # git's [user@]host:path
_MIB = {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}


_SETTING_LIKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


class InputError(ValueError):
    """A bad input: the message names it and says what is wrong."""

    def __init__(self, key: str, message: str) -> None:
        # A setting's name as its flag spells it (extra_rwdirs: extra-rwdirs); anything else as it was given
        # (GITHUB_OUTPUT, or a misspelt key such as __class__), made printable.
        self.input = key.replace("_", "-") if _SETTING_LIKE.fullmatch(key) else printable(key)
        super().__init__(f"{self.input}: {message}")


@dataclass(frozen=True)
class Given:
    """What every parser may use: known before any setting is parsed."""

    workspace: Path
    arch: Arch


Parser = Callable[[str, str, Given], object]


def one_line(key: str, value: str) -> str:
    if any(ord(ch) < 0x20 for ch in value):
        raise InputError(key, "must be a single line without control characters")
    return value


def _match(key: str, value: str, pattern: re.Pattern[str], expected: str, empty_ok: bool) -> str:
    if (empty_ok and value == "") or pattern.fullmatch(value):
        return value
    raise InputError(key, f"{value!r} is not valid: expected {expected}")


def matching(pattern: re.Pattern[str], expected: str, empty_ok: bool = False) -> Parser:
    """A parser for text that must match `pattern` (or be empty, with `empty_ok`)."""
    return lambda key, value, given: _match(key, value, pattern, expected, empty_ok)


def any_text(key: str, value: str, given: Given) -> str:
    return value


def private_key(key: str, value: str, given: Given) -> str:
    """A private key's text, as OpenSSH writes one (`-----BEGIN ... PRIVATE KEY-----`); never shown back."""
    if value and not re.fullmatch(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\n[A-Za-z0-9+/=\n:, -]+\n-----END [A-Z0-9 ]*"
                                  r"PRIVATE KEY-----", value):  # fmt: skip
        raise InputError(key, "not a private key in OpenSSH's text form (its value is not shown)")
    return value


def known_hosts_lines(key: str, value: str, given: Given) -> str:
    """known_hosts lines: `NAMES KEYTYPE BASE64`, a `@revoked` or a comment each."""
    for line in value.splitlines():
        fields = line.split()
        if fields and not line.startswith("#") and not (3 <= len(fields) - (fields[0].startswith("@")) <= 4):
            raise InputError(key, f"{printable(line)!r} is not a known_hosts line")
    return value


def boolean(key: str, value: str, given: Given) -> bool:
    if value in ("true", "false"):
        return value == "true"
    raise InputError(key, f"{value!r} is not a boolean: expected true or false")


def _count(key: str, value: str, minimum: int) -> int:
    if not value.isascii() or not value.isdigit() or int(value) < minimum:
        raise InputError(key, f"{value!r} is not valid: expected a whole number >= {minimum}")
    return int(value)


def count(minimum: int) -> Parser:
    """A parser for a whole number >= `minimum`."""
    return lambda key, value, given: _count(key, value, minimum)


NAME = matching(_NAME, "letters, digits, '.', '_' or '-', not starting with '.' or '-'")
VERSION = matching(_NAME, "letters, digits, '.', '_' or '-'")
NETWORK = matching(_NETWORK, "user, loop, bridge or bridge=NAME", empty_ok=True)
CC = matching(_TOOL, "a compiler name such as clang or gcc-12", empty_ok=True)
LLVM = matching(_LLVM, "1 or a version suffix such as -14", empty_ok=True)
VMCORE = matching(re.compile("off|on-failure"), "off or on-failure")
ACCEL = matching(re.compile("|".join(ACCELS)), "auto, kvm or tcg")
CCACHE_SIZE = matching(re.compile(r"0|[1-9][0-9]*[MGT]"), "a size such as 500M or 20G, or 0 for no limit")


def kernel_url(key: str, value: str, given: Given) -> str:
    """A URL as given; a local path (git's sense: no `scheme://`, no scp-like `host:`) made absolute,
    relative to the workspace, so resolving, fetching in the work tree and pushing all find it."""
    one_line(key, value)
    if value == "" or value.startswith("-"):
        raise InputError(key, f"{value!r} is not a git URL or path")
    if "://" in value or _SCP_LIKE.match(value):
        return value
    return str((given.workspace / Path(value).expanduser()).resolve())


def git_ref(key: str, value: str, given: Given) -> str:
    one_line(key, value)
    if value.startswith("-") or " " in value or ".." in value or value.endswith((".lock", "/")):
        raise InputError(key, f"{value!r} is not a valid git ref name")
    return value


def cpus(key: str, value: str, given: Given) -> int | None:
    """A count, or None for the default (every host CPU, or a matrix's share of them: counted at boot)."""
    if value == "":
        return None
    return _count(key, value, minimum=1)


def memory_mib(key: str, value: str, given: Given) -> int | None:
    """MiB, or None for the default (sized when the accelerator is known)."""
    if value == "":
        return None
    found = _MEMORY.fullmatch(value)
    if not found:
        raise InputError(key, f"{value!r} is not a size: expected e.g. 512M, 4G (no suffix: MiB)")
    return int(found[1]) * _MIB[found[2].upper()]


def _split(key: str, value: str) -> list[str]:
    one_line(key, value)
    try:
        return shlex.split(value)
    except ValueError as error:
        raise InputError(key, f"cannot split {value!r}: {error}") from None


def qemu_opts(key: str, value: str, given: Given) -> tuple[str, ...]:
    opts = _split(key, value)
    for opt in opts:
        if not _PLAIN_QEMU_OPT.fullmatch(opt):
            raise InputError(key, f"{opt!r}: vng pastes QEMU options into a shell command: only {PLAIN} = ,")
    return tuple(opts)


def kernel_append(key: str, value: str, given: Given) -> str:
    _split(key, value)  # vng splits it the same way: it must split cleanly
    return value


def build_hosts(key: str, value: str, given: Given) -> tuple[str, ...]:
    """Space-separated, each an alias of ~/.ssh/config or [user@]host[:port] (sshconfig.py resolves it when a build
    needs it); each once, in order."""
    hosts = tuple(dict.fromkeys(value.split()))
    for host in hosts:
        ssh_destination(key, host)
    return hosts


def ssh_destination(key: str, value: str) -> tuple[str | None, str, int | None]:
    """What ssh takes for a destination here: an alias or `[user@]host[:port]`; (user, host, port)."""
    found = _BUILD_HOST.fullmatch(value)
    port = int(found["port"]) if found and found["port"] else None
    if not found or (port is not None and not 1 <= port <= 65535):
        raise InputError(key, f"{value!r} is not valid: expected an alias of ~/.ssh/config or [user@]host[:port]")
    return found["user"], found["host"], port


def packages(key: str, value: str, given: Given) -> tuple[str, ...]:
    names = tuple(value.split())
    for name in names:
        _match(key, name, _PACKAGE, "Debian package names separated by spaces", empty_ok=False)
    return names


def plain_path(key: str, path: Path) -> Path:
    """`path` (absolute), when vng may paste it into a shell command: only PLAIN characters."""
    if not _PLAIN_PATH.fullmatch(str(path)):
        raise InputError(key, f"{str(path)!r}: vng pastes this path into a shell command: only {PLAIN} are allowed")
    return path


def rwdirs(key: str, value: str, given: Given) -> tuple[Path, ...]:
    """Each directory, ~ expanded and relative to the workspace."""
    return tuple(plain_path(key, (given.workspace / Path(item).expanduser()).resolve()) for item in value.split())


def arch(key: str, value: str) -> Arch:
    """Empty: the host's."""
    if value == "":
        return arches.host()
    try:
        return arches.lookup(value)
    except KeyError:
        raise InputError(key, f"{value!r} is not known: expected one of {', '.join(arches.names())}") from None


def target_arch(key: str, value: str, given: Given) -> Arch:
    return given.arch  # parsed first, by `arch`: every other parser may need it


def _existing_path(key: str, value: str, workspace: Path) -> Path | None:
    if value == "":
        return None
    path = (workspace / Path(value).expanduser()).resolve()
    if not path.exists():
        raise InputError(key, f"{value!r} does not exist")
    return plain_path(key, path)


def existing_file(key: str, value: str, given: Given) -> Path | None:
    path = _existing_path(key, value, given.workspace)
    if path is not None and not path.is_file():
        raise InputError(key, f"{value!r} is not a file")
    return path


def kernel(key: str, value: str, given: Given) -> Path | None:
    """A kernel image (a regular file), or a build directory (or cache entry) that holds the arch's."""
    path = _existing_path(key, value, given.workspace)
    images = given.arch.boot_images
    if path is None or path.is_file() or (path.is_dir() and any((path / i).is_file() for i in images)):
        return path
    raise InputError(key, f"{value!r} is neither a kernel image nor a build directory with {images[0]}")


def kconfig_base(key: str, value: str, given: Given) -> str | Path:
    if value in KCONFIG_BASES:
        return value
    path = existing_file(key, value, given) if value else None
    if path is None:
        raise InputError(key, f"expected {' or '.join(KCONFIG_BASES)} or the path of a .config file")
    return path


def debug(key: str, value: str, given: Given) -> tuple[str, ...]:
    """Names of sanitizers.OPTIONS, separated by commas or blanks: each once, in the table's order."""
    names = [name for name in re.split(r"[\s,]+", value) if name]
    unknown = [name for name in names if name not in sanitizers.BY_NAME]
    if unknown:
        raise InputError(key, f"{unknown[0]!r} is not one of {', '.join(sanitizers.BY_NAME)}")
    return tuple(option.name for option in sanitizers.OPTIONS if option.name in names)


def cache_dir(key: str, value: str, given: Given) -> Path:
    """Empty: $XDG_CACHE_HOME/vngtasks."""
    one_line(key, value)
    if value:
        path = Path(value).expanduser().resolve()
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")).resolve() / "vngtasks"
    return _directory(key, value or str(path), plain_path(key, path))


def log_dir(key: str, value: str, given: Given) -> Path:
    """Empty: the workspace."""
    one_line(key, value)
    if value == "":
        return given.workspace
    path = (given.workspace / Path(value).expanduser()).resolve()
    return _directory(key, value, plain_path(key, path))


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


_RELATIVE_FILE = re.compile(r"[A-Za-z0-9._+@%:~-]+(/[A-Za-z0-9._+@%:~-]+)*")


def results(key: str, value: str, given: Given) -> str:
    """ktap, kunit, or the path of a file the workload writes: relative, under the workspace, each part plain."""
    if value in ("", "ktap", "kunit"):
        return value
    path = value.removeprefix("./")
    if not _RELATIVE_FILE.fullmatch(path) or any(part in (".", "..") for part in path.split("/")):
        raise InputError(key, f"expected ktap, kunit or a path relative to the workspace ({PLAIN}, no `..`)")
    return path


def known_failures(key: str, value: str, given: Given) -> Path | None:
    """A known-failures file (report/known.py), its lines checked now."""
    return _checked_file(key, value, given, known.read_rules)


def results_baseline(key: str, value: str, given: Given) -> Path | None:
    """An earlier run's results.json, checked now."""
    return _checked_file(key, value, given, known.read_baseline)


def _checked_file(key: str, value: str, given: Given, read: Callable[[Path], object]) -> Path | None:
    path = existing_file(key, value, given)
    if path is not None:
        try:
            read(path)
        except ValueError as error:
            raise InputError(key, str(error)) from None
    return path


def regexes(key: str, value: str, given: Given) -> tuple[str, ...]:
    """One regex per line, each checked by re.compile."""
    patterns = tuple(line.strip() for line in value.splitlines() if line.strip())
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise InputError(key, f"{pattern!r} is not a valid regex: {error}") from None
    return patterns
