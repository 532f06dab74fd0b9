"""ccache-remote against real servers on loopback: Debian's nginx with its WebDAV module (GET, PUT) and Debian's
redis-server with a password. The compiles here go through the build's own wrapper, environment and ccache
configuration file (buildsteps), with a few small C files; the last test builds a kernel from the remote."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CCACHE_ENV, TinyBuild, run_invoke, tiny_flags
from invoke import Context
from linux_remote import KCONFIG

from vngtasks import arches, buildsteps, kernelmake
from vngtasks.settings import DEFAULTS, effective

pytestmark = pytest.mark.integration
REMOTE_HITS = 0.95  # of a second machine's compilations, at least (the bar)

SOURCES = 6
PASSWORD = "s3cret%2Fpw"  # percent-encoded in the URL, as ccache's manual says a `/` must be
NGINX_CONF = """worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
{user}
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {d}/data;
    client_max_body_size 0;
    location / {{ dav_methods PUT DELETE; create_full_put_path on; }}
  }}
}}
"""


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    stored: Callable[[], int]  # how many entries the server holds

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"the server on port {port} did not start")


def start_nginx(directory: Path) -> Server:
    """nginx serving `directory/data` with PUT, the way ccache's HTTP storage wants it."""
    (directory / "data").mkdir(parents=True)
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""  # its workers write the test's directory
    (directory / "nginx.conf").write_text(NGINX_CONF.format(d=directory, port=port, user=user))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    process = subprocess.Popen([nginx, "-c", str(directory / "nginx.conf"), "-p", str(directory), "-g", "daemon off;"])
    _listening(port, process)

    def stored() -> int:
        return sum(1 for p in (directory / "data").rglob("*") if p.is_file())

    return Server(f"http://127.0.0.1:{port}/ccache", process, stored)


def start_redis(directory: Path) -> Server:
    """redis-server on loopback that takes only the password's clients, as a shared one should."""
    directory.mkdir(parents=True)
    port = free_port()
    password = PASSWORD.replace("%2F", "/")
    argv = [shutil.which("redis-server") or "/usr/bin/redis-server", "--bind", "127.0.0.1", "--port", str(port)]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(directory), "--requirepass", password]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _listening(port, process)

    def stored() -> int:
        cli = [shutil.which("redis-cli") or "/usr/bin/redis-cli", "-p", str(port), "--no-auth-warning", "-a", password]
        return int(subprocess.run([*cli, "dbsize"], capture_output=True, text=True, check=True).stdout.strip())

    return Server(f"redis://{PASSWORD}@127.0.0.1:{port}", process, stored)


@pytest.fixture(params=["http", "redis"])
def server(request, tmp_path: Path) -> Iterator[Server]:
    started = (start_nginx if request.param == "http" else start_redis)(tmp_path / request.param)
    yield started
    started.stop()


def compile_on(machine: Path, url: str, *, reshare: bool = False, remote: bool = True) -> dict[str, int]:
    """The small C files compiled as a build on "machine" would: its own tree path and CCACHE_DIR, the build's
    compiler wrapper, environment and ccache configuration file. Returns the build's ccache counts."""
    tree = machine / "work" / "linux"
    tree.mkdir(parents=True, exist_ok=True)
    for n in range(SOURCES):
        (tree / f"f{n}.c").write_text(f"int f{n}(int x) {{ return x * {n + 2}; }}\n")
    flags = {"tag": "v6.12", "ccache_remote": url if remote else "", "ccache_reshare": str(reshare).lower()}
    settings = effective(DEFAULTS, flags, workspace=machine)
    plan = buildsteps.Plan(settings, "a" * 40, str(tree), arches.host(), 1, str(machine / "work" / "tools"))
    c = Context()
    buildsteps.write_tools(c, plan)
    env = {
        **buildsteps.build_env(plan, str(machine), {"CCACHE_DIR": str(machine / "ccache")}),
        "PATH": os.environ["PATH"],
    }
    kernelmake.forget_ccache_counts(c, env)
    with buildsteps.ccache_config(c, plan, env):
        for n in range(SOURCES):
            c.run(
                buildsteps.in_tree(str(tree), [f"{plan.tools_dir}/cc", "-c", f"f{n}.c", "-o", f"f{n}.o"]),
                env=env,
                in_stream=False,
                hide=True,
            )
    assert all((tree / f"f{n}.o").stat().st_size > 0 for n in range(SOURCES))
    return kernelmake.ccache_counts(c, env)


