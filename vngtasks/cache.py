"""The local kernel cache: one directory per built kernel, under `cache-dir/kernels`.

An entry is `<root>/<key>/`, holding the build's files and `metadata.json`. It comes into being
by one `os.rename` of a finished temp directory and leaves by one rename into `.tmp/`, so a
reader sees a whole entry or none. Builds of one key serialise on an `flock` of
`.locks/<key>.lock`: the second waits, then finds the first's entry. A temp directory is
flocked by its writer while it is written, which is how `prune` tells a dead writer's
leftovers (removed) from a live build (left alone). Lock files in `.locks/` are never
removed: deleting a lock file others may have open would let two holders in.

Metadata fields read here: `name`, `arch`, `sha`, `ref`, `kernel_release`; `create` adds
`key`, `created` (ISO time), `size_bytes`, `files` (every file's size) and `sha256` (the boot image's), which
`Entry.damage` checks before the entry is used. A record on disk is hostile until checked: metadata.json is
read only when it is a regular file, bounded, and every text in it made printable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import arches, log
from .errors import FAILED, Failure
from .files import disk_usage, read_regular, remove_tree
from .kconfig import key_tag
from .log import printable
from .settings import Settings
from .validate import InputError

KERNELS = "kernels"
METADATA_BYTES = 1024 * 1024
TEMP = ".tmp"
LOCKS = ".locks"

_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
_SIZE = re.compile(r"(0|[1-9][0-9]*)([KMGT]?)", re.IGNORECASE)
_AGE = re.compile(r"(0|[1-9][0-9]*)([dhms]?)", re.IGNORECASE)
_SECONDS = {"": 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_BYTES = {"K": 1024, "": 1024**2, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def key(name: str, arch: str, sha12: str, version: str, base: str = "") -> str:
    """The seed's key; a kconfig base other than vng's, and debug options, follow a `+` (no name or version holds
    one)."""
    return f"vng-kernel-{name}-{arch}-{sha12}-{version}" + (f"+{base}" if base else "")


def key_for(settings: Settings, sha12: str) -> str:
    base = key_tag(settings.kconfig_base, settings.debug)
    return key(settings.name, settings.arch.name, sha12, settings.version, base)


def kernels_root(settings: Settings) -> Path:
    return settings.cache_dir / KERNELS


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    metadata: dict

    @property
    def created(self) -> float:
        """When the entry was made, in epoch seconds: metadata first, the directory's mtime else."""
        with contextlib.suppress(KeyError, TypeError, ValueError):
            return datetime.fromisoformat(self.metadata["created"]).timestamp()
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    @property
    def size_bytes(self) -> int:
        size = self.metadata.get("size_bytes")
        return size if isinstance(size, int) else disk_usage(self.path)

    def damage(self) -> str | None:
        """Why this entry cannot be used as it is (a file of its list missing or of another size, a boot image
        whose digest differs), or None; an entry made before entries listed their files is taken as it is."""
        files, digests = self.metadata.get("files"), self.metadata.get("sha256")
        if not isinstance(files, dict) or not isinstance(digests, dict):
            return None
        for name, size in files.items():
            found = _regular_size(self.path, name)
            if found != size:
                return f"{name}: " + ("missing" if found is None else f"{found} bytes, not {size}")
        for name, digest in digests.items():
            if _sha256(self.path / name) != digest:
                return f"{name}: its SHA-256 is not the one recorded"
        return None


class KernelCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def lookup(self, key: str) -> Entry | None:
        """The complete entry for `key`, or None."""
        return _entry(self.root / _checked(key))

    def entries(self) -> list[Entry]:
        """Every complete entry, oldest first."""
        try:
            paths = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        found = [entry for path in paths if not path.name.startswith(".") and (entry := _entry(path))]
        return sorted(found, key=lambda entry: (entry.created, entry.key))

    def newest(self, name: str, arch: str, version: str | None = None, base: str = "") -> Entry | None:
        """The newest entry built for this name and arch (never one of a name that merely starts alike),
        and with `version`, of that version and kconfig base."""
        prefix = f"vng-kernel-{name}-{arch}-"
        mine = [
            entry
            for entry in self.entries()
            if entry.key.startswith(prefix)
            and entry.metadata.get("name") == name
            and entry.metadata.get("arch") == arch
            and (version is None or entry.key == key(name, arch, entry.key[len(prefix) :][:12], version, base))
        ]
        return mine[-1] if mine else None

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the build lock of `key`, waiting for whoever has it."""
        with _flock(self.root / LOCKS / f"{_checked(key)}.lock", wait=True):
            yield

    @contextlib.contextmanager
    def using(self, key: str) -> Iterator[Entry]:
        """The entry of `key`, held in use (a shared lock: other boots share it, prune and builds wait
        or skip it) until the block ends; Failure when it is gone."""
        with _flock(self.root / LOCKS / f"{_checked(key)}.lock", wait=True, shared=True):
            entry = self.lookup(key)
            if entry is None:
                raise Failure(f"cache: {key} was removed before it could be used", FAILED)
            yield entry

    def sound(self, key: str) -> Entry | None:
        """The entry of `key` when it is there and not damaged, looked at under its lock shared (a build of it is
        waited for; boots using it are not); None: a build must look again, holding the build lock."""
        with _flock(self.root / LOCKS / f"{_checked(key)}.lock", wait=True, shared=True):
            entry = self.lookup(key)
            return entry if entry is not None and entry.damage() is None else None

    @contextlib.contextmanager
    def create(self, key: str, metadata: dict) -> Iterator[Path]:
        """A temp directory to fill; on success it becomes the entry `key` in one rename."""
        temp = self.root / TEMP / f"{_checked(key)}-{uuid.uuid4().hex[:12]}"
        marker = _marker(temp)
        with _flock(marker, wait=True):  # held while writing: prune leaves this temp alone
            temp.mkdir()
            try:
                yield temp
                size = disk_usage(temp)
                created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
                full = {**metadata, "key": key, "created": created, "size_bytes": size, **manifest(temp, metadata)}
                (temp / "metadata.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
                try:
                    os.rename(temp, self.root / key)
                except OSError as error:
                    if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    if self.lookup(key) is not None:
                        log.info(f"cache: {key} appeared meanwhile: keeping that one")
                    else:  # a directory of that name without a readable metadata.json: never an entry
                        log.warn(f"cache: {key} was damaged (no readable metadata.json): replaced")
                        self.discard(key)
                        os.rename(temp, self.root / key)
            finally:
                remove_tree(temp)  # after the rename there is nothing left
                marker.unlink(missing_ok=True)

    def prune(
        self, keep_per_name: int | None = None, max_bytes: int | None = None, max_age: float | None = None
    ) -> list[Entry]:
        """Remove the entries older than `max_age` seconds, the oldest beyond `keep_per_name` per name and
        arch, then the oldest beyond `max_bytes`."""
        self._clean_temp()
        entries = self.entries()
        now = time.time()
        doomed: list[Entry] = [e for e in entries if max_age is not None and now - e.created > max_age]
        if keep_per_name is not None:
            groups: dict[tuple[object, ...], list[Entry]] = {}
            for entry in entries:
                groups.setdefault(_group(entry), []).append(entry)
            for group in groups.values():
                doomed += [e for e in group[: max(len(group) - keep_per_name, 0)] if e not in doomed]
        if max_bytes is not None:
            kept = [entry for entry in entries if entry not in doomed]
            total = sum(entry.size_bytes for entry in kept)
            for entry in kept:
                if total <= max_bytes:
                    break
                doomed.append(entry)
                total -= entry.size_bytes
        doomed.sort(key=lambda entry: (entry.created, entry.key))
        for key in self.damaged():  # useless to anyone: removed by every prune
            with _flock(self.root / LOCKS / f"{key}.lock", wait=False) as free:
                if free:
                    log.info(f"cache: removed {key}: damaged (no readable metadata.json)")
                    self.discard(key)
        return [entry for entry in doomed if self._remove(entry)]

    def discard(self, key: str) -> None:
        """Remove the directory of `key`, whatever it holds; the caller holds the key's build lock."""
        grave = self.root / TEMP / f"{_checked(key)}-{uuid.uuid4().hex[:12]}-removed"
        grave.parent.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.root / key, grave)
        remove_tree(grave)

    def damaged(self) -> list[str]:
        """The keys of directories here that are no entry: no readable metadata.json (a damaged record)."""
        try:
            paths = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        return sorted(
            path.name
            for path in paths
            if not path.name.startswith(".") and _KEY.fullmatch(path.name) and path.is_dir() and _entry(path) is None
        )

    def _remove(self, entry: Entry) -> bool:
        with _flock(self.root / LOCKS / f"{entry.key}.lock", wait=False) as free:
            if not free:
                log.info(f"cache: {entry.key} is being built or used: kept")
                return False
            grave = self.root / TEMP / f"{entry.key}-{uuid.uuid4().hex[:12]}-removed"
            grave.parent.mkdir(exist_ok=True)  # entries moved in by hand (the action's restore) come without it
            try:
                os.rename(entry.path, grave)  # readers now see no entry at all
            except FileNotFoundError:
                return False
            remove_tree(grave)
            return True

    def _clean_temp(self) -> None:
        """Remove temp directories no live process is writing (a killed build's, a crashed prune's)."""
        temp_root = self.root / TEMP
        temps = [path for path in temp_root.iterdir() if path.is_dir()] if temp_root.is_dir() else []
        for temp in temps:
            with _flock(_marker(temp), wait=False) as free:
                if free:
                    remove_tree(temp)
                    _marker(temp).unlink(missing_ok=True)


