"""`invoke matrix` without a kernel (unit tier): its lists, cells, the kept file read as a hostile record, the table.
tests/test_build.py runs a real one (2 refs x x86_64 and arm64, tiny)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vngtasks import matrix
from vngtasks.errors import BAD_INPUT, FAILED, Failure

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
    s = settings.effective({}, {"tag": "v6.12", "cache_dir": str(tmp_path / "c"), "log_dir": str(tmp_path / "logs"),
                                "run": "true"}, workspace=tmp_path)  # fmt: skip
    cell = matrix.Cell("v6.12", s.arch.name, str(s.kconfig_base))
    done = matrix.run_cell(None, s, resolve.Resolved("b" * 40, "refs/tags/v6.12", "tag"), 1, cell)
    assert (done.result, done.status, done.release, done.boot_seconds) == (matrix.NO_KERNEL, FAILED, "", 0.0)
    assert f"matrix: {cell.label}: no kernel: build: make failed (exit 2)" in capsys.readouterr().err
    assert matrix.conclude(tmp_path / "matrix.json", {"run": "true"}, [DONE, done]) == FAILED
    row = f"| v6.12 | {s.arch.name} | {s.kconfig_base} | bbbbbbbbbbbb | no-kernel ({FAILED}) |"
    assert row in capsys.readouterr().out