def test_a_second_machine_hits_what_the_first_compiled(server: Server, tmp_path: Path) -> None:
    first = compile_on(tmp_path / "first", server.url)
    assert (first["misses"], first["remote_hits"], first["remote_errors"]) == (SOURCES, 0, 0), first
    assert server.stored() > 0
    second = compile_on(tmp_path / "second", server.url)  # another tree path, CCACHE_DIR and HOME
    assert (second["remote_hits"], second["local_hits"], second["misses"]) == (SOURCES, 0, 0), second


def test_reshare_fills_the_remote_from_a_warm_local_ccache(server: Server, tmp_path: Path) -> None:
    warm = compile_on(tmp_path / "warm", server.url, remote=False)
    assert warm["misses"] == SOURCES and server.stored() == 0
    without = compile_on(tmp_path / "warm", server.url)  # local hits are not written to the remote…
    assert without["local_hits"] == SOURCES and server.stored() == 0
    shared = compile_on(tmp_path / "warm", server.url, reshare=True)  # …unless reshared
    assert shared["local_hits"] == SOURCES and server.stored() > 0
    assert compile_on(tmp_path / "cold", server.url)["remote_hits"] == SOURCES


def test_the_server_gone_mid_build_leaves_a_local_build_and_one_warning(server: Server, tmp_path: Path, capsys):
    compile_on(tmp_path / "first", server.url)
    server.stop()
    counts = compile_on(tmp_path / "second", server.url)  # every object is still compiled (compile_on checks)
    assert (counts["misses"], counts["remote_hits"]) == (SOURCES, 0) and counts["remote_errors"] >= SOURCES, counts
    kernelmake.warn_remote_errors(kernelmake.Compiled(1.0, counts), server.url)
    (line,) = capsys.readouterr().err.splitlines()
    assert "ccache-remote:" in line and f"in {SOURCES} compilations" in line and "s3cret" not in line


@pytest.mark.slow
def test_a_second_machine_builds_the_tiny_kernel_from_the_remote(tmp_path: Path, remote, tiny_build: TinyBuild):
    """The session's warm ccache fills an HTTP remote (reshare: no cold compile), then another "machine" (its own
    HOME, cache dir, work tree path and an empty CCACHE_DIR) builds the same commit from it. About 3 min warm."""
    url, sha = remote
    nginx = start_nginx(tmp_path / "nginx")
    try:
        entries = {}
        for machine, env, more in (
            ("filler", CCACHE_ENV, ("--ccache-reshare", "true")),
            ("second", {"CCACHE_DIR": str(tmp_path / "second" / "ccache")}, ()),
        ):
            workspace = tmp_path / machine / "workspace"
            (workspace / "ci").mkdir(parents=True)
            (workspace / "ci" / "kernel.config").write_text(KCONFIG.read_text())
            (tmp_path / machine / "home").mkdir()
            args = ("build", *tiny_flags(url), "--cache-dir", str(tmp_path / machine / "cache"))
            done = run_invoke((*args, "--ccache-remote", nginx.url, *more), home=tmp_path / machine / "home",
                              cwd=workspace, env=env, timeout=1800)  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
            assert "warning" not in done.stderr, done.stderr[-3000:]
            entries[machine] = json.loads((Path(done.stdout.strip().splitlines()[-1]) / "metadata.json").read_text())
    finally:
        nginx.stop()
    filled, second = entries["filler"]["ccache"], entries["second"]["ccache"]
    assert filled["local_hits"] > 1000 and filled["misses"] < 0.05 * filled["hits"], filled
    compilations = second["hits"] + second["misses"]
    assert second["remote_hits"] >= REMOTE_HITS * compilations and second["local_hits"] == 0, second
    assert entries["second"]["sha"] == sha and entries["second"]["ccache_remote"] == nginx.url
    assert entries["second"]["kernel_release"] == entries["filler"]["kernel_release"]
