"""The noxfile's own housekeeping (unit tier): loaded with a stand-in for nox, which the tests' venv has not."""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def noxfile(monkeypatch) -> types.ModuleType:
    """noxfile.py as a module, its decorators and options given by a stand-in `nox` (they only register sessions)."""

    def session(*args, **kwargs):
        return args[0] if args and callable(args[0]) else (lambda function: function)

    monkeypatch.setitem(sys.modules, "nox", types.SimpleNamespace(options=types.SimpleNamespace(), session=session))
    spec = importlib.util.spec_from_file_location("noxfile_under_test", ROOT / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_last_runs_temporary_directory_is_set_aside_and_deleted_in_the_background(tmp_path, monkeypatch):
    """README: the last run's temporary directory is deleted in the background when the session starts: gone from
    its place at once (pytest then makes a new one), and deleted with what an earlier deletion left."""
    last = tmp_path / "tests"
    (last / "kernel-tree").mkdir(parents=True)
    (last / "kernel-tree" / "vmlinux").write_bytes(b"x" * 4096)
    (tmp_path / "tests.old-1").mkdir()  # a deletion killed half way
    other = tmp_path / "tests-other"
    other.mkdir()
    noxfile(monkeypatch)._set_aside(last)
    assert not last.exists()
    for _ in range(300):  # rm runs on its own; wait for it (at most 30 s)
        if sorted(p.name for p in tmp_path.iterdir()) == ["tests-other"]:
            break
        time.sleep(0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tests-other"]
