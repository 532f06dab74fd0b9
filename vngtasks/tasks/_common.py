"""What every task does first: settings in, errors out as exit statuses."""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from invoke import Context, Program, Task, task
from invoke.exceptions import Exit, ParseError, UnexpectedExit
from invoke.util import yaml

from ..errors import BAD_INPUT, FAILED, STOPPING_SIGNALS, Failure, no_space
from ..settings import BY_NAME, HELP, Settings, effective, taken_by
from ..validate import InputError

ENV_PREFIX = "INVOKE_VNG_"


def settings_task(
    name: str, switches: Mapping[str, str] | None = None, options: Mapping[str, str] | None = None
) -> Callable[[Callable[..., object]], Task]:
    """The invoke task `name`: its flags are the settings the table gives it (`body(c, **flags)`), with
    their help, plus `switches` (flag: help, off unless given) and `options` (flag: help, takes a value),
    which are not settings; no short flags. invoke reads the flags from the signature this sets on `body`."""
    names = taken_by(name)
    others = {**(switches or {}), **(options or {})}

    def wrap(body: Callable[..., object]) -> Task:
        keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
        flags = [inspect.Parameter(n, keyword, default=None) for n in [*names, *(options or {})]]
        flags += [inspect.Parameter(n, keyword, default=False) for n in switches or {}]
        body.__signature__ = inspect.Signature([inspect.Parameter("c", keyword), *flags])  # type: ignore[attr-defined]
        return task(name=name, auto_shortflags=False, help={**{n: HELP[n] for n in names}, **others})(body)

    return wrap


DRY_RUN = "print the commands it would run (git, make, vng), one line each, and run none: writes nothing"


WORKSPACE_CONFIG = "vngtasks.yaml"  # in the workspace: its `vng` section, as in an invoke.yaml
INVOKE_FILES = ("system", "user", "project", "runtime")  # the config files invoke may have read


def settings(c: Context, **flags: object) -> Settings:
    """Settings, weakest first: defaults, invoke.yaml files (system, user, this checkout's), the
    workspace's vngtasks.yaml, INVOKE_VNG_* env, a runtime config file (`invoke -f`), then this
    task's flags."""
    with exit_statuses():
        check_environment(os.environ)
        runtime = c.config._runtime.get("vng", {})  # `invoke -f FILE` / INVOKE_RUNTIME_CONFIG
        return effective(layered(c.config.vng, Path.cwd() / WORKSPACE_CONFIG, os.environ, runtime), flags)


def layered(
    config: Mapping[str, object],
    workspace_file: Path,
    environ: Mapping[str, str],
    runtime: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """invoke's `vng` config with the workspace file's values in, below the environment's and the
    runtime config file's (which invoke puts above the environment)."""
    merged = dict(config)
    for key, value in workspace_config(workspace_file).items():
        if ENV_PREFIX + key.upper() not in environ and key not in (runtime or {}):
            merged[key] = value
    return merged


def workspace_config(path: Path) -> dict[str, object]:
    """The `vng` section of the workspace's vngtasks.yaml (none: empty); a bad file is bad input."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as error:
        raise InputError(WORKSPACE_CONFIG, f"cannot read {path}: {error}") from None
    section = data.get("vng") if isinstance(data, dict) else None
    if not isinstance(section, dict) or not all(isinstance(key, str) for key in section):
        raise InputError(WORKSPACE_CONFIG, f"{path}: expected a `vng:` section of settings")
    return section


def files_read(c: Context) -> list[str]:
    """The config files the settings came from: invoke's, then the workspace's."""
    paths = [getattr(c.config, f"_{name}_path") for name in INVOKE_FILES if getattr(c.config, f"_{name}_found")]
    paths.append(Path.cwd() / WORKSPACE_CONFIG)
    return [str(path) for path in paths if path and Path(path).is_file()]  # invoke "finds" a missing .py one


def check_environment(environ: Mapping[str, str]) -> None:
    """invoke reads INVOKE_VNG_NAME only for a declared setting: a misspelt one must not pass unnoticed."""
    for name in sorted(environ):
        key = name.removeprefix(ENV_PREFIX).lower()
        if name.startswith(ENV_PREFIX) and key not in BY_NAME:
            raise InputError(key, f"not a known setting ({name} in the environment)")


def remainder(argv: Sequence[str] = sys.argv) -> str:
    """The text after the first `--`, joined by spaces as invoke itself does."""
    args = list(argv[1:])
    return " ".join(args[args.index("--") + 1 :]) if "--" in args else ""


@contextlib.contextmanager
def exit_statuses() -> Iterator[None]:
    """Failures as one line and their status; a command of ours that failed (say make, which exits 2,
    the status of bad input here) as one line and status 1."""
    try:
        yield
    except Failure as failure:
        raise Exit(f"vngtasks: {failure}", code=failure.code) from None
    except UnexpectedExit as error:
        result = error.result
        command = result.command if len(result.command) < 200 else result.command[:197] + "..."
        full = ": no space left on device" if no_space(result.stdout, result.stderr) else ""
        raise Exit(f"vngtasks: `{command}` failed with exit status {result.exited}{full}", code=FAILED) from None
    except InputError as error:
        raise Exit(f"vngtasks: {error}", code=BAD_INPUT) from None
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise Exit(f"vngtasks: no space left on device, writing {error.filename or '?'}", code=FAILED) from None


def parse_errors_are_bad_input() -> None:
    """invoke exits 1 on a flag it cannot parse, the status of a failed build here: make it 2, bad input.

    invoke loads this collection before it parses the tasks' flags, so wrapping the two parse steps
    that follow (task flags, then `--help TASK`) from here covers every flag a task is given."""
    for step in ("parse_tasks", "parse_cleanup"):
        original = getattr(Program, step)
        if getattr(original, "vngtasks_wrapped", False):
            continue

        def parse(self: Program, _original: Callable[[Program], None] = original) -> None:
            try:
                _original(self)
            except ParseError as error:
                raise Exit(f"vngtasks: {error}", code=BAD_INPUT) from None

        parse.vngtasks_wrapped = True  # type: ignore[attr-defined]
        setattr(Program, step, parse)


class Stopped(BaseException):
    """A stopping signal arrived (BaseException: no `except Exception` on the way out may keep it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT unwind the task, so every `finally` on the way runs (the VM session is
    stopped, the run directory removed), then exit 128+signal with one line. Later signals are ignored
    while that cleanup runs."""

    def stop(signum: int, frame: object) -> None:
        for sig in STOPPING_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOPPING_SIGNALS}
    try:
        yield
    except Stopped as stopped:
        message = f"vngtasks: stopped by {signal.Signals(stopped.signum).name}; the VM and its run directory are gone"
        raise Exit(message, code=128 + stopped.signum) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
