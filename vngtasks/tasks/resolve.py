"""`invoke resolve`: the commit `tag` names, its cache key, and whether that kernel is cached."""

from __future__ import annotations

import os
from pathlib import Path

from invoke import Context
from invoke.exceptions import Exit

from ..cache import KernelCache, kernels_root, key_for
from ..errors import BAD_INPUT
from ..resolve import Resolved, resolve_kernel
from ..settings import Settings
from ..validate import InputError
from . import _common


@_common.settings_task("resolve")
def resolve(c: Context, **flags: str | None):
    """Resolve --tag on --kernel-url to a commit: prints sha, sha12, key, cache-hit, remote-failed."""
    s = _common.settings(c, **flags)
    if not s.tag:
        raise Exit(f"vngtasks: {InputError('tag', 'required: a tag, branch or 40-hex commit')}", code=BAD_INPUT)
    with _common.exit_statuses():
        answer(s, resolve_kernel(c, s))


def answer(s: Settings, resolved: Resolved) -> dict[str, str]:
    """Print what `resolved` means here (and append it to $GITHUB_OUTPUT when set); return it."""
    key = key_for(s, resolved.sha12)
    hit = KernelCache(kernels_root(s)).lookup(key) is not None
    lines = {
        "sha12": resolved.sha12,
        "sha": resolved.sha,
        "key": key,
        "remote-failed": str(resolved.source == "stale").lower(),
        "cache-hit": str(hit).lower(),
    }
    print("\n".join(f"{name}={value}" for name, value in lines.items()))
    if os.environ.get("GITHUB_OUTPUT"):
        from ..action import write_outputs  # here: only a run under GitHub Actions loads it

        write_outputs(Path(os.environ["GITHUB_OUTPUT"]), {**lines, "kernel-sha": resolved.sha12})
    return lines
