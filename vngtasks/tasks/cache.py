"""`invoke cache`: list the local kernel cache, or prune it."""

from __future__ import annotations

import time

from invoke import Context
from invoke.exceptions import Exit

from .. import log, reaper
from ..cache import KernelCache, human_age, kernels_root, parse_age, parse_keep, parse_size
from ..errors import BAD_INPUT
from ..files import human_size
from ..validate import InputError
from . import _common


@_common.settings_task(
    "cache",
    options={
        "keep": "prune: keep the newest N kernels of each name and arch",
        "max_size": "prune: remove the oldest kernels until the cache fits, e.g. 20G (no suffix: MiB)",
        "max_age": "prune: remove the kernels built longer ago than this, e.g. 14d, 12h (no suffix: days)",
    },
)
def cache(c: Context, keep=None, max_size=None, max_age=None, **flags: str | None):
    """List cached kernels (key, size, age, kernel release); with --keep, --max-size or --max-age, prune them."""
    s = _common.settings(c, **flags)
    try:
        keep_per_name = None if keep is None else parse_keep(keep)
        max_bytes = None if max_size is None else parse_size(max_size)
        max_seconds = None if max_age is None else parse_age(max_age)
    except InputError as error:
        raise Exit(f"vngtasks: {error}", code=BAD_INPUT) from None
    store = KernelCache(kernels_root(s))
    if keep_per_name is None and max_bytes is None and max_seconds is None:
        entries = store.entries()
        if not entries:
            log.info(f"cache: no kernels in {store.root}")
        now = time.time()
        for entry in entries:
            release = entry.metadata.get("kernel_release") or "-"
            size = human_size(entry.size_bytes)
            print(f"{entry.key}\t{size}\t{human_age(now - entry.created)}\t{release}")
        return
    removed = store.prune(keep_per_name, max_bytes, max_seconds)
    for run in reaper.sweep(s.cache_dir / reaper.RUNS):
        log.info(f"cache: removed {run}: a run that is over")
    for entry in removed:
        print(f"removed {entry.key}\t{human_size(entry.size_bytes)}")
    left = store.entries()
    total = human_size(sum(entry.size_bytes for entry in left))
    log.info(f"cache: removed {len(removed)}, kept {len(left)} ({total})")
