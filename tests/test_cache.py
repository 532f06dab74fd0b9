"""The kernel cache with real processes: killed writers leave nothing visible, one build per key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vngtasks import cache, files
from vngtasks.errors import Failure

KEY = cache.key("foo", "x86_64", "0123456789ab", "v2")


def add(store: cache.KernelCache, name: str, sha: str, size: int = 0, **extra: object) -> cache.Entry:
    key = cache.key(name, "x86_64", sha[:12], "v2")
    with store.create(key, {"name": name, "arch": "x86_64", "sha": sha, **extra}) as temp:
        (temp / "bzImage").write_bytes(b"k" * size)
    entry = store.lookup(key)
    assert entry is not None
    return entry


def python(code: str, root: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(root), KEY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_created_entry_has_metadata_and_no_leftovers(tmp_path: Path):
    store = cache.KernelCache(tmp_path)
    entry = add(store, "foo", "a" * 40, size=1000, kernel_release="6.12.0-vng")
    assert entry.path == tmp_path / entry.key and (entry.path / "bzImage").stat().st_size == 1000
    written = json.loads((entry.path / "metadata.json").read_text())
    assert written["key"] == entry.key and written["size_bytes"] == 1000 and written["sha"] == "a" * 40
    assert abs(entry.created - time.time()) < 60
    assert list((tmp_path / cache.TEMP).iterdir()) == []
    assert store.entries() == [entry]


def test_failed_build_leaves_nothing(tmp_path: Path):
    store = cache.KernelCache(tmp_path)
    with pytest.raises(RuntimeError, match="compiler broke"), store.create(KEY, {}) as temp:
        (temp / "half").write_text("x")
        raise RuntimeError("compiler broke")
    assert store.lookup(KEY) is None and store.entries() == []
    assert list((tmp_path / cache.TEMP).iterdir()) == []


def test_entry_that_appeared_meanwhile_is_kept(tmp_path: Path):
    store = cache.KernelCache(tmp_path)
    with store.create(KEY, {"by": "first"}) as first:
        (first / "f").write_text("first")
        with store.create(KEY, {"by": "second"}) as second:
            (second / "f").write_text("second")
    entry = store.lookup(KEY)
    assert entry is not None and entry.metadata["by"] == "second" and (entry.path / "f").read_text() == "second"
    assert list((tmp_path / cache.TEMP).iterdir()) == []


def test_killed_writer_leaves_no_entry_and_prune_cleans_up(tmp_path: Path):
    child = python(
        """
        import sys, time
        from pathlib import Path
        from vngtasks.cache import KernelCache
        with KernelCache(Path(sys.argv[1])).create(sys.argv[2], {"name": "foo", "arch": "x86_64"}) as temp:
            for n in range(600):
                (temp / f"part{n}").write_bytes(b"x" * 4096)
                print("writing", flush=True)
                time.sleep(0.1)
        """,
        tmp_path,
    )
    assert child.stdout is not None and child.stdout.readline() == "writing\n", child.stderr
    time.sleep(0.3)
    child.send_signal(signal.SIGKILL)
    child.wait()
    store = cache.KernelCache(tmp_path)
    leftovers = [path for path in (tmp_path / cache.TEMP).iterdir() if path.is_dir()]
    assert len(leftovers) == 1 and any(leftovers[0].iterdir())  # it really was killed mid-way
    assert store.lookup(KEY) is None and store.entries() == [] and store.newest("foo", "x86_64") is None
    assert store.prune() == []
    assert list((tmp_path / cache.TEMP).iterdir()) == []


def test_prune_leaves_a_live_build_alone(tmp_path: Path):
    store = cache.KernelCache(tmp_path)
    with store.create(KEY, {}) as temp:
        store.prune(keep_per_name=0)
        assert temp.is_dir()
    assert store.lookup(KEY) is not None


def test_two_builds_of_one_key_build_once(tmp_path: Path):
    code = """
        import os, sys, time
        from pathlib import Path
        from vngtasks.cache import KernelCache
        store, key = KernelCache(Path(sys.argv[1])), sys.argv[2]
        print("ready", flush=True)
        while not (store.root / "go").exists():
            time.sleep(0.005)
        with store.lock(key):
            if store.lookup(key) is None:
                with open(store.root / "builds", "a") as builds:
                    builds.write(f"{os.getpid()}\\n")
                time.sleep(1)
                with store.create(key, {"built_by": os.getpid()}) as temp:
                    (temp / "bzImage").write_text("kernel")
        entry = store.lookup(key)
        print(entry.metadata["built_by"] if entry else "missing")
    """
    tmp_path.mkdir(exist_ok=True)
    children = [python(code, tmp_path) for _ in range(2)]
    assert [child.stdout.readline() for child in children if child.stdout] == ["ready\n"] * 2
    (tmp_path / "go").touch()  # both start together: the second must wait for the first's build
    results = [child.communicate(timeout=60) for child in children]
    assert [child.returncode for child in children] == [0, 0], results
    builders = (tmp_path / "builds").read_text().split()
    assert len(builders) == 1
    assert [out.strip() for out, _ in results] == builders * 2  # both see the one build's entry


def test_newest_is_per_name_and_arch(tmp_path: Path):
    store = cache.KernelCache(tmp_path)
    old = add(store, "foo", "1" * 40)
    new = add(store, "foo", "2" * 40)
    add(store, "foo-bar", "3" * 40)
    add(store, "foo-x86_64", "4" * 40)  # its key starts with vng-kernel-foo-x86_64- too
    assert store.newest("foo", "x86_64") == new != old
    assert store.newest("foo", "arm64") is None and store.newest("fo", "x86_64") is None
    assert store.newest("foo-bar", "x86_64").metadata["sha"] == "3" * 40
    assert store.newest("foo", "x86_64", "v2") == new and store.newest("foo", "x86_64", "v3") is None


def test_newest_falls_back_to_mtime_without_created(tmp_path: Path):
    store = cache.KernelCache(tmp_path)
    for n, sha in enumerate(("5" * 40, "6" * 40)):
        key = cache.key("foo", "x86_64", sha[:12], "v2")
        (tmp_path / key).mkdir()
        (tmp_path / key / "metadata.json").write_text(json.dumps({"name": "foo", "arch": "x86_64", "sha": sha}))
        os.utime(tmp_path / key, (1_000_000_000 + n, 2_000_000_000 - n))  # the later sha is older
    assert store.newest("foo", "x86_64").metadata["sha"] == "5" * 40


def test_prune_keeps_the_newest_per_name(tmp_path: Path):
    store = cache.KernelCache(tmp_path)
    foo = [add(store, "foo", str(n) * 40) for n in range(3)]
    other = add(store, "foo-bar", "9" * 40)
    assert store.prune(keep_per_name=1) == foo[:2]
    assert store.entries() == [foo[2], other]
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith(".")) == sorted(
        [foo[2].key, other.key]
    )
    assert list((tmp_path / cache.TEMP).iterdir()) == []


def test_prune_to_a_size_removes_oldest_first(tmp_path: Path):
    store = cache.KernelCache(tmp_path)
    entries = [add(store, f"n{n}", str(n) * 40, size=1000) for n in range(4)]
    assert store.prune(max_bytes=2500) == entries[:2]
    assert store.entries() == entries[2:]
    assert store.prune(max_bytes=2500) == []


def test_prune_by_age_removes_what_was_built_longer_ago(cli, tmp_path: Path):
    store = cache.KernelCache(tmp_path / "c" / "kernels")
    old = add(store, "foo", "1" * 40)
    metadata = json.loads((old.path / "metadata.json").read_text())
    metadata["created"] = "2026-01-01T00:00:00+00:00"
    (old.path / "metadata.json").write_text(json.dumps(metadata))
    new = add(store, "foo", "2" * 40)
    pruned = cli("cache", "--cache-dir", str(tmp_path / "c"), "--max-age", "14d")
    assert pruned.returncode == 0 and pruned.stdout.startswith(f"removed {old.key}\t"), pruned.stderr
    assert store.entries() == [new]
    assert cache.parse_age("12h") == 43200 and cache.parse_age("3") == 3 * 86400


def test_prune_skips_an_entry_in_use(tmp_path: Path):
    store = cache.KernelCache(tmp_path)
    entries = [add(store, "foo", str(n) * 40) for n in range(2)]
    with store.lock(entries[0].key):
        assert store.prune(keep_per_name=0) == [entries[1]]
    assert store.entries() == [entries[0]]


def test_a_kernel_in_use_by_another_process_survives_a_prune(cli, tmp_path: Path):
    """A boot holds its entry (a shared lock) while the VM runs: `invoke cache --keep 0` keeps it."""
    store = cache.KernelCache(tmp_path / "c" / "kernels")
    entry = add(store, "foo", "1" * 40)
    booting = python(
        f"""
        import sys, time
        from pathlib import Path
        from vngtasks import cache
        with cache.KernelCache(Path(sys.argv[1])).using({entry.key!r}):
            print("in use", flush=True)
            time.sleep(60)
        """,
        store.root,
    )
    assert booting.stdout is not None and booting.stdout.readline() == "in use\n"
    pruned = cli("cache", "--cache-dir", str(tmp_path / "c"), "--keep", "0")
    assert pruned.returncode == 0 and f"{entry.key} is being built or used: kept" in pruned.stderr
    assert store.entries() == [entry]
    booting.kill()
    booting.wait()
    assert cli("cache", "--cache-dir", str(tmp_path / "c"), "--keep", "0").returncode == 0
    assert store.entries() == []


def test_using_a_removed_entry_fails(tmp_path: Path):
    store = cache.KernelCache(tmp_path)
    with pytest.raises(Failure, match="was removed before it could be used"), store.using(KEY):
        pass


def test_prune_removes_entries_moved_in_without_a_temp_dir(tmp_path: Path):
    """The action moves restored entries into `kernels/` with mv: no `.tmp` there yet."""
    made = cache.KernelCache(tmp_path / "made")
    entry = add(made, "foo", "1" * 40)
    (tmp_path / "c").mkdir()
    entry.path.rename(tmp_path / "c" / entry.key)
    store = cache.KernelCache(tmp_path / "c")
    assert [e.key for e in store.prune(keep_per_name=0)] == [entry.key]
    assert store.entries() == [] and not (tmp_path / "c" / entry.key).exists()


@pytest.mark.parametrize(("text", "size"), [("0", 0), ("512", 512 << 20), ("20G", 20 << 30), ("1t", 1 << 40)])
def test_sizes(text: str, size: int):
    assert cache.parse_size(text) == size


@pytest.mark.parametrize(("size", "text"), [(0, "0B"), (1023, "1023B"), (1536, "1.5K"), (20 << 30, "20.0G")])
def test_human_sizes(size: int, text: str):
    assert files.human_size(size) == text


@pytest.mark.parametrize(("seconds", "text"), [(5, "5s"), (125, "2m"), (7200, "2h"), (3 * 86400 + 5, "3d")])
def test_human_ages(seconds: float, text: str):
    assert cache.human_age(seconds) == text


def test_cli_lists_and_prunes(cli, tmp_path: Path):
    store = cache.KernelCache(tmp_path / "c" / "kernels")
    first = add(store, "foo", "1" * 40, size=3 << 20, kernel_release="6.12.0-vng")
    second = add(store, "foo", "2" * 40, size=10)
    listed = cli("cache", "--cache-dir", str(tmp_path / "c"))
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [row[2][-1] for row in rows] == ["s", "s"]  # made seconds ago
    assert [row[:2] + row[3:] for row in rows] == [[first.key, "3.0M", "6.12.0-vng"], [second.key, "10B", "-"]]
    pruned = cli("cache", "--cache-dir", str(tmp_path / "c"), "--keep", "1")
    assert pruned.returncode == 0 and pruned.stdout == f"removed {first.key}\t3.0M\n", pruned.stderr
    assert "removed 1, kept 1" in pruned.stderr
    assert store.entries() == [second]


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [("--keep", "-1", "keep"), ("--max-size", "20X", "max-size"), ("--max-age", "2w", "max-age")],
)
def test_cli_bad_prune_flag_exits_2(cli, tmp_path: Path, flag: str, value: str, named: str):
    store = cache.KernelCache(tmp_path / "c" / "kernels")
    add(store, "foo", "1" * 40)
    done = cli("cache", "--cache-dir", str(tmp_path / "c"), flag, value)
    assert done.returncode == 2 and done.stderr.startswith(f"vngtasks: {named}: "), done.stderr
    assert len(store.entries()) == 1


def nested(top: Path, depth: int) -> Path:
    """`depth` directories one in another under `top` (made with relative mkdir: paths stay short)."""
    top.mkdir(parents=True)
    here = os.open(top, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=here)
            deeper = os.open("d", os.O_RDONLY, dir_fd=here)
            os.close(here)
            here = deeper
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=here), "w") as leaf:
            leaf.write("x" * 10)
    finally:
        os.close(here)
    return top


def test_a_deep_tree_neither_breaks_sizes_nor_stops_prune_for_good(tmp_path: Path):
    """A dead build left 1,100 nested directories in the cache's temp dir (recursive tree walks raise
    RecursionError there): prune still removes it, and sizes are still counted."""
    store = cache.KernelCache(tmp_path)
    deep = nested(tmp_path / cache.TEMP / f"{KEY}-0123456789ab", 1100)
    assert cache.disk_usage(deep) == 10
    assert store.prune() == [] and not deep.exists()
    entry = add(store, "foo", "0123456789abcdef", size=100)
    nested(entry.path / "deep", 1100)
    assert store.prune(keep_per_name=0) == [entry] and list((tmp_path / cache.TEMP).iterdir()) == []


def test_a_hard_linked_file_is_counted_once(tmp_path: Path):
    (tmp_path / "a").write_bytes(b"x" * 1000)
    os.link(tmp_path / "a", tmp_path / "b")
    assert cache.disk_usage(tmp_path) == 1000


def test_a_build_hosts_text_is_listed_printable(cli, tmp_path: Path):
    store = cache.KernelCache(tmp_path / "c" / "kernels")
    add(store, "foo", "1" * 40, kernel_release="6.12\x1b]0;OWNED-TITLE\x07\x1b[2K\r")
    listed = cli("cache", "--cache-dir", str(tmp_path / "c"))
    assert listed.returncode == 0 and listed.stdout.split("\t")[-1] == "6.12?]0;OWNED-TITLE??[2K\n", listed.stdout


def test_a_damaged_metadata_file_is_replaced_by_the_next_build_and_pruned(tmp_path: Path, capsys):
    """`printf '{' > metadata.json`: the key must not stay unstorable for good."""
    store = cache.KernelCache(tmp_path)
    entry = add(store, "foo", "0123456789ab" + "0" * 28)
    (entry.path / "metadata.json").write_text("{")
    assert store.lookup(entry.key) is None and store.damaged() == [entry.key]
    again = add(store, "foo", "0123456789ab" + "0" * 28, size=5)
    assert again.size_bytes == 5 and "was damaged (no readable metadata.json): replaced" in capsys.readouterr().err
    (again.path / "metadata.json").unlink()
    assert store.prune() == [] and not again.path.exists() and store.damaged() == []


X86_IMAGE = "arch/x86/boot/bzImage"


def test_an_entry_knows_when_its_files_are_damaged(tmp_path: Path):
    store = cache.KernelCache(tmp_path)
    key = cache.key("foo", "x86_64", "0" * 12, "v2")
    with store.create(key, {"name": "foo", "arch": "x86_64"}) as temp:
        (temp / "arch/x86/boot").mkdir(parents=True)
        (temp / X86_IMAGE).write_bytes(b"k" * 4096)
        (temp / "System.map").write_text("map\n")
    entry = store.lookup(key)
    assert entry is not None and entry.damage() is None
    assert set(entry.metadata["files"]) == {X86_IMAGE, "System.map"} and X86_IMAGE in entry.metadata["sha256"]
    (entry.path / X86_IMAGE).write_bytes(b"x" * 4096)  # same size, other bytes
    assert entry.damage() == f"{X86_IMAGE}: its SHA-256 is not the one recorded"
    (entry.path / X86_IMAGE).write_bytes(b"k" * 1024)
    assert entry.damage() == f"{X86_IMAGE}: 1024 bytes, not 4096"
    (entry.path / X86_IMAGE).unlink()
    assert entry.damage() == f"{X86_IMAGE}: missing"
    (entry.path / X86_IMAGE).symlink_to(tmp_path / "elsewhere")
    assert entry.damage() == f"{X86_IMAGE}: missing"


def test_a_damaged_entry_is_rebuilt_with_one_warning(tmp_path: Path, monkeypatch, capsys):
    from invoke import Context

    from vngtasks import build, provide
    from vngtasks.resolve import Resolved
    from vngtasks.settings import DEFAULTS, effective

    settings = effective(DEFAULTS, {"cache_dir": str(tmp_path / "c"), "name": "foo"}, workspace=tmp_path)
    store = cache.KernelCache(cache.kernels_root(settings))
    sha = "0123456789ab" + "0" * 28
    key = cache.key_for(settings, sha[:12])
    built = []

    def build_here(c, s, kernels, key, resolved):
        built.append(key)
        with kernels.create(key, {"name": "foo", "arch": s.arch.name}) as temp:
            (temp / "System.map").write_text("map\n")
        return kernels.lookup(key)

    monkeypatch.setattr(build, "build_here", build_here)
    first = provide.ensure_kernel(Context(), settings, Resolved(sha, "refs/tags/v1", "remote"))
    assert provide.ensure_kernel(Context(), settings, Resolved(sha, "refs/tags/v1", "remote")) == first
    (first.path / "System.map").write_text("")
    provide.ensure_kernel(Context(), settings, Resolved(sha, "refs/tags/v1", "remote"))
    assert built == [key, key] and store.lookup(key).damage() is None
    assert capsys.readouterr().err.count(f"cache: {key} is damaged (System.map: 0 bytes, not 4): removed") == 1


def test_a_hit_is_found_while_another_boot_uses_the_entry(tmp_path: Path, monkeypatch):
    """A matrix boots one kernel for two refs of one commit: the second cell's look-up finds the entry while the
    first cell's boot holds it in use (a shared lock), instead of waiting for that boot to end."""
    import threading

    from invoke import Context

    from vngtasks import build, provide
    from vngtasks.resolve import Resolved
    from vngtasks.settings import DEFAULTS, effective

    settings = effective(DEFAULTS, {"cache_dir": str(tmp_path / "c"), "name": "foo"}, workspace=tmp_path)
    store = cache.KernelCache(cache.kernels_root(settings))
    sha = "0123456789ab" + "0" * 28
    key = cache.key_for(settings, sha[:12])
    with store.create(key, {"name": "foo", "arch": settings.arch.name}) as temp:
        (temp / "System.map").write_text("map\n")
    monkeypatch.setattr(build, "build_here", lambda *args: pytest.fail("a hit is not built"))
    found: list[cache.Entry] = []
    looking = threading.Thread(
        target=lambda: found.append(
            provide.ensure_kernel(Context(), settings, Resolved(sha, "refs/tags/v1", "remote"))
        ),
        daemon=True,
    )
    with store.using(key):
        looking.start()
        looking.join(timeout=5)
        assert found and found[0].key == key
