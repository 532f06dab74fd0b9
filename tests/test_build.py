"""Real kernels from git: Debian's linux-source-6.12 as a remote with tag v6.12, built with vng."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from linux_remote import CCACHE_DIR, KCONFIG, TAG

pytestmark = pytest.mark.slow

# ccache survives between runs on one machine (the tests' HOME does not).
CCACHE = {"CCACHE_DIR": str(CCACHE_DIR)}


def test_boot_tag_builds_once_then_boots_from_the_cache(cli, tmp_path: Path, workspace: Path, remote):
    url, sha = remote
    (workspace / "ci").mkdir()
    (workspace / "ci" / "kernel.config").write_text(KCONFIG.read_text())  # CONFIG_IKCONFIG_PROC=y
    cache_dir = tmp_path / "cache"
    args = ["boot", "--tag", TAG, "--kernel-url", url, "--name", "ci", "--kconfig", "ci/kernel.config"]
    args += ["--cache-dir", str(cache_dir), "--verbose", "false", "--"]
    workload = "uname -r; test -e /proc/config.gz && echo config.gz-present"

    first = cli(*args, workload, env=CCACHE, timeout=3600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"__ci__{sha[:12]}" in first.stdout and "config.gz-present" in first.stdout, first.stdout

    (entry,) = (cache_dir / "kernels").glob("vng-kernel-ci-*")
    assert entry.name == f"vng-kernel-ci-x86_64-{sha[:12]}-v2"
    metadata = json.loads((entry / "metadata.json").read_text())
    assert metadata["sha"] == sha and metadata["tag"] == TAG and metadata["url"] == url
    assert f"__ci__{sha[:12]}" in metadata["kernel_release"]
    assert (entry / "vmlinux.h").stat().st_size > 1_000_000
    assert "struct task_struct {" in (entry / "vmlinux.h").read_text()
    assert not [p for p in entry.rglob("*") if p.is_symlink() and not p.resolve().is_relative_to(entry)]

    tree = cache_dir / "work" / "ci-x86_64" / "linux"
    marks = {p: p.stat().st_mtime_ns for p in (tree / ".git" / "FETCH_HEAD", tree / "vmlinux")}
    second = cli(*args, workload, env=CCACHE, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"cache: hit vng-kernel-ci-x86_64-{sha[:12]}-v2" in second.stderr
    assert f"__ci__{sha[:12]}" in second.stdout
    # No clone and no make: neither the fetch head nor the linked kernel of the work tree moved.
    assert {p: p.stat().st_mtime_ns for p in marks} == marks
