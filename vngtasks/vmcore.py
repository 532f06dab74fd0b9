"""The guest's memory when a run fails (the `vmcore` setting, `on-failure`), for drgn.

QEMU listens for QMP on a socket in the run directory (the host's alone). On a panic, a boot timeout or a
run timeout, before the VM is stopped, vngtasks asks it for `dump-guest-memory` into a file that vngtasks
created itself in log-dir (a new file, created exclusively: never a link the guest placed there) and handed
to QEMU over the socket (`getfd`): QEMU opens no path of ours. The guest kernel tells QEMU where its
VMCOREINFO is through QEMU's vmcoreinfo device (fw_cfg: CONFIG_FW_CFG_SYSFS, and CONFIG_PROC_KCORE, which
selects VMCORE_INFO; the tiny base has both), so the dump carries it and drgn finds the kernel in it. A
panicking guest waits (panic=0) instead of ending the VM, so there is something to dump.

When the run is published, the dump becomes log-dir/vmcore, and the kernel entry's debug info
(`vmlinux.zst`) is unpacked beside it as log-dir/vmlinux: `drgn -c vmcore -s vmlinux` opens both.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO

from . import log
from .files import human_size
from .report.symbolize import VMLINUX_BYTES, unpack

ON_FAILURE = "on-failure"
QMP_SOCKET = "qmp.sock"  # in the run directory
VMCORE = "vmcore"  # in log-dir
VMLINUX = "vmlinux"  # in log-dir, beside it
# ELF: what QEMU 7.2 (Debian 12's) writes that drgn reads with no converter (its kdump formats are makedumpfile's
# flattened ones). ELF is as large as the guest's memory; keep `memory` small where dumps are wanted.
FORMAT = "elf"
SOCKET_PATH_BYTES = 107  # sun_path's 108, less its NUL
DUMP_SECONDS = 600.0  # the dump of a few GiB to a slow disk
REPLY_BYTES = 64 * 1024  # a QMP reply line read back, at most


class QmpError(Exception):
    """QEMU said no, or said something that is not QMP."""


def dump(qmp_socket: Path, log_dir: Path, seconds: float = DUMP_SECONDS) -> Path | None:
    """The guest's memory dumped by QEMU into a new hidden file in `log_dir` (published later as VMCORE);
    None, with one warning, when QEMU could not."""
    fd, temp = tempfile.mkstemp(prefix=f".{VMCORE}-", dir=log_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qmp:
            qmp.settimeout(seconds)
            qmp.connect(str(qmp_socket))
            replies = qmp.makefile("rb")
            _reply(replies, greeting=True)
            _ask(qmp, replies, {"execute": "qmp_capabilities"})
            getfd = json.dumps({"execute": "getfd", "arguments": {"fdname": VMCORE}}).encode()
            qmp.sendmsg([getfd], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            _reply(replies)
            arguments = {"paging": False, "protocol": f"fd:{VMCORE}", "format": FORMAT}
            _ask(qmp, replies, {"execute": "dump-guest-memory", "arguments": arguments})
        ours, there = os.fstat(fd), os.lstat(temp)  # a guest that is not halted may have swapped the name
        if (ours.st_dev, ours.st_ino) != (there.st_dev, there.st_ino):
            raise QmpError(f"{temp} was replaced while QEMU wrote it")
    except (OSError, QmpError, ValueError) as error:
        os.close(fd)
        Path(temp).unlink(missing_ok=True)
        log.warn(f"vmcore: QEMU did not dump the guest's memory: {log.printable(str(error))[:300]}")
        return None
    os.close(fd)
    return Path(temp)


def _ask(qmp: socket.socket, replies: BinaryIO, command: dict[str, object]) -> None:
    qmp.sendall(json.dumps(command).encode())
    _reply(replies)


def _reply(replies: BinaryIO, greeting: bool = False) -> dict[str, object]:
    """The next reply (or the greeting), past any events; QmpError for an error or anything not QMP."""
    while True:
        line = replies.readline(REPLY_BYTES)
        if not line.endswith(b"\n"):
            raise QmpError("QEMU closed the QMP socket" if not line else "a QMP reply too long")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QmpError("not a QMP message")
        if "event" in message:
            continue
        if "error" in message:
            error = message["error"]
            raise QmpError(str(error.get("desc", error)) if isinstance(error, dict) else str(error))
        if ("QMP" if greeting else "return") not in message:
            raise QmpError("not the QMP reply expected")
        return message


def publish(log_dir: Path, dumped: Path | None, kernel: Path) -> bool:
    """This run's dump into log-dir as VMCORE, with the kernel's vmlinux beside it as VMLINUX (renamed over
    whatever was there: another run's, or a link); without a dump, both removed (another run's would be taken
    for this one's). Whether there is a vmcore."""
    if dumped is None:
        for name in (VMCORE, VMLINUX):
            (log_dir / name).unlink(missing_ok=True)
        return False
    os.replace(dumped, log_dir / VMCORE)
    size = human_size((log_dir / VMCORE).stat().st_size)
    if _vmlinux_beside(log_dir, kernel):
        core, vmlinux = log_dir / VMCORE, log_dir / VMLINUX
        log.info(f"vmcore: {core} ({size}) and {vmlinux}: drgn -c {core} -s {vmlinux}")
    else:
        (log_dir / VMLINUX).unlink(missing_ok=True)
        log.warn(f"vmcore: {log_dir / VMCORE} ({size}); no vmlinux for it: the kernel is not a vngtasks build with "
                 "CONFIG_DEBUG_INFO (drgn needs the kernel's debug info)")  # fmt: skip
    return True


def _vmlinux_beside(log_dir: Path, kernel: Path) -> bool:
    """The entry's vmlinux.zst unpacked into log-dir as VMLINUX; False when it has none or it does not unpack."""
    packed = kernel / "vmlinux.zst"
    if not kernel.is_dir() or packed.is_symlink() or not packed.is_file():
        return False
    fd, temp = tempfile.mkstemp(prefix=f".{VMLINUX}-", dir=log_dir)
    os.close(fd)
    with contextlib.ExitStack() as on_failure:
        on_failure.callback(Path(temp).unlink, missing_ok=True)
        if not unpack(packed, Path(temp)):
            log.warn(f"vmcore: {packed} did not decompress (zstd), or to more than {VMLINUX_BYTES // 2**30} GiB")
            return False
        os.chmod(temp, 0o644)
        os.replace(temp, log_dir / VMLINUX)
        on_failure.pop_all()
    return True


def socket_fits(path: Path) -> bool:
    """Whether QEMU can listen on a unix socket at `path` (sun_path holds 107 bytes and a NUL)."""
    return len(os.fsencode(path)) <= SOCKET_PATH_BYTES
