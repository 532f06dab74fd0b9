"""Exit statuses and the one exception type the tasks turn into them."""

from __future__ import annotations

import signal

FAILED = 1  # deps could not install, a ref did not resolve, a build failed
BAD_INPUT = 2  # a setting or flag is wrong; nothing was touched
SPLAT = 123  # the workload passed but the guest kernel logged a splat (splat-check)
TIMEOUT = 124  # run-timeout expired; the VM was killed
NO_STATUS = 125  # the VM never reported the workload's status (panic, stall, no boot, boot-timeout)
MISSING_TOOL = 127  # a program we need is not installed
# A run stopped by one of these exits 128 + its number, after its VM and run directory are gone.
STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Failure(Exception):
    """A run that cannot go on: `str(self)` is one line for the user, `code` the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Unreachable(Failure):
    """A build host that could not be reached (connect, host key, auth) or whose connection was lost: the commit it
    was to build is not to blame, so a matrix or a bisect does not count it against the commit."""

    def __init__(self, message: str) -> None:
        super().__init__(message, FAILED)


NO_SPACE = "No space left on device"  # what git, tar, make and the kernel say for ENOSPC


def no_space(*outputs: str) -> bool:
    """A command's output says the disk it wrote to is full."""
    return any(NO_SPACE in output for output in outputs)
