"""`invoke matrix` without a kernel (unit tier): its lists, cells, the kept file read as a hostile record, the table.
tests/test_remote.py runs a real one (2 refs x x86_64 and arm64, tiny, on two build hosts)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vngtasks import matrix
from vngtasks.errors import BAD_INPUT, FAILED, Failure, Unreachable

DONE = matrix.Done("v6.12", "x86_64", "tiny", matrix.PASSED, 0, "a" * 40, "6.12.0", 80.0, 9.5, False, (), None)


def test_lists_split_on_commas_once_each_in_order() -> None:
    assert matrix.split("tag", "v6.6, v6.12,v6.6") == ["v6.6", "v6.12"]
    for bad in ("", "v6.6,,v6.12", "v6.6,"):
        with pytest.raises(Failure) as refused:
            matrix.split("kconfig_base", bad)
        assert refused.value.code == BAD_INPUT and str(refused.value).startswith("kconfig-base: ")


def test_cells_are_every_combination_tags_outermost_and_bounded() -> None:
    found = matrix.cells(["v6.6", "v6.12"], ["x86_64", "arm64"], ["tiny"])
    assert [cell.label for cell in found] == ["v6.6 x86_64 tiny", "v6.6 arm64 tiny", "v6.12 x86_64 tiny",
                                              "v6.12 arm64 tiny"]  # fmt: skip
    with pytest.raises(Failure, match="65 cells: at most 64"):
        matrix.cells([f"t{n}" for n in range(65)], ["x86_64"], ["tiny"])


def test_a_cell_s_directory_is_plain() -> None:
    assert (
        matrix.Cell("origin/feature x", "arm64", "../a.config").directory(3) == "03-origin_feature_x-arm64-.._a.config"
    )


def kept(tmp_path: Path, cells: list, arguments: dict | None = None) -> Path:
    path = tmp_path / "kept.json"
    path.write_text(json.dumps({"arguments": arguments or {"run": "true"}, "cells": cells}))
    return path


def test_kept_cells_of_the_same_arguments_are_taken(tmp_path: Path) -> None:
    path = kept(tmp_path, [dataclasses.asdict(DONE)])
    assert matrix.finished(path, {"run": "true"}, {"v6.12 x86_64 tiny"}) == {"v6.12 x86_64 tiny": DONE}


@pytest.mark.parametrize(
    "change",
    [
        {"status": True},  # a bool is not a status
        {"result": "exploded"},
        {"crashes": [1]},
        {"tests": {"passed": "9"}},
        {"tag": "v6.11"},  # not one of this matrix's cells
        {"extra": 1},
    ],
)
def test_a_kept_file_that_is_damaged_or_another_s_starts_over(tmp_path: Path, change: dict, capsys) -> None:
    path = kept(tmp_path, [{**dataclasses.asdict(DONE), **change}])
    assert matrix.finished(path, {"run": "true"}, {"v6.12 x86_64 tiny"}) == {}
    assert "starting over" in capsys.readouterr().err
    assert matrix.finished(kept(tmp_path, [dataclasses.asdict(DONE)], {"run": "false"}), {"run": "true"}, set()) == {}


def test_kept_text_is_made_printable(tmp_path: Path) -> None:
    hostile = {**dataclasses.asdict(DONE), "release": "6.12\x1b[2J", "crashes": ["WARNING in x\x07"]}
    (done,) = matrix.finished(kept(tmp_path, [hostile]), {"run": "true"}, {"v6.12 x86_64 tiny"}).values()
    assert "\x1b" not in done.release and "\x07" not in done.crashes[0]


def test_the_table_and_the_status(tmp_path: Path, capsys) -> None:
    failed = dataclasses.replace(DONE, arch="arm64", result=matrix.FAILED_RUN, status=1, crashes=("WARNING in a|b",),
                                 tests={"passed": 3, "failed": 1})  # fmt: skip
    status = matrix.conclude(tmp_path / "matrix.json", {"run": "true"}, [DONE, failed])
    out, err = capsys.readouterr()
    assert status == FAILED and err.splitlines() == ["vngtasks: warning: matrix: v6.12 arm64 tiny: failed (1)"]
    assert "| v6.12 | x86_64 | tiny | aaaaaaaaaaaa | passed | 80 | 10 | built |  |  |" in out
    assert "| failed (1) |" in out and "WARNING in a\\|b" in out and "passed 3 failed 1" in out
    report = json.loads((tmp_path / "matrix.json").read_text())
    assert [cell["result"] for cell in report["cells"]] == ["passed", "failed"]
    assert matrix.conclude(tmp_path / "matrix.json", {}, [DONE]) == 0


def test_a_cell_whose_kernel_does_not_build_is_no_kernel(tmp_path: Path, monkeypatch, capsys) -> None:
    """The build's failure (not bad input) ends that cell only: `no-kernel`, one warning naming it, nothing booted;
    the table says so and the run fails."""
    from vngtasks import provide, resolve, settings, vm

    def fails(*_args, **_kwargs):
        raise Failure("build: make failed (exit 2)", FAILED)

    def no_boot(*_args, **_kwargs):
        raise AssertionError("nothing is booted without a kernel")

    monkeypatch.setattr(provide, "ensure_kernel", fails)
    monkeypatch.setattr(vm, "run_recorded", no_boot)
    monkeypatch.setattr(
        resolve, "resolve_kernel", lambda *_a, **_k: resolve.Resolved("b" * 40, "refs/tags/v6.12", "tag")
    )
    s = settings.effective({}, {"tag": "v6.12", "cache_dir": str(tmp_path / "c"), "log_dir": str(tmp_path / "logs"),
                                "run": "true"}, workspace=tmp_path)  # fmt: skip
    cell = matrix.Cell("v6.12", s.arch.name, str(s.kconfig_base))
    assert matrix.matrix(None, [s]) == FAILED
    (done,) = json.loads((tmp_path / "logs" / matrix.RECORD).read_text())["cells"]
    assert (done["result"], done["status"], done["release"], done["boot_seconds"]) == (matrix.NO_KERNEL, FAILED, "", 0)
    out, err = capsys.readouterr()
    assert f"matrix: {cell.label}: no kernel: build: make failed (exit 2)" in err
    row = f"| v6.12 | {s.arch.name} | {s.kconfig_base} | bbbbbbbbbbbb | no-kernel ({FAILED}) |"
    assert row in out


class StandIns:
    """`invoke matrix` with its kernel built and booted by stand-ins (provide.ensure_kernel, vm.run_recorded):
    when each ran, on this host of 2 CPUs and 8G; the workload "exit 1" fails its cell."""

    def __init__(self, tmp_path: Path, monkeypatch, barrier: int = 0) -> None:
        import os
        import threading
        import time

        from vngtasks import cache, provide, resolve, runrecord, vm

        self.builds: list[tuple[float, float]] = []
        self.boots: list[tuple[str, float, float]] = []
        self.started = 0
        self.hosts: list[object] = []
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(barrier, timeout=10) if barrier else None
        self.tmp_path = tmp_path

        def build(_c, s, resolved):
            started = time.monotonic()
            kernels = cache.KernelCache(cache.kernels_root(s))
            key = cache.key_for(s, resolved.sha12)
            if kernels.lookup(key) is None:
                with kernels.create(key, {"name": s.name}) as temp:
                    (temp / "bzImage").write_bytes(b"kernel " + resolved.sha.encode())
            time.sleep(0.05)
            with self.lock:
                self.builds.append((started, time.monotonic()))
            return kernels.lookup(key)

        def boot(s, kernel, workload, *args, **kwargs):
            started = time.monotonic()
            with self.lock:
                self.started += 1
                first = self.started <= barrier
            if self.barrier is not None and first:
                self.barrier.wait()  # the first `barrier` boots: all at once, or this times out
            time.sleep(0.2)
            with self.lock:
                self.boots.append((s.tag, started, time.monotonic()))
                self.hosts.append(kwargs.get("host"))
            outcome = vm.Outcome("tcg", 1 if "exit 1" in workload else 0, "workload", 0.1, 0.1)
            return runrecord.Record(kernel, "6.12.0", s.arch.name, outcome, outcome.status, ())

        def resolved(_c, s, **_kwargs):
            return resolve.Resolved(s.tag.ljust(40, "0"), f"refs/tags/{s.tag}", "remote")

        monkeypatch.setattr(provide, "ensure_kernel", build)
        monkeypatch.setattr(vm, "run_recorded", boot)
        monkeypatch.setattr(resolve, "resolve_kernel", resolved)
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        monkeypatch.setattr(vm, "host_memory_mib", lambda: 8192)

    def settings(self, tags: list[str], run: str) -> list:
        from vngtasks import settings

        flags = {"cache_dir": str(self.tmp_path / "c"), "log_dir": str(self.tmp_path / "logs"), "run": run,
                 "kconfig_base": "tiny", "extra_rwdirs": ""}  # fmt: skip
        arch = settings.effective({}, {}, workspace=self.tmp_path).arch.name
        return [settings.effective({}, {**flags, **cell.given()}, workspace=self.tmp_path)
                for cell in matrix.cells(tags, [arch], ["tiny"])]  # fmt: skip

    def overlapping(self) -> int:
        """The most boots that ran at one moment."""
        return max(sum(1 for _, s, e in self.boots if s <= start < e) for _, start, _ in self.boots)


def test_cells_boot_at_once_as_the_cpus_allow_while_builds_take_turns(tmp_path: Path, monkeypatch, capsys) -> None:
    """Four cells on 2 CPUs: two boots at once (each on 1 CPU and half the memory), never more; the builds one at a
    time; a failing cell fails the run; the kept file holds every cell, so the re-run boots none."""
    ran = StandIns(tmp_path, monkeypatch, barrier=2)
    settings = ran.settings(["a1", "a2", "a3", "a4"], "true")
    settings[2] = dataclasses.replace(settings[2], run="exit 1")
    assert matrix.matrix(None, settings) == FAILED
    assert ran.overlapping() == 2 and len(ran.boots) == 4
    assert all(end <= start for (_, end), (start, _) in zip(ran.builds, ran.builds[1:], strict=False))
    assert {(host.cpus, host.memory_mib) for host in ran.hosts} == {(1, 4096)}
    report = json.loads((tmp_path / "logs" / "matrix.json").read_text())
    assert [(c["tag"], c["result"]) for c in report["cells"]] == [("a1", "passed"), ("a2", "passed"),
                                                                  ("a3", "failed"), ("a4", "passed")]  # fmt: skip
    (kept,) = (tmp_path / "c" / "matrix").glob("*.json")
    assert sorted(c["tag"] for c in json.loads(kept.read_text())["cells"]) == ["a1", "a2", "a3", "a4"]
    err = capsys.readouterr().err
    assert err.count("vngtasks: warning: matrix: a3 ") == 1
    # The run's first line says how many boots at once and each VM's share.
    assert err.splitlines()[0].startswith("vngtasks: matrix: 4 cell(s) to run: one build at a time, 2 boot(s) at "
                                          "once, each VM with 1 CPU(s) and 90% of ")  # fmt: skip
    again = StandIns(tmp_path, monkeypatch)
    assert matrix.matrix(None, settings) == FAILED and again.boots == [] and again.builds == []


def test_a_stop_during_a_build_stops_the_boots_that_run_and_leaves_no_vm(tmp_path: Path, monkeypatch) -> None:
    """A stopping signal reaches the main thread (here: while it builds the second cell): the first cell's VM, a
    real process tree under supervise.py (a stand-in vng that sleeps), is stopped and gone before the task goes on
    to exit; the stopped cell is not kept."""
    import os
    import signal
    import threading
    import time

    from vngtasks import provide, reaper, supervise, vm
    from vngtasks.tasks._common import Stopped

    ran = StandIns(tmp_path, monkeypatch)
    vng = tmp_path / "vng"
    vng.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/vng.pid\nexec sleep 600\n")
    vng.chmod(0o755)
    booting = threading.Event()

    def boot(s, kernel, workload, host=None):
        run_dir = tmp_path / "runs" / s.tag
        (run_dir / "shared").mkdir(parents=True)
        with reaper.Guard(reaper.Leftovers(run_dir)) as guard:
            booting.set()
            vm_run = supervise.VmRun("tcg", run_dir / "shared", run_dir / "console.log", 0, 0)
            supervise.supervise(vm_run, [str(vng)], dict(os.environ), supervise.Marks(probe=0.0), guard)
        raise AssertionError("the VM was stopped: its run is not reported")

    built = provide.ensure_kernel

    def build(c, s, resolved):
        if s.tag == "b2":
            assert booting.wait(10)
            while not (tmp_path / "vng.pid").exists():
                time.sleep(0.05)
            raise Stopped(signal.SIGTERM)
        return built(c, s, resolved)

    monkeypatch.setattr(vm, "run_recorded", boot)
    monkeypatch.setattr(provide, "ensure_kernel", build)
    started = time.monotonic()
    with pytest.raises(Stopped):
        matrix.matrix(None, ran.settings(["b1", "b2"], "true"))
    pid = int((tmp_path / "vng.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert time.monotonic() - started < 30
    assert not list((tmp_path / "c" / "matrix").glob("*.json"))  # nothing finished, nothing kept


@pytest.mark.parametrize(
    ("cells", "cpus", "memory_mib", "at_once"),
    [
        (4, None, None, 4),  # 4 CPUs: one each
        (9, None, None, 4),  # never more than the CPUs
        (2, None, None, 2),  # nor than the cells
        (4, 2, None, 2),  # cpus set: host CPUs / cpus
        (4, 4, None, 1),  # cpus all the host's: one at a time
        (4, 8, None, 1),  # more than the host has: still one
        (4, None, 3072, 2),  # memory set: what 90% of 8G holds
        (4, None, 8192, 1),
    ],
)
def test_boots_at_once_never_overcommit_the_host(cells: int, cpus: int | None, memory_mib: int | None, at_once: int):
    from vngtasks import arches, vm

    host = vm.Host(arches.host(), 8192, "vng", {}, cpus=4)
    assert matrix.boots_at_once(cells, host, cpus, memory_mib) == at_once
    assert (host.divided(3).cpus, host.divided(3).memory_mib, host.divided(8).cpus) == (1, 2730, 1)


def test_at_most_host_memory_over_min_share_boots_at_once() -> None:
    from vngtasks import arches, vm

    small = vm.Host(arches.host(), 2048, "vng", {}, cpus=16)  # 90% of 2G holds one 1G share
    assert matrix.boots_at_once(8, small, None, None) == 1


def test_with_several_build_hosts_each_builds_one_cell_at_a_time_all_at_once(tmp_path: Path, monkeypatch, capsys):
    """build-host lists two hosts: the two build threads build at once (or the barrier times out), each cell on one
    host alone (its settings name that host only), never two cells on one host at a time; every cell built and
    booted; the builds' lines labeled with their cell."""
    import itertools
    import threading
    import time

    from vngtasks import log, provide

    ran = StandIns(tmp_path, monkeypatch)
    built = provide.ensure_kernel
    at_once = threading.Barrier(2, timeout=10)
    builds: list[tuple[tuple[str, ...], str, float, float]] = []
    lock = threading.Lock()

    def build(c, s, resolved):
        started = time.monotonic()
        if s.tag in ("h1", "h2"):
            at_once.wait()  # the first two cells: built at once
        log.info(f"building {s.tag}")
        entry = built(c, s, resolved)
        with lock:
            builds.append((s.build_host, s.tag, started, time.monotonic()))
        return entry

    monkeypatch.setattr(provide, "ensure_kernel", build)
    settings = [dataclasses.replace(s, build_host=("b1", "me@b2:22")) for s in ran.settings(["h1", "h2", "h3"], "true")]
    assert matrix.matrix(None, settings) == 0
    assert sorted(tag for _, tag, _, _ in builds) == ["h1", "h2", "h3"] and len(ran.boots) == 3
    assert {hosts for hosts, _, _, _ in builds} == {("b1",), ("me@b2:22",)}
    for host in ("b1",), ("me@b2:22",):
        mine = sorted((start, end) for hosts, _, start, end in builds if hosts == host)
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(mine))
    err = capsys.readouterr().err
    assert "one build per build host at once (2)" in err.splitlines()[0]
    arch = settings[0].arch.name
    assert f"[01-h1-{arch}-tiny] vngtasks: building h1" in err and f"[03-h3-{arch}-tiny] vngtasks: building h3" in err


