"""What this host can run, probed once per boot of the host and kept in `cache-dir/host-probes.json`.

- KVM, per guest arch: `accel.kvm_problem` (a firmware-sized probe guest).
- virtiofsd: vng shares directories through the first virtiofsd on its list (VIRTIOFSD_PATHS) that
  answers `--version`, started with the Rust daemon's flags. Where that is QEMU's old C daemon
  (Debian 12's /usr/lib/qemu/virtiofsd, which answers `--version` to root), it never starts and vng
  sleeps 0.1+0.2+0.4+0.8+1.6 s per shared directory before falling back to 9p; vngtasks then asks
  for 9p at once (`--force-9p`).

The file is ours, but only trusted for the boot it names (`/proc/sys/kernel/random/boot_id`) and
re-probed when it cannot be read; a probe is cheap, the file only saves doing it on every run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .arches import Arch
from .files import write_atomically

PROBES_FILE = "host-probes.json"
LOCK_SUFFIX = ".lock"  # the file's lock beside it: its writers take turns
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# Where vng looks for virtiofsd, in its order (virtme/commands/run.py, VirtioFS._get_virtiofsd_path);
# `None` stands for `virtiofsd` on the PATH, after the copy shipped with virtme-ng's guest tools.
VIRTIOFSD_PATHS: tuple[str | None, ...] = (
    None,
    "/usr/libexec/virtiofsd",
    "/usr/lib/virtiofsd/virtiofsd",
    "/usr/lib/virtiofsd",
    "/usr/lib/qemu/virtiofsd",
)
RUST_VIRTIOFSD_FLAG = "--shared-dir"  # in the Rust daemon's --help; the C one takes `-o source=`
PROBE_SECONDS = 5


@dataclass(frozen=True)
class Virtiofsd:
    path: str  # empty: none found
    usable: bool  # vng can start it (the Rust daemon)


def virtiofsd_candidates(guest_tools: Path | None, path_env: str) -> list[str]:
    found = [str(guest_tools / "bin" / "virtiofsd")] if guest_tools else []
    for candidate in VIRTIOFSD_PATHS:
        where = shutil.which("virtiofsd", path=path_env) if candidate is None else candidate
        if where:
            found.append(where)
    return found


def vng_virtiofsd(candidates: list[str]) -> Virtiofsd:
    """The virtiofsd vng would pick from `candidates`, and whether vng can start it."""
    for path in candidates:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        if _answers(path, "--version") is None:
            continue
        return Virtiofsd(path, RUST_VIRTIOFSD_FLAG in (_answers(path, "--help") or ""))
    return Virtiofsd("", False)


def _answers(path: str, flag: str) -> str | None:
    """What `path flag` prints, or None when it fails."""
    try:
        done = subprocess.run(
            [path, flag], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=PROBE_SECONDS, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout + done.stderr if done.returncode == 0 else None


def guest_tools() -> Path | None:
    """virtme-ng's guest tools directory, found without importing virtme-ng."""
    import importlib.util

    spec = importlib.util.find_spec("virtme")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return next((Path(p) / "guest" for p in locations if (Path(p) / "guest").is_dir()), None)


def runs_here(binary: Path, host: Arch) -> bool:
    """Whether an ELF `binary` is built for the host's arch (its header's e_machine, in its byte order)."""
    try:
        with open(binary, "rb") as elf:
            header = elf.read(20)
    except OSError:
        return False
    if len(header) < 20 or header[:4] != b"\x7fELF" or header[5] not in (1, 2):
        return False
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big") == host.elf_machine


def virtme_ng_init_runs(guest: Arch) -> bool:
    """vng boots a guest with virtme-ng-init from its guest tools, whatever arch that binary is for
    (the PyPI wheel ships an x86-64 one): true when it can run in a guest of `guest`'s arch."""
    tools = guest_tools()
    return tools is not None and runs_here(tools / "bin" / "virtme-ng-init", guest)


class HostProbes:
    """The probes' answers for this boot of the host, read from and written to one JSON file."""

    def __init__(self, cache_dir: Path, *, write: bool = True) -> None:
        self.path = cache_dir / PROBES_FILE
        self.write = write  # a dry run reads the file and writes nothing
        self.boot_id = _boot_id()
        self.answers = self._load()

    def _load(self) -> dict[str, object]:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and data.get("boot_id") == self.boot_id and self.boot_id:
                return data
        return {"boot_id": self.boot_id}

    def kvm_problem(self, arch: Arch) -> str | None:
        from . import accel

        key = f"kvm-{arch.name}"
        answer = self._answer(key, lambda known: isinstance(known, str | None), lambda: accel.kvm_problem(arch))
        return answer if isinstance(answer, str) else None

    def kvm_failed(self, arch: Arch, error: str) -> None:
        """A real guest failed under KVM after the probe guest ran: KVM is unusable for this host boot."""
        self._remember(f"kvm-{arch.name}", f"a guest stopped under KVM after the probe guest ran: {error}")

    def known_kvm_problem(self, arch: Arch) -> str | None:
        """The kept answer for KVM, else whether /dev/kvm opens, without starting a probe guest (a dry run)."""
        key = f"kvm-{arch.name}"
        if key in self.answers:
            answer = self.answers[key]
            return answer if isinstance(answer, str) else None
        from . import accel

        return accel.device_problem()

    def force_9p(self, path_env: str) -> bool:
        """True when vng would wait for a virtiofsd that cannot start (or has none to try)."""

        def probe() -> dict[str, object]:
            found = vng_virtiofsd(virtiofsd_candidates(guest_tools(), path_env))
            return {"path": found.path, "usable": found.usable}

        answer = self._answer("virtiofsd", lambda known: isinstance(known, dict), probe)
        return not (isinstance(answer, dict) and answer.get("usable") is True)

    def _answer(self, key: str, valid: Callable[[object], bool], probe: Callable[[], object]) -> object:
        """The answer kept for `key` when `valid`, else probed and kept. The file's lock is held while probing: boots
        at once (a matrix's, or invocations side by side) wait for one probe and take its answer."""
        if key in self.answers and valid(self.answers[key]):
            return self.answers[key]
        with self._locked():
            self._read_again()
            if key not in self.answers or not valid(self.answers[key]):
                self.answers[key] = probe()
                self._write()
        return self.answers[key]

    def _remember(self, key: str, value: object) -> None:
        """`value` kept for `key`, over the file as it is now: what others wrote since this one read it stays."""
        with self._locked():
            self._read_again()
            self.answers[key] = value
            self._write()

    def _read_again(self) -> None:
        self.answers = {**self.answers, **self._load()}

    def _write(self) -> None:
        if not self.write:
            return
        with contextlib.suppress(OSError):  # a cache we cannot write only costs a probe next time
            write_atomically(self.path, json.dumps(self.answers, indent=2, sort_keys=True))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The file's lock (`host-probes.json.lock` beside it, flocked) held. None taken for a dry run, which writes
        nothing, nor where cache-dir cannot be written (then, as ever, a probe may be done twice)."""
        fd = None
        if self.write:
            with contextlib.suppress(OSError):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                lock = self.path.with_name(PROBES_FILE + LOCK_SUFFIX)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            if fd is not None:
                os.close(fd)


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""
