"""Unpacking the tar stream a build host sends back: hostile until checked, on every Python we allow.

Only regular files and directories pass; a name must be relative, without `..` or control characters,
and at most MAX_DEPTH deep; no member may replace or go through anything: files are created with O_EXCL and
O_NOFOLLOW in directories this unpacking made itself (it makes no links). The whole is bounded: in bytes
(every member costs its header too, so empty files count), in members, and in what a header may make tarfile
read whole (a GNU long name or a pax header over MAX_HEADER_BYTES is refused before it is read); after the
archive, at most TRAILER_BYTES more. Anything else stops the stream with one line naming the member.
(tarfile's own `filter="data"` is missing before Python 3.11.4 and was bypassed by long symlink chains
before 3.11.13.)
"""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path
from typing import IO

MAX_BYTES = 8 * 1024**3  # far above any kernel entry with its modules
MAX_MEMBERS = 100_000  # vng's base with its modules sends a few thousand
MAX_DEPTH = 32  # a kernel tree's deepest module path has about a dozen parts
MAX_HEADER_BYTES = 8192  # a long name (PATH_MAX is 4096), or a pax header holding a few
TRAILER_BYTES = 64 * 1024  # tar's end-of-archive blocks and record padding (GNU tar's record: 10 KiB)
HEADER_BYTES = 512
_CHUNK = 1024 * 1024
_LONG_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                 tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_SPARSE)  # fmt: skip


class UnsafeMember(OSError):
    """A member of the stream that is not a plain file or directory inside the destination."""


class _Bounded(tarfile.TarInfo):
    """A header whose extension (a long name, pax records) tarfile would read whole: refused when too long."""

    def _proc_member(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        if self.type in _LONG_HEADERS and self.size > MAX_HEADER_BYTES:
            raise UnsafeMember(f"a {self.size}-byte extended header (at most {MAX_HEADER_BYTES}): refused")
        return super()._proc_member(tarfile)  # type: ignore[misc]


def unpack(stream: IO[bytes], dest: Path, max_bytes: int = MAX_BYTES, max_members: int = MAX_MEMBERS) -> int:
    """Unpack the tar `stream` into the existing directory `dest`, then read what follows the archive (at most
    TRAILER_BYTES); the bytes of file content written."""
    written = charged = members = 0
    with tarfile.open(fileobj=stream, mode="r|", tarinfo=_Bounded) as archive:
        for member in archive:
            members += 1
            charged += HEADER_BYTES + member.size
            if members > max_members:
                raise UnsafeMember(f"{member.name!r}: the stream holds more than {max_members} members")
            if charged > max_bytes:
                raise UnsafeMember(f"{member.name!r}: the stream holds more than {max_bytes} bytes")
            parts = relative_parts(member.name)
            if member.isdir():
                make_dirs(dest, parts)
            elif member.isreg():
                written += member.size
                make_dirs(dest, parts[:-1])
                source = archive.extractfile(member)
                if source is None:
                    raise UnsafeMember(f"{member.name!r}: no content")
                write_new(dest.joinpath(*parts), source, member.mode & 0o755)
            else:
                raise UnsafeMember(f"{member.name!r}: {_kind(member)}, not a regular file or directory: refused")
    if len(stream.read(TRAILER_BYTES + 1)) > TRAILER_BYTES:
        raise UnsafeMember(f"more than {TRAILER_BYTES} bytes after the end of the archive: refused")
    return written


def relative_parts(name: str) -> list[str]:
    """The parts of a member name that stays inside the destination (`./` and `//` dropped)."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if name.startswith("/") or not parts or ".." in parts or any(ord(ch) < 0x20 or ch == "\x7f" for ch in name):
        raise UnsafeMember(f"{name!r}: not a relative name inside the kernel tree: refused")
    if len(parts) > MAX_DEPTH:
        raise UnsafeMember(f"{name!r}: {len(parts)} levels deep (at most {MAX_DEPTH}): refused")
    return parts


def make_dirs(dest: Path, parts: list[str]) -> None:
    """Each directory of `parts` under `dest`, made if missing; an existing one must be a real directory."""
    path = dest
    for part in parts:
        path = path / part
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise UnsafeMember(f"{str(path.relative_to(dest))!r}: exists and is not a directory") from None


def write_new(path: Path, source: IO[bytes], mode: int) -> None:
    """A new file at `path`, never one that exists and never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise UnsafeMember(f"{path.name!r}: sent twice: refused") from None
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(_CHUNK):
            out.write(chunk)


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symlink to {member.linkname!r}"
    if member.islnk():
        return f"a hard link to {member.linkname!r}"
    if member.isdev():
        return "a device node"
    if member.isfifo():
        return "a FIFO"
    return f"type {member.type!r}"
