"""A foreign architecture's guest root and distro kernel, made from its Debian packages without running them.

Owns: the packages a guest root holds (bash for vng's shell init and the workload, busybox-static for
every other command), a private apt state per architecture under cache-dir (its own package lists and
downloads, apt told the architecture: the host's dpkg database is never read or changed, no
foreign binary runs), a root's cache key (the arch and the exact file of every package), and making a
root or a kernel tree once: each package unpacked with `dpkg-deb -x` into a temporary directory
renamed into place, reused after. The distro kernel tree has `boot/vmlinu?-V` beside `lib/modules/V`,
where vng finds the modules of the image it is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from . import log, render
from .arches import Arch
from .errors import BAD_INPUT, FAILED, Failure
from .files import create_inside, open_dir_inside, read_regular, remove_empty_dirs, remove_tree, write_atomically

# bash for vng's shell init (virtme/guest/virtme-init) and the workload; every other command, vng's initramfs and
# init=/bin/sh included, is an applet of busybox-static. Under TCG a dynamically linked command costs about a
# second to start on s390x (coreutils' made a boot there take 131 s; busybox's, 22 s).
GUEST_PACKAGES = ("bash", "busybox-static")
# What packages' maintainer scripts would make (they never run here): vng's init reads the users, and
# mounts its overlays on these directories.
ROOT_FILES = {"etc/passwd": "root:x:0:0:root:/root:/bin/bash\n", "etc/group": "root:x:0:\n"}
ROOT_DIRS = ("opt", "srv", "root", "tmp", "run")
# udev's part in vng's shell init, which runs `udevd --daemon` and `udevadm trigger|settle` when it finds them:
# both name the virtio serial ports (/dev/virtio-ports/virtme.stdout, ...) as udev's rule does, so that the
# workload's stdout and stderr reach the host's apart, not mixed into the console. Nothing else of udev's.
STAND_INS = ("sbin/udevd", "sbin/udevadm")
BUSYBOX = "bin/busybox"
BUSYBOX_BYTES = 64 * 1024 * 1024  # busybox-static is about 2 MiB
# Part of every root's key: a root made by an older finish_root is not reused.
ROOT_LAYOUT = 4
# Where scripts' #! lines look for a command outside /bin: `#!/usr/bin/env bash` is virtme-init's.
SHEBANG_PATHS = ("usr/bin/env",)
# busybox's table of its applets' names: "[", "[[", then the rest in sorted order, NUL-separated.
_APPLET_TABLE_START = b"[\0[[\0"
_APPLET_NAME = re.compile(rb"[a-z0-9][a-z0-9_.-]*")
UPDATE_TRIES = 2
RETRY_DELAY_SECONDS = 5.0
ROOTS = "guest-roots"
KERNELS = "distro-kernels"
# apt-get --print-uris: 'URL' FILE SIZE HASH, one package a line (no HASH for Debian's signed kernels).
_URI = re.compile(r"^'(?P<url>[^']+)' (?P<file>\S+\.deb) (?P<size>\d+) ?(?P<hash>\S*)$", re.MULTILINE)
_APT_PACKAGE = re.compile(r"^E: (?:Unable to locate package|Package) '?([A-Za-z0-9.+:=~_-]+)", re.MULTILINE)


@dataclass(frozen=True)
class Deb:
    """One package file apt would fetch: `name_version_arch.deb` and its checksum."""

    url: str
    file: str
    hash: str

    @property
    def name(self) -> str:
        return self.file.split("_")[0]

    @property
    def version(self) -> str:
        return unquote(self.file.split("_")[1])


def refused(arch: Arch) -> str | None:
    """Why no guest root can be made for `arch` here (None: one can)."""
    if not arch.debian_userland:
        return f"arch: Debian 12 has no {arch.name} userland to make a guest root from: no {arch.name} guest boots here"
    return None


def packages(arch: Arch) -> list[str]:
    """The packages of a guest root, named for apt with the arch: `bash:arm64`."""
    return [f"{name}:{arch.dpkg_arch}" for name in GUEST_PACKAGES]


def parse_uris(text: str) -> list[Deb]:
    """The package files of `apt-get --print-uris` output, sorted by file name."""
    return sorted((Deb(m["url"], m["file"], m["hash"]) for m in _URI.finditer(text)), key=lambda deb: deb.file)


def root_key(arch: Arch, debs: list[Deb]) -> str:
    """The cache key of a root: its arch and a digest of its layout and the exact file (name, version, checksum)
    of every package."""
    files = "".join(f"{deb.file} {deb.hash}\n" for deb in sorted(debs, key=lambda d: d.file))
    digest = hashlib.sha256(f"layout {ROOT_LAYOUT}\n{files}".encode())
    return f"{arch.name}-{digest.hexdigest()[:16]}"


class Apt:
    """apt-get with a private state for one architecture under cache-dir (lists, downloads)."""

    def __init__(self, cache_dir: Path, arch: Arch) -> None:
        self.arch = arch
        self.state = cache_dir / "apt-guest" / arch.dpkg_arch
        self.updated = False  # the lists are fetched once per Apt

    def argv(self, *command: str) -> list[str]:
        return render.argv("apt-guest.argv.j2", arch=self.arch, state=self.state, command=list(command))

    def run(self, *command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        for sub in ("lists/partial", "archives/partial"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
        return subprocess.run(self.argv(*command), cwd=cwd, env=env, capture_output=True, text=True, check=False)

    def update(self) -> None:
        """Fetch this arch's package lists; a failure (a mirror syncing one index) is retried, then, when
        lists are there from this try or an earlier one, only warned about."""
        if self.updated:
            return
        self.updated = True
        problem = ""
        for attempt in range(1, UPDATE_TRIES + 1):
            result = self.run("update")
            if result.returncode == 0:
                return
            problem = _last_error(result)
            log.warn(f"guest root: apt-get update for {self.arch.dpkg_arch}: try {attempt}/{UPDATE_TRIES}: {problem}")
            if attempt < UPDATE_TRIES:
                time.sleep(RETRY_DELAY_SECONDS)
        if not any((self.state / "lists").glob("*_Packages*")):
            raise Failure(f"guest root: no {self.arch.dpkg_arch} package lists: {problem}", FAILED)
        log.warn(f"guest root: going on with the {self.arch.dpkg_arch} package lists that did download")

    def plan(self, names: list[str]) -> list[Deb]:
        """Every package file `names` need, with their dependencies, as if nothing were installed."""
        with tempfile.TemporaryDirectory(prefix="vngtasks-apt-") as empty:  # apt lists only files it lacks
            (Path(empty) / "partial").mkdir()
            result = self.run("-oDir::Cache::Archives=" + empty, "--print-uris", "install", *names)
        if result.returncode != 0:
            raise Failure(f"guest root: {_named(result, names)}", FAILED)
        return parse_uris(result.stdout)

    def download(self, debs: list[Deb]) -> list[Path]:
        """The package files, from the private archive or fetched into it."""
        archives = self.state / "archives"
        wanted = [f"{deb.name}:{self.arch.dpkg_arch}={deb.version}" for deb in debs]
        if not all((archives / deb.file).is_file() for deb in debs):
            result = self.run("download", *wanted, cwd=archives)
            if result.returncode != 0:
                raise Failure(f"guest root: {_named(result, wanted)}", FAILED)
        return [archives / deb.file for deb in debs]


def _last_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.startswith("E: ")]
    return lines[0][3:] if lines else f"exit status {result.returncode}"


def _named(result: subprocess.CompletedProcess[str], asked: list[str]) -> str:
    """apt's failure, naming the package at fault where apt does."""
    named = _APT_PACKAGE.findall(result.stderr + result.stdout)
    if named:
        return f"package {', '.join(dict.fromkeys(named))}: {_last_error(result)}"
    return f"apt-get failed for {' '.join(asked)}: {_last_error(result)}"


