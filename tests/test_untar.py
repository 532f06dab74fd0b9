"""What a hostile build host could send back as the kernel's tar stream: all of it refused."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from vngtasks import untar


def stream(*members: Callable[[tarfile.TarFile], None]) -> io.BytesIO:
    """A tar stream made of `members`, each a function that adds its member(s) to the archive."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        for add in members:
            add(archive)
    data.seek(0)
    return data


def file(name: str, content: bytes = b"x", mode: int = 0o644) -> Callable[[tarfile.TarFile], None]:
    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(content), mode
        archive.addfile(info, io.BytesIO(content))

    return add


def special(name: str, kind: bytes, linkname: str = "") -> Callable[[tarfile.TarFile], None]:
    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        archive.addfile(info)

    return add


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """(the temporary directory the stream goes into, the directory around it that must stay as it is)"""
    dest = tmp_path / "cache" / ".tmp" / "entry"
    dest.mkdir(parents=True)
    return dest, tmp_path


def outside(around: Path, dest: Path) -> set[Path]:
    """Everything under `around` but not under `dest`."""
    return {p for p in around.rglob("*") if not p.is_relative_to(dest)}


def test_a_kernel_tree_unpacks(places) -> None:
    dest, _ = places
    data = stream(file("arch/x86/boot/bzImage", b"kernel", 0o4755), file("./System.map", b"map"), file("a//b/c"))
    assert untar.unpack(data, dest) == len(b"kernel") + len(b"map") + 1
    assert (dest / "arch/x86/boot/bzImage").read_bytes() == b"kernel"
    assert (dest / "arch/x86/boot/bzImage").stat().st_mode & 0o7777 == 0o755  # no setuid from a build host
    assert (dest / "System.map").read_bytes() == b"map" and (dest / "a/b/c").is_file()


HOSTILE = {
    "absolute name": [file("/etc/cron.d/evil")],
    "dot-dot": [file("arch/../../../evil")],
    "symlink out": [special("arch", tarfile.SYMTYPE, "/etc")],
    "symlink then a file through it": [special("arch", tarfile.SYMTYPE, "/tmp"), file("arch/evil")],
    "hard link out": [special("System.map", tarfile.LNKTYPE, "/etc/shadow")],
    "device node": [special("null", tarfile.CHRTYPE)],
    "fifo": [special("status", tarfile.FIFOTYPE)],
    "file replaced by a second member": [file("System.map"), file("System.map", b"again")],
    "file where a directory goes": [file("arch"), file("arch/x86/boot/bzImage")],
    "empty name": [file(".")],
}


@pytest.mark.parametrize("members", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_member_is_refused_and_nothing_lands_outside(places, members) -> None:
    dest, around = places
    before = outside(around, dest)
    with pytest.raises(untar.UnsafeMember) as refused:
        untar.unpack(stream(*members), dest)
    assert "refused" in str(refused.value) or "exists" in str(refused.value)
    assert outside(around, dest) == before
    assert not [p for p in dest.rglob("*") if p.is_symlink()]


def test_a_symlink_chain_longer_than_path_max_is_refused(places) -> None:
    """The bypass of tarfile's data filter before Python 3.11.13: links through links past PATH_MAX."""
    dest, around = places
    chain = [special(f"d{i}/" + "a" * 200, tarfile.SYMTYPE, "../" * 10) for i in range(30)]
    with pytest.raises(untar.UnsafeMember, match="symlink"):
        untar.unpack(stream(*chain, file("d29/" + "a" * 200 + "/escape")), dest)
    assert not (around / "escape").exists() and not [p for p in dest.rglob("*") if p.is_symlink()]


def test_an_oversized_stream_stops_at_the_cap(places) -> None:
    dest, _ = places
    with pytest.raises(untar.UnsafeMember, match="more than 10 bytes"):
        untar.unpack(stream(file("a", b"x" * 6), file("b", b"y" * 6)), dest, max_bytes=10)


def test_an_existing_link_in_the_destination_is_never_followed(places, tmp_path: Path) -> None:
    dest, _ = places
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, dest / "arch")  # not ours to make, but if it were there
    with pytest.raises(untar.UnsafeMember, match="not a directory"):
        untar.unpack(stream(file("arch/x86/boot/bzImage")), dest)
    assert not list(outside.iterdir())


class ReadAtMost(io.RawIOBase):
    """A stream that fails the test if more than `limit` bytes of it are read: the unpacker must stop first."""

    def __init__(self, data: bytes, limit: int) -> None:
        self.data, self.limit, self.position = data, limit, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = len(self.data) - self.position if size < 0 else size
        assert self.position + size <= self.limit, f"read {self.position + size} bytes, more than {self.limit}"
        chunk = self.data[self.position : self.position + size]
        self.position += len(chunk)
        return chunk


def fresh(dest: Path) -> Path:
    """Another empty destination beside `dest`."""
    other = dest.with_name(dest.name + "-again")
    other.mkdir()
    return other


def long_name_header(claimed: int) -> bytes:
    """A GNU `././@LongLink` header announcing a name of `claimed` bytes (tarfile would read it whole)."""
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, claimed
    return info.tobuf(format=tarfile.GNU_FORMAT)


def test_an_oversized_extended_header_is_refused_before_it_is_read(places) -> None:
    dest, _ = places
    data = long_name_header(400 * 1024**2) + b"\0" * (1024 * 1024)  # tarfile reads the whole 400 MiB name
    with pytest.raises(untar.UnsafeMember, match="extended header"):
        untar.unpack(ReadAtMost(data, 64 * 1024), dest, max_bytes=8)


def test_many_empty_files_count_against_the_caps(places) -> None:
    dest, _ = places
    empties = [file(f"f{number}", b"") for number in range(50)]
    with pytest.raises(untar.UnsafeMember, match="more than 40 members"):
        untar.unpack(stream(*empties), dest, max_members=40)
    with pytest.raises(untar.UnsafeMember, match="more than 10000 bytes"):  # each member costs its header
        untar.unpack(stream(*empties), fresh(dest), max_bytes=10_000)


@pytest.mark.parametrize(
    "name", ["a/" * (untar.MAX_DEPTH + 1) + "f", "ok/new\nline", "carriage\rreturn", "escape\x1b[2J", "tab\there"]
)
def test_deep_names_and_names_with_control_characters_are_refused(places, name: str) -> None:
    dest, around = places
    before = outside(around, dest)
    with pytest.raises(untar.UnsafeMember):
        untar.unpack(stream(file(name)), dest)
    assert outside(around, dest) == before


def test_what_follows_the_archive_is_read_only_so_far(places) -> None:
    dest, _ = places
    archive = stream(file("System.map", b"map")).getvalue()
    assert untar.unpack(io.BytesIO(archive + b"\0" * 10240), dest) == 3  # tar's record padding
    with pytest.raises(untar.UnsafeMember, match="after the end of the archive"):
        untar.unpack(ReadAtMost(archive + b"x" * (1024 * 1024), len(archive) + 128 * 1024), fresh(dest))