def test_a_stop_ends_the_builds_on_build_hosts_and_keeps_nothing(tmp_path: Path, monkeypatch) -> None:
    """A stopping signal while two build threads wait on their build hosts' commands (stand-ins that block until
    ended, as a build host's connection does until closed): each build is ended (supervise.ended_when_stopped), the
    task exits 128+signal, no thread is left, no cell kept."""
    import os
    import signal
    import threading

    from invoke.exceptions import Exit

    from vngtasks import provide, supervise
    from vngtasks.tasks import _common

    ran = StandIns(tmp_path, monkeypatch)
    waiting = threading.Barrier(3, timeout=10)
    ended: list[str] = []

    def build(c, s, resolved):
        closed = threading.Event()

        def end() -> None:
            ended.append(s.tag)
            closed.set()

        with supervise.ended_when_stopped(end):
            waiting.wait()
            assert closed.wait(30)
            raise OSError("connection lost")  # what a closed connection raises under a build

    monkeypatch.setattr(provide, "ensure_kernel", build)
    settings = [dataclasses.replace(s, build_host=("b1", "b2")) for s in ran.settings(["s1", "s2", "s3"], "true")]
    threading.Thread(target=lambda: (waiting.wait(), os.kill(os.getpid(), signal.SIGTERM)), daemon=True).start()
    with pytest.raises(Exit) as stopped, _common.stopped_by_signals():
        matrix.matrix(None, settings)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert sorted(ended) == ["s1", "s2"] and ran.boots == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("vngtasks")] == []
    assert not list((tmp_path / "c" / "matrix").glob("*.json"))


