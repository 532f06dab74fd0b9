"""The xdist groups the machine tiers rely on (conftest: HOST_PACKAGES, TINY_TREE): tests of one group run on one
worker, as pytest-xdist's `--dist loadgroup` promises and pytest 9.2 broke (conftest fails such a test by name)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

GROUPED = """
import os
import pytest

pytestmark = pytest.mark.xdist_group("together")


@pytest.mark.parametrize("n", range(4))
def test_where(n):
    print("WORKER", os.environ["PYTEST_XDIST_WORKER"])
"""


def test_a_groups_tests_run_on_one_worker(tmp_path: Path) -> None:
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
         "-v", "-s", "-m", "unit", "--rootdir", str(tmp_path), str(tmp_path / "test_grouped.py")],
        env={**os.environ, "PYTHONPATH": str(TESTS)}, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    ran = re.findall(r"\[(gw\d)\] .*PASSED .*test_where\[\d\]@together", done.stdout)
    assert len(ran) == 4 and len(set(ran)) == 1, done.stdout[-3000:]
