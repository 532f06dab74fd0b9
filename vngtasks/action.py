"""What the GitHub Action does besides the tasks every user runs: its inputs turned into one settings
file, the kernel cache layers staged in and out, the kernel step's outputs and summary.

Values that come back from earlier steps (their outputs, the actions cache) are checked here before
they are used: a key must be a cache key, a SHA 40 hex digits, a flag `true` or `false`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from invoke.util import yaml

from . import log
from .files import remove_tree, write_atomically
from .reference import action_input_name
from .resolve import is_sha
from .settings import SETTINGS, Settings
from .validate import InputError, one_line

INPUTS_VARIABLE = "VNGTASKS_ACTION_INPUTS"  # the action's `toJSON(inputs)`
SETTING_OF_INPUT = {action_input_name(setting): setting.name for setting in SETTINGS}
_KEY = re.compile(r"vng-kernel-[A-Za-z0-9._+-]+")
_SECONDS = re.compile(r"[0-9]{1,7}")


def raw_settings(inputs_json: str) -> dict[str, str]:
    """The action's inputs (input name: text) as raw settings (setting name: text)."""
    try:
        inputs = json.loads(inputs_json)
    except ValueError as error:
        raise InputError(INPUTS_VARIABLE, f"not JSON: {error}") from None
    if not isinstance(inputs, dict):
        raise InputError(INPUTS_VARIABLE, "expected the action's inputs as a JSON object")
    raw = {}
    for name, value in inputs.items():
        if name not in SETTING_OF_INPUT:
            raise InputError(name, "not an input of vngtasks")
        if not isinstance(value, str):
            raise InputError(name, f"expected a string, got {type(value).__name__}")
        raw[SETTING_OF_INPUT[name]] = value
    return raw


def write_settings_file(directory: Path, raw: Mapping[str, str]) -> Path:
    """The settings as an invoke config file (`vng:` section), named by its content, readable by this
    user only; every later step reads it with INVOKE_RUNTIME_CONFIG."""
    text = yaml.safe_dump({"vng": dict(raw)}, sort_keys=True)
    path = directory / f"vngtasks-settings-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    write_atomically(path, text)  # 0600
    return path


def stage_dir(s: Settings) -> Path:
    """Where the kernel cache layer's entry sits while actions/cache saves or restores it."""
    return s.cache_dir / "action" / "kernel"


def ccache_dir(environ: Mapping[str, str]) -> str:
    """The ccache layer's path: a `path:` of actions/cache, which takes one path a line (a line break in
    CCACHE_DIR would add another directory to save)."""
    return one_line("CCACHE_DIR", environ.get("CCACHE_DIR") or str(Path.home() / ".cache" / "ccache"))


def layout(s: Settings, settings_file: Path, ccache: str) -> dict[str, str]:
    """The `Check inputs` step's outputs: the settings file and the paths the cache steps use."""
    return {
        "file": str(settings_file),
        "cache-dir": str(s.cache_dir),
        "arch": s.arch.name,
        "apt-dir": str(s.cache_dir / "apt" / "archives"),
        "stage-dir": str(stage_dir(s)),
        "ccache-dir": ccache,
    }


def write_outputs(path: Path, values: Mapping[str, str]) -> None:
    """Append `name=value` lines to $GITHUB_OUTPUT; a value is one line."""
    lines = []
    for name, value in values.items():
        if "\n" in value or "\r" in value:
            raise ValueError(f"output {name} holds a line break")
        lines.append(f"{name}={value}\n")
    with open(path, "a") as out:
        out.writelines(lines)


def stage_in(stage: Path, kernels: Path) -> list[str]:
    """Move entries the actions cache restored into the kernel cache (never over one it has)."""
    moved = []
    if not stage.is_dir():
        return moved
    kernels.mkdir(parents=True, exist_ok=True)
    for entry in sorted(stage.iterdir()):
        if entry.is_symlink() or not entry.is_dir() or not _KEY.fullmatch(entry.name):
            log.warn(f"action: ignoring {entry.name!r} in the restored kernel cache")
            continue
        if not (kernels / entry.name).exists():
            entry.rename(kernels / entry.name)
            moved.append(entry.name)
    return moved


def stage_out(entry: Path, stage: Path) -> Path:
    """The entry, hard-linked (no copy) under the stage directory, for the kernel cache layer to save."""
    remove_tree(stage)
    stage.mkdir(parents=True)
    return Path(shutil.copytree(entry, stage / entry.name, symlinks=True, copy_function=os.link))


