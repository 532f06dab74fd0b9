"""Files others may have made into anything: writing one so that a reader sees its old content or its new
content, whole, never through a link; reading one only when it is a regular file; walking and removing trees
of any depth (shutil.rmtree and os.walk recurse: a deep enough tree makes them raise RecursionError) without
following a link."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path, PurePosixPath
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


def read_regular(path: Path, limit: int, dir_fd: int | None = None) -> bytes | None:
    """A file a guest, a build host or a record on disk may have made into anything: read only when it is a
    regular file, never through a link, at most `limit` bytes; else None (a FIFO would block a plain read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
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


def read_inside(top: Path, name: str, limit: int) -> bytes | None:
    """The regular file `name` (relative) under `top`, at most `limit` bytes, none of its directories reached
    through a link (someone else's directories: a guest's workspace); else None."""
    *folders, leaf = name.split("/")
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for folder in folders:
            deeper = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = deeper
        return read_regular(Path(leaf), limit, dir_fd=fd)
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


def open_dir_inside(top: Path, parts: tuple[str, ...]) -> int:
    """A descriptor of the directory `top/parts...`, each part made when missing and none reached through a
    link (a link there raises OSError: ELOOP or ENOTDIR). The caller closes it."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            deeper = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = deeper
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_inside(top: Path, name: str, data: bytes | None = None, mode: int = 0o644, link: str = "") -> bool:
    """A new file `name` (relative) under `top` holding `data`, or a symlink to `link`, its directories made,
    none of them reached through a link; False, and nothing written, when something is at `name` already."""
    *folders, leaf = name.split("/")
    parent = open_dir_inside(top, tuple(folders))
    try:
        if link:
            os.symlink(link, leaf, dir_fd=parent)
            return True
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
    except FileExistsError:
        return False
    finally:
        os.close(parent)
    with os.fdopen(fd, "wb") as out:
        out.write(data or b"")
        os.fchmod(out.fileno(), mode)
    return True


def human_size(size_bytes: int) -> str:
    if size_bytes < 1024:
        return f"{size_bytes}B"
    size = size_bytes / 1024
    for unit in ("K", "M", "G"):
        if size < 1024:
            return f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}T"


def kept_list(path: Path, limit: int, wanted: object, field: str) -> list | None:
    """The list under `field` of a JSON record kept for a re-run (bisect's steps, matrix's cells), read as any
    record on disk (a regular file, never through a link, at most `limit` bytes): [] when there is none, None
    when it is damaged or its "arguments" are not `wanted` (another run's)."""
    raw = read_regular(path, limit)
    if raw is None:
        return []
    try:
        kept = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(kept, dict) or kept.get("arguments") != wanted or not isinstance(kept.get(field), list):
        return None
    return kept[field]


def typed(value: object, kind: type | tuple[type, ...]) -> bool:
    """isinstance, where a bool (an int to Python) is only ever a bool."""
    return isinstance(value, bool) if kind is bool else isinstance(value, kind) and not isinstance(value, bool)


MODULES_ORDER_BYTES = 4 * 1024 * 1024


def read_modules_order(entry: Path) -> str | None:
    """A kernel cache entry's modules.order (a build host sent it): read bounded, through no link; None without one."""
    order = read_regular(entry / "modules.order", MODULES_ORDER_BYTES)
    return None if order is None else order.decode(errors="replace")


def module_files(modules_order: str) -> list[str]:
    """The `.ko` files a modules.order names (`drivers/x/y.o` since Linux 6.2, `y.ko` before), tree-relative;
    a line that is none (absolute, climbing out with `..`, not a module) is left out (see refused_module_lines)."""
    return [str(PurePosixPath(line.strip()).with_suffix(".ko")) for line in modules_order.splitlines()
            if _module_line(line)]  # fmt: skip


def refused_module_lines(modules_order: str) -> list[str]:
    """The lines of a modules.order that name no tree-relative module (a build host may have sent it)."""
    return [line for line in modules_order.splitlines() if line.strip() and not _module_line(line)]


def _module_line(line: str) -> bool:
    path = PurePosixPath(line.strip())
    return path.suffix in (".o", ".ko") and not path.is_absolute() and ".." not in path.parts and bool(path.stem)
