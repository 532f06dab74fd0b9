"""`invoke action.*`: the GitHub Action's own steps (see action.yml); each reads the settings file the
first one wrote (INVOKE_RUNTIME_CONFIG) and the few outputs of earlier steps it needs from the env."""

from __future__ import annotations

import os
import time
from pathlib import Path

from invoke import Collection, Context, task

from .. import cache, log, remotecache
from ..files import remove_tree
from ..resolve import RemoteFailed, resolve_kernel, sha_file
from ..settings import DEFAULTS, effective
from ..validate import InputError
from . import _common
from .resolve import answer


def _steps():
    """vngtasks/action.py, loaded by the action's steps only: every other task starts without it."""
    from .. import action

    return action


def _environ(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise InputError(name, "not set: this task is a step of the GitHub Action (action.yml)")
    return value


@task(name="settings")
def check_inputs(c: Context):
    """Check the action's inputs ($VNGTASKS_ACTION_INPUTS, JSON) and write the settings file every later
    step reads; outputs its path and the cache layers' paths."""
    action = _steps()
    with _common.exit_statuses():
        raw = action.raw_settings(_environ(action.INPUTS_VARIABLE))
        s = effective(DEFAULTS, raw)
        for secret in remotecache.secrets(s.ccache_remote):  # GitHub masks a secret's value, not what it is part of
            print(f"::add-mask::{secret}", flush=True)
        ccache = action.ccache_dir(os.environ)  # checked, as every input, before anything is written
        path = action.write_settings_file(Path(_environ("RUNNER_TEMP")), raw)
        action.write_outputs(Path(_environ("GITHUB_OUTPUT")), action.layout(s, path, ccache))


@task(help={"first": "an unreachable remote with no cached kernel is not an error: outputs retry=true"})
def resolve(c: Context, first: bool = False):
    """Move kernels the actions cache restored into the cache, then `invoke resolve`."""
    action = _steps()
    s = _common.settings(c)
    with _common.exit_statuses():
        action.stage_in(action.stage_dir(s), cache.kernels_root(s))
        try:
            resolved = resolve_kernel(c, s)
        except RemoteFailed as failure:
            if not first:
                raise
            log.warn(f"{failure}: trying the newest cached kernel of {s.name} in the actions cache")
            action.write_outputs(Path(_environ("GITHUB_OUTPUT")), {"retry": "true"})
            return
        answer(s, resolved)
        if sha_file(s.workspace, s.name).is_file():
            action.write_outputs(Path(_environ("GITHUB_OUTPUT")), {"propagate": "true"})


@task
def kernel(c: Context):
    """The resolved kernel ($AGAIN's outputs when the retry ran, else $FIRST's), checked, as outputs."""
    action = _steps()
    s = _common.settings(c)
    with _common.exit_statuses():
        again = os.environ.get("AGAIN", "")
        retried = '"key"' in again  # a skipped step's outputs are {} (or null): no key in them
        chosen = (again, "AGAIN") if retried else (os.environ.get("FIRST", ""), "FIRST")
        found = action.kernel_from_outputs(*chosen, hit="cache-hit")
        remove_tree(action.stage_dir(s))
        if found.remote_failed:
            log.warn(f"kernel-url unreachable: using the cached kernel {found.key} (it may be stale)")
        action.write_outputs(Path(_environ("GITHUB_OUTPUT")), found.outputs())


@task
def build(c: Context):
    """`invoke build`, timed; the entry is staged (hard links) for the kernel cache layer to save."""
    action = _steps()
    from ..provide import ensure_kernel  # here: the other steps start without the build modules

    s = _common.settings(c)
    with _common.stopped_by_signals(), _common.exit_statuses():
        started = time.monotonic()
        entry = ensure_kernel(c, s, resolve_kernel(c, s))
        seconds = round(time.monotonic() - started)
        action.stage_out(entry.path, action.stage_dir(s))
        action.write_outputs(Path(_environ("GITHUB_OUTPUT")), {"seconds": str(seconds)})


@task
def finish(c: Context):
    """The kernel's cache entry in place, linked at $GITHUB_WORKSPACE/linux; outputs cache-hit and
    kernel-dir, and a row of the job summary. From $KERNEL (the kernel step's outputs), $RESTORED
    (the kernel cache layer's cache-hit) and $BUILD_SECONDS."""
    action = _steps()
    s = _common.settings(c)
    with _common.exit_statuses():
        found = action.kernel_from_outputs(os.environ.get("KERNEL", ""), "KERNEL", hit="local-hit")
        restored = action.flag("RESTORED", os.environ.get("RESTORED", ""))
        built = action.seconds("BUILD_SECONDS", os.environ.get("BUILD_SECONDS", ""))
        if restored:
            action.stage_in(action.stage_dir(s), cache.kernels_root(s))
        remove_tree(action.stage_dir(s))
        cached = cache.KernelCache(cache.kernels_root(s)).lookup(found.key)
        if cached is None:
            raise InputError("KERNEL", f"{found.key} is not in the kernel cache")
        entry = cached.path
        action.link_workspace(s.workspace, entry)
        hit, how = action.how_it_came(found, restored, built)
        if built is not None and (counts := action.ccache_phrase(cached.metadata)):
            how = f"{how} ({counts})"
        action.write_outputs(Path(_environ("GITHUB_OUTPUT")), {"cache-hit": str(hit).lower(), "kernel-dir": str(entry)})
        log.info(f"kernel {s.name}: {s.tag} -> {found.sha12}: {how}")
        if os.environ.get("GITHUB_STEP_SUMMARY"):
            action.add_summary_row(Path(os.environ["GITHUB_STEP_SUMMARY"]), s.name, s.tag, found.sha12, how)


ns = Collection("action", check_inputs, resolve, kernel, build, finish)
