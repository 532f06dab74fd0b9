"""The kernel of a resolved commit: found in the cache, or built once, here or on the build host.

The one place that chooses where a build runs: build.py builds on this machine, buildhost.py
on the `build-host`; both run build.py's one sequence. Builds of one key take turns on the
cache's lock: the second finds the first's entry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from invoke import Context

from . import build, cache, log, vm
from .errors import BAD_INPUT, FAILED, MISSING_TOOL, Failure, Unreachable
from .resolve import Resolved
from .runrecord import Record
from .settings import Settings
from .validate import make_directory


def ensure_kernel(c: Context, settings: Settings, resolved: Resolved) -> cache.Entry:
    """The cache entry of the resolved commit: found (beside boots that use it), or built once (others wait on the
    lock)."""
    make_directory("cache_dir", settings.cache_dir)
    kernels = cache.KernelCache(cache.kernels_root(settings))
    key = cache.key_for(settings, resolved.sha12)
    if (sound := kernels.sound(key)) is not None:
        log.info(f"cache: hit {key}")
        return sound
    with kernels.lock(key):
        entry = kernels.lookup(key)
        if entry is not None and (damage := entry.damage()) is not None:
            log.warn(f"cache: {key} is damaged ({damage}): removed, building it again")
            kernels.discard(key)
            entry = None
        if entry is not None:
            log.info(f"cache: hit {key}")
            return entry
        if resolved.source == "stale":
            raise Failure(f"cache: {key} vanished while the remote is unreachable", FAILED)
        log.info(f"cache: miss {key}: building")
        if settings.build_host:
            from . import buildhost  # here: paramiko and Fabric load only for a build on a build host

            return buildhost.build_entry(c, settings, kernels, key, resolved)
        return build.build_here(c, settings, kernels, key, resolved)


def check_build_hosts(settings: Settings) -> None:
    """Every build host's route, as ~/.ssh/config resolves it (no connection made): a bad one is bad input before
    anything is fetched, built or booted (a matrix's later hosts are reached only in its build threads)."""
    from .sshconfig import resolve

    for host in settings.build_host:
        resolve(host, settings.build_host_proxy_command)  # sshconfig's Failure, BAD_INPUT


@dataclass(frozen=True)
class Built:
    """The resolved commit's kernel found or built, timed."""

    entry: cache.Entry | None  # None: the kernel did not build (`failure` says why)
    seconds: float
    cache_hit: bool
    failure: str = ""


@dataclass(frozen=True)
class Ran:
    """One kernel built (or found) and booted, timed."""

    record: Record | None  # the run as reported; None: the kernel did not build (`failure` says why)
    build_seconds: float
    boot_seconds: float
    cache_hit: bool
    failure: str = ""


def find_or_build(c: Context, settings: Settings, resolved: Resolved) -> Built:
    """The resolved commit's kernel (ensure_kernel), timed; a build that fails is a Built without an entry; bad input,
    a missing tool and a build host not reached (Unreachable: not the commit's failure) still raise."""
    kernels = cache.KernelCache(cache.kernels_root(settings))
    hit = kernels.lookup(cache.key_for(settings, resolved.sha12)) is not None
    started = time.monotonic()
    try:
        entry = ensure_kernel(c, settings, resolved)
    except Failure as failure:
        if failure.code in (BAD_INPUT, MISSING_TOOL) or isinstance(failure, Unreachable):
            raise
        return Built(None, time.monotonic() - started, hit, str(failure))
    return Built(entry, time.monotonic() - started, hit)


def boot_built(settings: Settings, built: Built, workload: str, host: vm.Host | None = None) -> Ran:
    """The kernel `built` booted with `workload`, held in use meanwhile (see vm.run_recorded for `host`)."""
    if built.entry is None:
        return Ran(None, built.seconds, 0.0, built.cache_hit, built.failure)
    started = time.monotonic()
    with cache.KernelCache(cache.kernels_root(settings)).using(built.entry.key) as in_use:
        record = vm.run_recorded(settings, in_use.path, workload, host=host)
    return Ran(record, built.seconds, time.monotonic() - started, built.cache_hit)


def build_and_boot(c: Context, settings: Settings, resolved: Resolved, workload: str) -> Ran:
    """The resolved commit's kernel found or built, then booted with `workload` (a kernel that did not build: a Ran
    without a record)."""
    return boot_built(settings, find_or_build(c, settings, resolved), workload)


def planned(settings: Settings, resolved: Resolved) -> tuple[Path, list[str]]:
    """The cache entry of the resolved commit (there now, or where a build would put it) and, on a miss,
    the commands that build it: found without making, locking or writing anything."""
    kernels = cache.KernelCache(cache.kernels_root(settings))
    key = cache.key_for(settings, resolved.sha12)
    if kernels.lookup(key) is not None:
        return kernels.root / key, [f"# cache hit {key}: nothing to build"]
    if settings.build_host:
        from .sshconfig import resolve  # as ~/.ssh/config resolves it, with no connection

        route = resolve(settings.build_host[0], settings.build_host_proxy_command).describe()
        return kernels.root / key, [f"# cache miss {key}: built on {route} over SSH, then kept here"]
    return kernels.root / key, build.dry_run_here(settings, resolved.sha, key)