def busybox_applets(binary: bytes) -> list[str]:
    """The applets a busybox binary holds, read from its table of names without running it (it is not
    the host's arch). Raises ValueError when the table is not there exactly once."""
    if binary.count(_APPLET_TABLE_START) != 1:
        raise ValueError("no table of applet names")
    names = ["[", "[["]
    table = binary[binary.index(_APPLET_TABLE_START) + len(_APPLET_TABLE_START) :]
    for raw in table.split(b"\0"):
        if not _APPLET_NAME.fullmatch(raw) or raw.decode() <= names[-1]:
            break  # past the table's end: the names are sorted
        names.append(raw.decode())
    return names


def finish_root(tree: Path) -> None:
    """What a root needs that no package holds (see ROOT_FILES), and busybox's applets as commands in bin/
    where no package has put one."""
    for name in ROOT_DIRS:
        with _made_inside(name):
            os.close(open_dir_inside(tree, (name,)))
    for name, text in ROOT_FILES.items():  # a package's file at `name` wins
        with _made_inside(name):
            create_inside(tree, name, text.encode(), 0o644)
    for name in STAND_INS:
        with _made_inside(name):
            create_inside(tree, name, render.text("virtio-ports.sh.j2", shell="/bin/sh").encode(), 0o755)
    busybox = read_regular(tree / BUSYBOX, BUSYBOX_BYTES)
    try:
        applets = busybox_applets(busybox or b"")
    except ValueError as problem:
        raise Failure(f"guest root: {BUSYBOX}: {problem}", FAILED) from None
    links = {f"bin/{name}": "busybox" for name in applets}  # names of [a-z0-9._-] (and "[", "[["): no "/"
    links.update({path: os.path.relpath(tree / BUSYBOX, (tree / path).parent) for path in SHEBANG_PATHS})
    for path, target in links.items():
        with _made_inside(path):
            create_inside(tree, path, link=target)


