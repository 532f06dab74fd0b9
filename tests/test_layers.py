"""Which modules a module pulls in: the lower layers of the VM run know nothing of settings."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["vngtasks.health", "vngtasks.supervise"])
def test_supervision_and_health_work_on_plain_values(module: str) -> None:
    """supervise.py takes paths and seconds, health.py paths and bytes: neither loads the settings model."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('vngtasks')))"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "vngtasks.settings" not in loaded and module in loaded
