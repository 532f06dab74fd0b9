"""Crash frames to `file:line`, inlined frames included, with the debug info the kernel's cache entry keeps.

An entry built with CONFIG_DEBUG_INFO keeps its vmlinux compressed (`vmlinux.zst`, see kernelmake.DEBUG_INFO)
beside its System.map. A frame `func+0x1d/0x30` is the address of `func` in System.map plus 0x1d (a trace's
frames are return addresses: one byte back, the call's own line); binutils' addr2line of the kernel's arch
(`addr2line` for this machine's, `aarch64-linux-gnu-addr2line` for a cross build, else `llvm-addr2line`) names
the line and the functions inlined there. A module's frame (`func+0x1d/0x30 [mod]`) is read the same way from the
entry's copy of that module (`mod.ko`, found through modules.order): `func`'s section and place in it from the
arch's objdump's symbol table, then addr2line with that section (`-j`), as a `.ko` is not linked.

The entry came from a cache the workload's repository may write (GitHub's): what it holds is read bounded,
never through a link, and what addr2line says of it is cleaned like anything else the guest sent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path, PurePosixPath

from ..arches import Arch
from ..files import module_files, read_inside, read_modules_order, read_regular
from ..log import printable
from .crashes import Crashes, Frame, below_the_machinery

SYSTEM_MAP_BYTES = 64 * 1024 * 1024
MODULE_BYTES = 512 * 1024 * 1024  # the most of a module's .ko read (its debug info included)
VMLINUX_BYTES = 4 * 1024 * 1024 * 1024  # the most a vmlinux.zst may decompress to
ADDR2LINE_SECONDS = 60
_SYMBOL = re.compile(r"^([0-9a-f]{8,16}) [tTwW] ([A-Za-z_][\w.]{0,200})$")
# objdump -t: a function's place in its section, in a relocatable object (a module) relative to the section.
_SECTION_SYMBOL = re.compile(
    r"^([0-9a-f]{8,16}) [lgu! ][w ][C ][W ][Ii ][dD ]F (\.[\w.]{1,100})\t[0-9a-f]{8,16} ([A-Za-z_][\w.]{0,200})$"
)  # only functions (F)
_LOCATION = re.compile(r"^(?P<file>[^:]{1,500}):(?P<line>[0-9]{1,7})(?: \(discriminator [0-9]+\))?$")
# The kernel tree's top-level directories: a file's path in the tree starts at one of them.
_TOP_DIRS = (
    "arch", "block", "certs", "crypto", "drivers", "fs", "include", "init", "io_uring", "ipc", "kernel", "lib",
    "mm", "net", "rust", "samples", "security", "sound", "usr", "virt",
)  # fmt: skip


def symbolize(crashes: Crashes, kernel: Path, arch: Arch, host: Arch) -> Crashes:
    """`crashes` with each frame's file and line, when `kernel` is an entry that keeps debug info; else as they
    are, with why not."""
    if not crashes.found:
        return crashes
    entry = kernel if kernel.is_dir() else None
    packed = entry / "vmlinux.zst" if entry else None
    if packed is None or not packed.is_file() or packed.is_symlink():
        crashes.why = "no debug info: the kernel is not a vngtasks build with CONFIG_DEBUG_INFO (its vmlinux.zst)"
        return crashes
    tool = binutils_program("addr2line", arch, host)
    if tool is None:
        crashes.why = f"no addr2line for {arch.name} here ({arch.cross_compile}addr2line or llvm-addr2line)"
        return crashes
    symbols = system_map(read_regular(entry / "System.map", SYSTEM_MAP_BYTES) or b"")
    tree = _tree_of(entry)
    with tempfile.TemporaryDirectory(prefix="vngtasks-symbolize-") as temp:
        vmlinux = Path(temp, "vmlinux")
        if not unpack(packed, vmlinux):
            crashes.why = f"{packed} did not decompress (zstd), or to more than {VMLINUX_BYTES // 2**30} GiB"
            return crashes
        modules = Modules(entry, Path(temp), binutils_program("objdump", arch, host))
        for crash in crashes.found:
            decoded = list(_decoded(crash.frames, symbols, tool, vmlinux, tree, modules))
            crash.frames = tuple(below_the_machinery(decoded))
    crashes.symbolized, crashes.why = True, ""
    return crashes


def binutils_program(name: str, arch: Arch, host: Arch) -> str | None:
    """binutils' `name` for the kernel's arch: this machine's own for its arch, else the cross one, else LLVM's."""
    names = [name] if arch == host else []
    names += [f"{arch.cross_compile}{name}", f"llvm-{name}"]
    return next((path for name in names if (path := shutil.which(name))), None)


class Modules:
    """The entry's modules, for their frames: each `.ko` copied out of the entry (read bounded, through no link)
    once it is asked for, with its functions' sections and offsets."""

    def __init__(self, entry: Path, temp: Path, objdump: str | None) -> None:
        self.entry, self.temp, self.objdump = entry, temp, objdump
        order = read_modules_order(entry) or ""
        self.files = {PurePosixPath(name).stem.replace("-", "_"): name for name in module_files(order)}
        self.loaded: dict[str, tuple[Path, dict[str, tuple[str, int]]] | None] = {}

    def place(self, module: str, function: str) -> tuple[Path, str, int] | None:
        """The module's copy, and the section and offset of `function` in it; None when unknown."""
        if module not in self.loaded:
            self.loaded[module] = self._load(module)
        loaded = self.loaded[module]
        if loaded is None or function not in loaded[1]:
            return None
        copy, functions = loaded
        return copy, *functions[function]

    def _load(self, module: str) -> tuple[Path, dict[str, tuple[str, int]]] | None:
        name = self.files.get(module)
        if name is None or self.objdump is None:  # without objdump, its .ko would be read for nothing
            return None
        data = read_inside(self.entry, name, MODULE_BYTES)
        if data is None:
            return None
        copy = self.temp / f"{module}.ko"
        copy.write_bytes(data)
        try:
            table = subprocess.run([self.objdump, "-t", str(copy)], capture_output=True, text=True,
                                   errors="replace", timeout=ADDR2LINE_SECONDS).stdout  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return None
        functions: dict[str, tuple[str, int]] = {}
        for found in map(_SECTION_SYMBOL.match, table.splitlines()[:1_000_000]):
            if found:
                functions[found[3]] = (found[2], int(found[1], 16))
        return copy, functions