@dataclass(frozen=True)
class Kernel:
    """The kernel step's outputs: what the resolve found, checked."""

    sha: str
    key: str
    local_hit: bool
    remote_failed: bool

    @property
    def sha12(self) -> str:
        return self.sha[:12]

    def outputs(self) -> dict[str, str]:
        return {
            "sha": self.sha,
            "sha12": self.sha12,
            "key": self.key,
            "local-hit": str(self.local_hit).lower(),
            "remote-failed": str(self.remote_failed).lower(),
        }


def kernel_from_outputs(outputs_json: str, where: str, hit: str) -> Kernel:
    """A step's outputs (`toJSON(steps.X.outputs)`) as a Kernel, `hit` naming its local-hit output
    (a resolve step's `cache-hit`, the kernel step's `local-hit`); anything else is refused."""
    try:
        outputs = json.loads(outputs_json or "{}")
    except ValueError:
        outputs = None
    if not isinstance(outputs, dict):
        raise InputError(where, "expected a step's outputs as a JSON object")
    sha, key = str(outputs.get("sha", "")), str(outputs.get("key", ""))
    flags = {name: str(outputs.get(name, "")) for name in (hit, "remote-failed")}
    if not is_sha(sha) or not _KEY.fullmatch(key) or sha[:12] not in key:
        raise InputError(where, f"no resolved kernel in these outputs: sha {sha!r}, key {key!r}")
    if any(value not in ("true", "false") for value in flags.values()):
        raise InputError(where, f"{hit} and remote-failed must be true or false: {flags}")
    return Kernel(sha, key, flags[hit] == "true", flags["remote-failed"] == "true")


def flag(name: str, value: str) -> bool:
    """A `true`/`false` another step printed (empty: false, as for a skipped step)."""
    if value not in ("", "true", "false"):
        raise InputError(name, f"{value!r} is not true or false")
    return value == "true"


def seconds(name: str, value: str) -> int | None:
    if value == "":
        return None
    if not _SECONDS.fullmatch(value):
        raise InputError(name, f"{value!r} is not a number of seconds")
    return int(value)


def how_it_came(kernel: Kernel, restored: bool, built_seconds: int | None) -> tuple[bool, str]:
    """(cache-hit, how) for the kernel step's summary."""
    if built_seconds is not None:
        return False, f"built in {built_seconds} s"
    if kernel.remote_failed:
        return True, "stale cache (remote unreachable)"
    if kernel.local_hit:
        return True, "cache hit (local)"
    return True, "cache hit (actions cache)" if restored else "cache hit"


_CCACHE_WORDS = (("local_hits", "local hit", "local hits"), ("remote_hits", "remote hit", "remote hits"),
                 ("misses", "miss", "misses"))  # fmt: skip


def ccache_phrase(metadata: Mapping[str, object]) -> str:
    """An entry's ccache counts for the summary ("ccache: 3 local hits, 1350 remote hits, 1 miss"); remote hits
    only when it was built with a remote; "" when it has no counts. The entry is a record on disk: only whole
    numbers are taken from it."""
    counts = metadata.get("ccache")
    if not isinstance(counts, dict):
        return ""
    said = [
        f"{n} {one if n == 1 else many}"
        for key, one, many in _CCACHE_WORDS
        if (key != "remote_hits" or metadata.get("ccache_remote"))
        and type(n := counts.get(key)) is int  # not a bool, a float or a string
    ]
    return "ccache: " + ", ".join(said) if said else ""


def link_workspace(workspace: Path, entry: Path) -> None:
    """The seed's layout: the kernel tree at $GITHUB_WORKSPACE/linux, here a symlink to the cache entry
    (read-only in the guest). A `linux` that is not a symlink is left alone."""
    link = workspace / "linux"
    if link.exists() and not link.is_symlink():
        log.warn(f"{link} exists and is not a symlink: left alone")
        return
    temp = workspace / ".linux.vngtasks-new"
    temp.unlink(missing_ok=True)
    temp.symlink_to(entry)
    temp.replace(link)


SUMMARY_HEADER = "| vngtasks kernel | tag → commit | kernel |"


def add_summary_row(summary: Path, name: str, tag: str, sha12: str, how: str) -> None:
    """One row of the job summary's kernel table (the header once per summary)."""
    existing = summary.read_text() if summary.is_file() else ""
    escaped = tag.replace("|", "\\|")
    with open(summary, "a") as out:
        if SUMMARY_HEADER not in existing:
            out.write(f"\n{SUMMARY_HEADER}\n|---|---|---|\n")
        out.write(f"| {name} | {escaped} → {sha12} | {how} |\n")
