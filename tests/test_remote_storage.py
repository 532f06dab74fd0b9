"""ccache-remote against real servers on loopback: Debian's nginx with its WebDAV module (GET, PUT) and Debian's
redis-server with a password. The compiles here go through the build's own wrapper, environment and ccache
configuration file (buildsteps), with a few small C files; the last test builds a kernel from the remote."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CCACHE_REMOTE_VARIABLE, TinyBuild, run_invoke, tiny_flags
from invoke import Context
from linux_remote import KCONFIG
from servers import Server, start_nginx, start_redis

from vngtasks import arches, buildsteps, kernelmake
from vngtasks.settings import DEFAULTS, effective

pytestmark = pytest.mark.integration
REMOTE_HITS = 0.95  # of a second machine's compilations, at least (the bar)

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


@pytest.mark.slow
def test_a_second_machine_builds_the_tiny_kernel_from_the_remote(tmp_path: Path, remote, tiny_build: TinyBuild):
    """The session's tiny build filled the tests' nginx remote (conftest: reshare, so from the warm local ccache too,
    with no cold compile); another "machine" (its own HOME, cache dir, work tree path and an empty CCACHE_DIR)
    builds the same commit from it. About 2 min warm."""
    url, sha = remote
    remote_cache = os.environ.get(CCACHE_REMOTE_VARIABLE)
    assert remote_cache, f"no ccache remote for the tests ({CCACHE_REMOTE_VARIABLE}): is nginx installed?"
    filled = json.loads((tiny_build.entry / "metadata.json").read_text())
    assert filled["ccache_remote"] == remote_cache and filled["ccache"]["remote_errors"] == 0, filled["ccache"]
    workspace = tmp_path / "workspace"
    (workspace / "ci").mkdir(parents=True)
    (workspace / "ci" / "kernel.config").write_text(KCONFIG.read_text())
    (tmp_path / "home").mkdir()
    args = ("build", *tiny_flags(url), "--cache-dir", str(tmp_path / "cache"), "--ccache-remote", remote_cache)
    done = run_invoke(args, home=tmp_path / "home", cwd=workspace, env={"CCACHE_DIR": str(tmp_path / "ccache")},
                      timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ccache-remote" not in done.stderr, done.stderr[-3000:]  # no warning: the remote answered every time
    second = json.loads((Path(done.stdout.strip().splitlines()[-1]) / "metadata.json").read_text())
    # Its local ccache started empty: every hit came from the remote, straight (remote_hits) or through the local
    # copy the remote's answer left, when one build compiles an object twice (local_hits: 182 of 1601 here).
    counts = second["ccache"]
    compilations = counts["hits"] + counts["misses"]
    assert counts["hits"] >= REMOTE_HITS * compilations and counts["remote_hits"] > counts["local_hits"], counts
    assert second["ccache_remote"] == remote_cache
    assert second["sha"] == sha and second["kernel_release"] == filled["kernel_release"]
    assert second["tree"] != filled["tree"]
