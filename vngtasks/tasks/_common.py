"""What every task does first: settings in, errors out as exit statuses."""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence

from invoke import Context, Task, task
from invoke.exceptions import Exit

from ..errors import BAD_INPUT, Failure
from ..settings import HELP, InputError, Settings, resolve

# The settings each task takes as flags (all of them are read from config and env either way).
BUILD_SETTINGS = (
    "tag", "kernel_url", "name", "version", "kconfig", "kconfig_base", "arch", "cc", "llvm",
    "kernel_compile_cache", "vmlinux_h", "cache_dir", "build_host", "build_host_accept_new",
)  # fmt: skip
BOOT_SETTINGS = (
    "kernel", *BUILD_SETTINGS, "accel", "cpus", "memory", "network", "verbose", "append", "qemu_opts",
    "run_timeout", "boot_timeout", "workspace_rw", "extra_rwdirs", "log_dir", "splat_check", "splat_allow",
)  # fmt: skip


def settings_task(*names: str) -> Callable[[Callable[..., object]], Task]:
    """An invoke task whose flags are these settings (`body(c, **flags)`): help text from the one
    table, no short flags. invoke reads the flags from the signature this sets on `body`."""

    def wrap(body: Callable[..., object]) -> Task:
        keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
        parameters = [inspect.Parameter("c", keyword), *(inspect.Parameter(n, keyword, default=None) for n in names)]
        body.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        return task(auto_shortflags=False, help={name: HELP[name] for name in names})(body)

    return wrap


def settings(c: Context, **flags: object) -> Settings:
    """Settings from invoke's layered config (`vng.*`) with this task's flags on top."""
    try:
        return resolve(c.config.vng, flags)
    except InputError as error:
        raise Exit(f"vngtasks: {error}", code=BAD_INPUT) from None


def remainder(argv: Sequence[str] = sys.argv) -> str:
    """The text after the first `--`, joined by spaces as invoke itself does."""
    args = list(argv[1:])
    return " ".join(args[args.index("--") + 1 :]) if "--" in args else ""


@contextlib.contextmanager
def exit_statuses() -> Iterator[None]:
    try:
        yield
    except Failure as failure:
        raise Exit(f"vngtasks: {failure}", code=failure.code) from None
