"""The VM's last guard: it stops vng's whole session and removes the run's leftovers when `invoke boot` dies,
however it dies: SIGKILL too, where no `finally` of ours runs. And the run directory's lock, by which a later
boot or prune sweeps away what a run that is over left (one whose guard died with it).

The guard is a process of its own, started before vng in a session of its own (a signal to invoke's process
group does not reach it), that blocks reading a pipe whose other end only invoke holds; the kernel closes that
end when invoke ends, whatever ends it. It then stops every process of vng's session (vng, virtme-run, QEMU,
virtiofsd) and removes the run directory. vng itself dies with invoke (PR_SET_PDEATHSIG, see supervise.py), in
case invoke is killed before it has told the guard vng's session. When invoke ends normally it has done all
this itself, and the guard finds nothing left to do.

Stdlib only, and nothing of vngtasks but files.py: the guard starts on every boot.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .files import remove_empty_dirs, remove_tree

POLL_SECONDS = 0.1
RUNS = "runs"  # under cache-dir: one directory per run, and its lock beside it
LOCK_SUFFIX = ".lock"
UNLOCKED_RUN_SECONDS = 24 * 3600
TERM_SECONDS = 3.0  # from SIGTERM to SIGKILL
ORDER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Leftovers:
    """What a run leaves on the host until it is removed."""

    run_dir: Path
    mountpoints: tuple[Path, Path] | None = None  # a foreign root's empty directories: from [0] up to [1]

    def remove(self) -> None:
        remove_tree(self.run_dir)
        self.run_dir.with_name(self.run_dir.name + LOCK_SUFFIX).unlink(missing_ok=True)  # see held()
        if self.mountpoints is not None:
            remove_empty_dirs(*self.mountpoints)


@contextlib.contextmanager
def held(run_dir: Path) -> Iterator[None]:
    """The run's lock held while the run lives: `runs/<id>.lock` beside its directory, taken before the
    directory is made. A sweep removes a run directory only when its lock is free: that run is over."""
    lock = run_dir.with_name(run_dir.name + LOCK_SUFFIX)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def sweep(runs: Path) -> list[Path]:
    """Remove the run directories of runs that are over (an invoke killed with its guard, a machine that went
    down): those whose lock is free, and those with no lock older than a day (made before runs had locks)."""
    removed = []
    try:
        found = list(runs.iterdir())
    except OSError:
        return removed
    for path in found:
        if path.name.endswith(LOCK_SUFFIX) or not path.is_dir() or path.is_symlink():
            continue
        lock = path.with_name(path.name + LOCK_SUFFIX)
        if _over(lock) or (not lock.exists() and time.time() - path.stat().st_mtime > UNLOCKED_RUN_SECONDS):
            Leftovers(path).remove()
            lock.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _over(lock: Path) -> bool:
    """The run of this lock file has ended (nothing holds it)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


class Guard:
    """The guard process of one run (see the module's text); `watch` names vng's session, `close` ends it."""

    def __init__(self, leftovers: Leftovers) -> None:
        self.leftovers = leftovers
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vngtasks.reaper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )

    def watch(self, session: int) -> None:
        """vng's session (its pid), and when its leader started: a later session reusing the number is not ours."""
        order = {
            "session": session,
            "started": start_time(session),
            "run_dir": str(self.leftovers.run_dir),
            "mountpoints": [str(p) for p in self.leftovers.mountpoints] if self.leftovers.mountpoints else None,
        }
        assert self.process.stdin is not None
        with contextlib.suppress(OSError):  # the guard is gone (killed): the run goes on unguarded
            self.process.stdin.write(json.dumps(order).encode() + b"\n")
            self.process.stdin.flush()

    def close(self) -> None:
        """After invoke has stopped the session and removed the leftovers itself: the guard checks, and ends."""
        assert self.process.stdin is not None
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat's 22nd field); None: no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])


def session_members(sid: int) -> Iterable[int]:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command name: state, ppid, pgrp, session; zombies are already gone.
        if fields[0] != "Z" and int(fields[3]) == sid:
            yield int(stat.parent.name)


def stop_session(sid: int, reap: Callable[[], object] = lambda: None) -> None:
    """SIGTERM to every process of session `sid` (even ones that left its group), SIGKILL to what is left after
    TERM_SECONDS; `reap` collects a member that is our own child, so it does not linger as a zombie."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        members = list(session_members(sid))
        if not members:
            break
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + TERM_SECONDS
        while time.monotonic() < deadline and any(session_members(sid)):
            reap()
            time.sleep(POLL_SECONDS)
    reap()


def main() -> None:
    """The guard: read the order, wait for invoke's end of the pipe to close, then stop and remove."""
    line = sys.stdin.buffer.readline(ORDER_BYTES)
    try:
        order = json.loads(line)
    except ValueError:  # invoke ended before it named vng's session: vng died with it (PR_SET_PDEATHSIG)
        return
    while sys.stdin.buffer.read(ORDER_BYTES):
        pass
    session = int(order["session"])
    leader = start_time(session)
    if leader is None or leader == order["started"]:  # the leader gone, its members keep the number in use
        stop_session(session)
    mountpoints = order.get("mountpoints")
    Leftovers(Path(order["run_dir"]), (Path(mountpoints[0]), Path(mountpoints[1])) if mountpoints else None).remove()


if __name__ == "__main__":
    main()