@contextlib.contextmanager
def _made_inside(path: str) -> Iterator[None]:
    """Making `path` in a root: a link a package placed on the way is never followed, and fails the root."""
    try:
        yield
    except OSError as problem:
        raise Failure(f"guest root: {path}: {problem.strerror}: nothing made through a link", FAILED) from None


def unpack_once(debs: list[Path], dest: Path, finish: Callable[[Path], None] | None = None) -> Path:
    """`debs` unpacked into `dest`, made whole in a temporary directory beside it and renamed there;
    an existing `dest` is reused as it is."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(temp)], check=True, capture_output=True)
        if finish:
            finish(temp)
        temp.chmod(0o755)
        os.rename(temp, dest)
    except OSError:
        if not dest.is_dir():
            raise
    except subprocess.CalledProcessError as failed:
        raise Failure(f"guest root: dpkg-deb -x {failed.cmd[2]}: {failed.stderr.decode().strip()}", FAILED) from None
    finally:
        remove_tree(temp)
    return dest


def _unpack_and_drop(debs: list[Path], dest: Path, finish: Callable[[Path], None] | None = None) -> None:
    """Unpacked once, the package files are not needed again (a new version makes a new tree)."""
    unpack_once(debs, dest, finish)
    for deb in debs:
        deb.unlink(missing_ok=True)


def current_root(cache_dir: Path, arch: Arch) -> Path | None:
    """The root `ensure_root` made last for `arch`, without asking apt (None: none yet)."""
    pointer = cache_dir / ROOTS / f"{arch.name}.current"
    if not pointer.is_file():
        return None
    root = cache_dir / ROOTS / pointer.read_text().strip()
    return root if root.is_dir() else None


def ensure_root(cache_dir: Path, arch: Arch, apt: Apt | None = None) -> Path:
    """The guest root of `arch` for today's package versions: made once, reused after."""
    if why := refused(arch):
        raise Failure(why, BAD_INPUT)
    apt = apt or Apt(cache_dir, arch)
    apt.update()
    debs = apt.plan(packages(arch))
    key = root_key(arch, debs)
    dest = cache_dir / ROOTS / key
    if not dest.is_dir():
        log.info(f"guest root: {len(debs)} {arch.dpkg_arch} packages into {dest}")
        _unpack_and_drop(apt.download(debs), dest, finish_root)
    write_atomically(cache_dir / ROOTS / f"{arch.name}.current", key + "\n")
    return dest