def system_map(data: bytes) -> dict[str, list[int]]:
    """Each text symbol's addresses (a static function's name may be taken more than once)."""
    symbols: dict[str, list[int]] = {}
    for line in data.decode(errors="replace").splitlines():
        found = _SYMBOL.match(line)
        if found:
            symbols.setdefault(found[2], []).append(int(found[1], 16))
    return symbols


def _tree_of(entry: Path) -> str:
    """The build tree's path, from the entry's metadata: addr2line names files under it."""
    try:
        metadata = json.loads(read_regular(entry / "metadata.json", 1024 * 1024) or b"{}")
    except ValueError:
        return ""
    tree = metadata.get("tree") if isinstance(metadata, dict) else None
    return tree if isinstance(tree, str) else ""


def unpack(packed: Path, out: Path) -> bool:
    """Decompress with zstd into `out`, stopping at VMLINUX_BYTES."""
    fd = os.open(packed, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as source, open(out, "wb") as sink:
        zstd = subprocess.Popen(["zstd", "-d", "-q", "-c"], stdin=source, stdout=subprocess.PIPE)
        assert zstd.stdout is not None
        written = 0
        while chunk := zstd.stdout.read(1024 * 1024):
            written += len(chunk)
            if written > VMLINUX_BYTES:
                zstd.kill()
                zstd.wait()
                return False
            sink.write(chunk)
        return zstd.wait() == 0


def _decoded(
    frames: tuple[Frame, ...], symbols: dict[str, list[int]], tool: str, vmlinux: Path, tree: str, modules: Modules
) -> Iterator[Frame]:
    """Each frame with its file and line; a frame with functions inlined at its address becomes several, the
    innermost first (the last is the printed function itself)."""
    # Frame index → its address, by where the address is: vmlinux (section ""), or a module's section.
    wanted: dict[tuple[Path, str], dict[int, int]] = {}
    for index, frame in enumerate(frames):
        offset = int(frame.offset.split("/")[0], 16) - (0 if frame.at_fault else 1)
        if frame.module:
            if (place := modules.place(frame.module, frame.function)) is not None:
                copy, section, start = place
                wanted.setdefault((copy, section), {})[index] = start + offset
        elif (start := _unique(symbols.get(frame.function, []))) is not None:
            wanted.setdefault((vmlinux, ""), {})[index] = start + offset
    found: dict[int, list[tuple[str, str, int]]] = {}  # frame index → its places
    for (binary, section), addresses in wanted.items():
        lines = _addr2line(tool, binary, list(addresses.values()), section)
        found.update({index: lines.get(address, []) for index, address in addresses.items()})
    for index, frame in enumerate(frames):
        places = found.get(index, [])
        if not places:
            yield frame
            continue
        for depth, (function, file, line) in enumerate(places):
            inlined = depth < len(places) - 1
            name = function if inlined else frame.function
            yield replace(frame, function=name, file=_in_tree(file, tree), line=line, inlined=inlined)


def _unique(addresses: list[int]) -> int | None:
    return addresses[0] if len(set(addresses)) == 1 else None


def _addr2line(
    tool: str, binary: Path, addresses: list[int], section: str = ""
) -> dict[int, list[tuple[str, str, int]]]:
    """addr2line -f -i -a: per address (in `section`, when given), the functions and places, the innermost inlined
    one first."""
    argv = [tool, "-e", str(binary), *(["-j", section] if section else []), "-f", "-i", "-a"]
    argv += [f"{a:#x}" for a in addresses]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=ADDR2LINE_SECONDS)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found: dict[int, list[tuple[str, str, int]]] = {}
    current: list[tuple[str, str, int]] | None = None
    lines = done.stdout.splitlines()[: 64 * (len(addresses) + 1)]
    index = 0
    while index < len(lines):
        line = lines[index]
        if re.fullmatch(r"0x[0-9a-f]{1,16}", line):
            current = found.setdefault(int(line, 16), [])
            index += 1
            continue
        place = _LOCATION.match(lines[index + 1]) if index + 1 < len(lines) else None
        if current is not None and place and int(place["line"]) > 0 and len(current) < 16:
            current.append((printable(line)[:200], printable(place["file"]), int(place["line"])))
        index += 2
    return {address: places for address, places in found.items() if places}


def _in_tree(file: str, tree: str) -> str:
    """A path as the kernel tree names it. addr2line joins the object's compile directory to its file name, and
    through ccache (hash_dir off) that directory is the tree that compiled the object first, maybe another one:
    this build's tree is dropped, else a vngtasks work tree's (`…/linux/`, then a top-level directory of the
    kernel's); else the path stays as it is."""
    file = file.removeprefix("./")  # a module's objects name their files relative to the tree
    if tree and file.startswith(tree.rstrip("/") + "/"):
        return file[len(tree.rstrip("/")) + 1 :]
    found = re.search(rf"/linux/(?=(?:{'|'.join(_TOP_DIRS)})/)", file)
    return file[found.end() :] if found else file
