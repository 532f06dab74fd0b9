"""ccache-remote against real servers on loopback: Debian's nginx with its WebDAV module (GET, PUT) and Debian's
redis-server with a password. The compiles here go through the build's own wrapper, environment and ccache
configuration file (buildsteps), with a few small C files. A second machine building the tiny kernel from the
remote is tests/test_nonroot.py's user (one kernel build serves both)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from invoke import Context
from servers import Server, start_nginx, start_redis

from vngtasks import arches, buildsteps, kernelmake
from vngtasks.settings import DEFAULTS, effective

pytestmark = pytest.mark.integration

SOURCES = 6


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
