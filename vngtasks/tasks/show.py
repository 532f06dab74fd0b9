"""`invoke settings`: print the settings every task would start from."""

from __future__ import annotations

import dataclasses

from invoke import Context, task

from .. import log, remotecache
from . import _common


@task
def settings(c: Context):
    """Print the effective settings (defaults < invoke.yaml < vngtasks.yaml < INVOKE_VNG_* env), one per line."""
    s = _common.settings(c)
    read = _common.files_read(c)
    log.info(f"settings: read {', '.join(read)}" if read else "settings: no config file read, defaults and env only")
    for field in dataclasses.fields(s):
        value = getattr(s, field.name)
        if field.name == "arch":
            value = value.name
        elif isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, tuple):
            value = " ".join(str(v) for v in value)
        elif field.name == "build_host_key" and value:
            value = "(set, not shown)"
        elif field.name == "ccache_remote":
            value = remotecache.shown(value)
        print(f"{field.name.replace('_', '-')}={'' if value is None else value}")
    if s.build_host:  # as ~/.ssh/config resolves it: where a build would go, with which key, through which hosts
        from ..sshconfig import resolve

        with _common.exit_statuses():
            routes = [resolve(host, s.build_host_proxy_command).describe() for host in s.build_host]
            print(f"build-host-route={'; '.join(routes)}")