def test_when_every_build_host_is_unreachable_the_matrix_ends_on_the_last_one_s_failure(tmp_path: Path, monkeypatch):
    """Both hosts refuse: the first gives its cell back (the other still builds), the last one's Unreachable ends the
    matrix with its one line (exit 1), no cell counted against its commit, nothing booted."""
    from vngtasks import provide

    ran = StandIns(tmp_path, monkeypatch)
    tried: list[str] = []

    def unreachable(c, s, resolved):
        tried.append(s.build_host[0])
        raise Unreachable(f"build-host: {s.build_host[0]}: connect: connection refused")

    monkeypatch.setattr(provide, "ensure_kernel", unreachable)
    settings = [dataclasses.replace(s, build_host=("b1", "b2")) for s in ran.settings(["u1", "u2"], "true")]
    with pytest.raises(Unreachable):
        matrix.matrix(None, settings)
    assert sorted(tried) in (["b1", "b2"], ["b1", "b1", "b2"], ["b1", "b2", "b2"]) and ran.boots == []
    assert not list((tmp_path / "c" / "matrix").glob("*.json"))


def test_a_build_host_not_reached_ends_a_bisect_where_a_failed_build_skips_the_commit(tmp_path: Path, monkeypatch):
    """A bisect's step builds through find_or_build as a matrix's cell does: a build that fails is the commit's (the
    step has no status: skipped), a build host not reached (Unreachable) is not, and ends the bisect."""
    from vngtasks import bisect, provide

    ran = StandIns(tmp_path, monkeypatch)
    (s,) = ran.settings(["v1"], "true")
    raised: list[Failure] = [Failure("build-host: b1: build: make failed", FAILED)]

    def build(*_args: object) -> None:
        raise raised[0]

    monkeypatch.setattr(provide, "ensure_kernel", build)
    assert bisect.run_step(None, s, "a" * 40, "true").status is None
    raised[0] = Unreachable("build-host: b1: connect: connection refused")
    with pytest.raises(Unreachable):
        bisect.run_step(None, s, "a" * 40, "true")
