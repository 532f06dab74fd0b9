"""Files others may have made into anything: writing one so that a reader sees its old content or its new
content, whole, never through a link; reading one only when it is a regular file; walking and removing trees
of any depth (shutil.rmtree and os.walk recurse: a deep enough tree makes them raise RecursionError) without
following a link."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from stat import S_ISDIR, S_ISREG


def write_atomically(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """`data` into `path` through a new temporary file beside it, renamed over it at once: a reader sees the
    old file or the new one, whole, and whatever `path` was (a link someone placed there, say) is replaced, never
    written through. On any failure the temporary file is gone and `path` is as it was."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
            os.fchmod(out.fileno(), mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def remove_empty_dirs(here: Path, stop: Path) -> None:
    """`here` and each parent of it below `stop` (not included), while they are empty directories."""
    while here != stop and here.is_relative_to(stop):
        try:
            here.rmdir()
        except OSError:  # not empty, or already gone
            return
        here = here.parent


def read_regular(path: Path, limit: int) -> bytes | None:
    """A file a guest, a build host or a record on disk may have made into anything: read only when it is a
    regular file, never through a link, at most `limit` bytes; else None (a FIFO would block a plain read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, left = [], limit
        while left > 0 and (chunk := os.read(fd, min(left, 65536))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """`path` and everything under it, however deep; a link is removed, never followed; what cannot be
    removed stays, silently."""
    try:
        if not S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)
            return
    except OSError:
        return
    pending: list[tuple[str, bool]] = [(str(path), False)]
    while pending:
        directory, emptied = pending.pop()
        if emptied:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
            continue
        pending.append((directory, True))
        try:
            with os.scandir(directory) as found:
                children = list(found)
        except OSError:
            continue
        for child in children:
            if child.is_dir(follow_symlinks=False):
                pending.append((child.path, False))
            else:
                with contextlib.suppress(OSError):
                    os.unlink(child.path)


def disk_usage(path: Path) -> int:
    """The bytes of the files under `path`, however deep, each inode once (an entry hard-links its modules)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    pending = [str(path)]
    while pending:
        try:
            with os.scandir(pending.pop()) as found:
                children = list(found)
        except OSError:
            continue
        for child in children:
            try:
                info = child.stat(follow_symlinks=False)
            except OSError:
                continue
            if S_ISDIR(info.st_mode):
                pending.append(child.path)
            elif (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total
