"""The tests' one debug kernel (conftest.debug_build: tiny + `debug kasan,kmemleak,lkdtm` + kmemleak's sample
module), booted for what only a sanitizer kernel shows: KASAN's reports and kmemleak's leaks as crash reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_at_its_line_of_lkdtm, assert_in_its_function
from linux_remote import PROVOKE

pytestmark = pytest.mark.slow

QUIET = ("--verbose", "false", "--memory", "512M")
LEAK = "modprobe kmemleak-test"  # samples/kmemleak: its init loses what it allocates
SAMPLE = "samples/kmemleak/kmemleak-test.c"


def crashes_of(logs: Path) -> list[dict]:
    return json.loads((logs / "crashes.json").read_text())["crashes"]


def test_a_use_after_free_and_a_modules_leaks_are_symbolized_crash_reports(
    cli, workspace: Path, debug_build, kernel_tree
):
    """LKDTM's READ_AFTER_FREE under KASAN, and the leaks of kmemleak's sample module, which the guest's scan after
    the workload finds: both splats (a passing workload fails with 123), both crash reports; KASAN's at its line
    of drivers/misc/lkdtm/heap.c; the sample's leaks titled by its init function, one crash counted per leak, its
    module's frame at its line of the sample."""
    done = cli("boot", "--kernel", str(debug_build.entry), *QUIET, "--", f"echo READ_AFTER_FREE > {PROVOKE}; {LEAK}")
    console = (workspace / "vng-console.log").read_text()
    assert done.returncode == 123, done.stderr[-3000:]
    record = json.loads((workspace / "vng-run.json").read_text())
    assert (record["result"], record["workload_status"]) == ("workload", 0)
    crashes = crashes_of(workspace)
    kinds = {crash["kind"]: crash for crash in crashes}
    assert set(kinds) == {"kasan", "kmemleak"}, console[-8000:]
    kasan, leak = kinds["kasan"], kinds["kmemleak"]
    assert kasan["title"] == "KASAN: slab-use-after-free Read in lkdtm_READ_AFTER_FREE", kasan
    assert_at_its_line_of_lkdtm(kasan, kernel_tree, "heap.c")
    assert leak["title"] == "memory leak in kmemleak_test_init" and leak["count"] >= 8, leak
    # The module's own frame, symbolized with its .ko in the entry, below the allocator inlined there.
    assert (leak["frames"][0]["function"], leak["frames"][0]["module"]) == ("kmemleak_test_init", "kmemleak_test")
    assert_in_its_function(leak, kernel_tree, SAMPLE, "static int kmemleak_test_init(void)")
    assert any("kmemleak: unreferenced object 0x" in line for line in record["splats"]), record["splats"]
    assert f"vngtasks: crash: memory leak in kmemleak_test_init ({SAMPLE}:" in done.stderr


def test_a_leak_splat_allow_names_is_no_splat_and_no_crash(cli, workspace: Path, debug_build):
    done = cli("boot", "--kernel", str(debug_build.entry), *QUIET, "--splat-allow", "unreferenced object", "--", LEAK)
    assert done.returncode == 0, done.stderr[-3000:]
    assert crashes_of(workspace) == []
    assert "kmemleak: unreferenced object" in (workspace / "vng-console.log").read_text()