def root_for_boot(cache_dir: Path, arch: Arch) -> Path:
    """The root a boot of `arch` uses: the last one made, else one made now."""
    if why := refused(arch):
        raise Failure(why, BAD_INPUT)
    return current_root(cache_dir, arch) or ensure_root(cache_dir, arch)


def make_mountpoints(root: Path, dirs: list[Path]) -> None:
    """Empty directories in `root` where vng mounts the host's `dirs` at their own paths: the guest's root
    is read-only, so its init cannot make them. A path that would leave the root (through one of its
    symlinks, such as var/run -> /run) is refused."""
    for wanted in dirs:
        inside = root / wanted.relative_to("/")
        if not inside.resolve().is_relative_to(root.resolve()):
            raise Failure(f"guest root: {wanted} leads out of {root} there: it cannot be shared", BAD_INPUT)
        inside.mkdir(parents=True, exist_ok=True)


def remove_mountpoints(root: Path, made: Path, keep: Path) -> None:
    """After a boot, the empty directories `make_mountpoints` made in `root` for `made`, up to `keep` (not
    included): a run's own directory, so that runs leave none behind. The workspace's stay: another boot
    of the same root may be using them."""
    remove_empty_dirs(*run_mountpoints(root, made, keep))


def run_mountpoints(root: Path, made: Path, keep: Path) -> tuple[Path, Path]:
    """Where in `root` the mountpoints of `made` begin, and where their removal stops (see remove_mountpoints)."""
    return root / made.relative_to("/"), root / keep.relative_to("/")


def kernel_image(tree: Path) -> Path:
    """The one `boot/vmlinu[xz]-V` of an unpacked kernel package."""
    images = sorted((tree / "boot").glob("vmlinu[xz]-*"))
    if len(images) != 1:
        raise Failure(f"distro kernel: {tree}/boot holds {len(images)} kernel images, not one", FAILED)
    return images[0]


def unpacked_kernel(cache_dir: Path, arch: Arch) -> Path | None:
    """The image of Debian's kernel of `arch` unpacked last under cache-dir, without asking apt (None: none yet)."""
    trees = sorted((cache_dir / KERNELS).glob(f"linux-image-*_{arch.dpkg_arch}"), key=lambda tree: tree.stat().st_mtime)
    return kernel_image(trees[-1]) if trees else None


def ensure_kernel(cache_dir: Path, arch: Arch, apt: Apt | None = None) -> Path:
    """Debian's distro kernel of `arch`, unpacked once under cache-dir; returns its image."""
    if not arch.debian_kernel:
        raise Failure(f"distro kernel: Debian 12 has no {arch.name} kernel package", BAD_INPUT)
    apt = apt or Apt(cache_dir, arch)
    apt.update()
    meta = f"{arch.debian_kernel}:{arch.dpkg_arch}"
    images = [deb for deb in apt.plan([meta]) if deb.name.startswith("linux-image-") and deb.name != arch.debian_kernel]
    if len(images) != 1:
        raise Failure(f"distro kernel: package {meta} needs {len(images)} kernel images, not one", FAILED)
    dest = cache_dir / KERNELS / images[0].file.removesuffix(".deb")
    if not dest.is_dir():
        _unpack_and_drop(apt.download(images), dest)
    return kernel_image(dest)


def ensure_root_and_kernel(cache_dir: Path, arch: Arch) -> tuple[Path, Path]:
    """`invoke deps --arch`'s part: the guest root and Debian's kernel of `arch`, with one update of the lists."""
    apt = Apt(cache_dir, arch)
    return ensure_root(cache_dir, arch, apt), ensure_kernel(cache_dir, arch, apt)