def _checked(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a cache key: {key!r}")
    return key


def _entry(path: Path) -> Entry | None:
    """The entry at `path` when its metadata.json reads as a JSON object (a regular file, bounded), its texts
    printable; else None."""
    raw = read_regular(path / "metadata.json", METADATA_BYTES)
    try:
        metadata = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return Entry(path.name, path, _printable(metadata)) if isinstance(metadata, dict) else None


def _printable(value: object) -> object:
    """A value of a record on disk with every text in it printable (a build host wrote some of them)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [_printable(item) for item in value]
    if isinstance(value, dict):
        return {printable(str(key)): _printable(item) for key, item in value.items()}
    return value


def manifest(temp: Path, metadata: dict) -> dict[str, dict]:
    """What Entry.damage checks: every file's size, the boot image's SHA-256 (the arch's, as metadata names it)."""
    files = {}
    for path in sorted(temp.rglob("*")):
        if path.is_file() and not path.is_symlink():
            files[str(path.relative_to(temp))] = path.stat().st_size
    names = arches.lookup(str(metadata.get("arch"))).boot_images if metadata.get("arch") else ()
    return {"files": files, "sha256": {name: _sha256(temp / name) for name in names if name in files}}


def _regular_size(top: Path, name: str) -> int | None:
    """The size of the regular file `name` under `top`, reached through no link; None when there is none."""
    if name.startswith("/") or ".." in name.split("/"):
        return None
    here = top
    for part in name.split("/"):
        here = here / part
        with contextlib.suppress(OSError):
            if os.path.islink(here):
                return None
    try:
        info = os.lstat(here)
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as data:
            while chunk := data.read(1024 * 1024):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _group(entry: Entry) -> tuple[object, ...]:
    name, arch = entry.metadata.get("name"), entry.metadata.get("arch")
    return (name, arch) if name and arch else (entry.key,)


def _marker(temp: Path) -> Path:
    return temp.with_name(temp.name + ".lock")


@contextlib.contextmanager
def _flock(path: Path, *, wait: bool, shared: bool = False) -> Iterator[bool]:
    """An exclusive (or shared) flock of `path`, created if need be; yields False when busy and not waiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def parse_keep(value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise InputError("keep", f"{value!r} is not valid: expected a whole number >= 0")
    return int(value)


def parse_age(value: str) -> float:
    """`14d`, `12h`, `30m` or `90s` (no suffix: days), in seconds."""
    found = _AGE.fullmatch(value)
    if not found:
        raise InputError("max_age", f"{value!r} is not an age: expected e.g. 14d, 12h, 30m (no suffix: days)")
    return int(found[1]) * _SECONDS[found[2].lower()]


def parse_size(value: str) -> int:
    found = _SIZE.fullmatch(value)
    if not found:
        raise InputError("max_size", f"{value!r} is not a size: expected e.g. 500M, 20G (no suffix: MiB)")
    return int(found[1]) * _BYTES[found[2].upper()]


def human_age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"
