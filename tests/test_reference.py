"""The settings table's renderings are current: README.md's table and action.yml's inputs.
VNGTASKS_REGEN_GOLDEN=1 rewrites both; review the diff."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from vngtasks import reference
from vngtasks.settings import BY_NAME, DEFAULTS, SETTINGS, Settings, taken_by

ROOT = Path(__file__).resolve().parent.parent
REGEN = os.environ.get("VNGTASKS_REGEN_GOLDEN") == "1"


@pytest.mark.parametrize(
    ("path", "markers", "render"),
    [
        (ROOT / "README.md", reference.README_MARKERS, reference.readme_table),
        (ROOT / "action.yml", reference.ACTION_MARKERS, reference.action_inputs),
    ],
    ids=["README.md", "action.yml"],
)
def test_renderings_of_the_table_are_current(path: Path, markers: tuple[str, str], render) -> None:
    text = path.read_text()
    current = reference.replace_between(text, markers, render())
    if REGEN:
        path.write_text(current)
    assert text == current, f"{path.name}: the settings table changed: run with VNGTASKS_REGEN_GOLDEN=1 and review"


def test_action_inputs_are_the_table() -> None:
    inputs = yaml.safe_load((ROOT / "action.yml").read_text())["inputs"]
    assert list(inputs) == [reference.action_input_name(setting) for setting in SETTINGS]
    for setting in SETTINGS:
        spec = inputs[reference.action_input_name(setting)]
        assert spec["description"].lower() == setting.help.lower(), setting.name
        if setting.action_required:
            assert spec == {"description": spec["description"], "required": True}, setting.name
        else:
            assert spec["default"] == setting.default, setting.name


def settings_fields() -> list[str]:
    """The `Settings` fields the table fills (all but the workspace)."""
    return [field.name for field in fields(Settings) if field.name != "workspace"]


def test_settings_has_one_field_per_row_in_the_table_order() -> None:
    assert settings_fields() == [setting.field or setting.name for setting in SETTINGS]
    assert list(DEFAULTS) == list(BY_NAME) == [setting.name for setting in SETTINGS]
    assert "workspace" in Settings.__dataclass_fields__


def test_each_task_takes_the_settings_it_needs() -> None:
    assert set(taken_by("resolve")) <= set(taken_by("build")) <= set(taken_by("boot"))
    assert taken_by("cache") == ["cache_dir"]
    assert {"packages", "deps_timeout", "arch", "cc", "llvm"} <= set(taken_by("deps"))
    assert "run" not in taken_by("boot")  # the workload comes after `--`


def test_the_readme_workflow_example_uses_only_the_action_s_inputs() -> None:
    readme = (ROOT / "README.md").read_text()
    example = readme.split("**In GitHub Actions**", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    inputs = yaml.safe_load((ROOT / "action.yml").read_text())["inputs"]
    (step,) = [s for s in yaml.safe_load(example)["jobs"]["test"]["steps"] if "vngtasks" in s.get("uses", "")]
    assert set(step["with"]) <= set(inputs)
    assert {name for name, spec in inputs.items() if spec.get("required")} <= set(step["with"])
    assert {"kernel-sha", "cache-hit"} <= set(yaml.safe_load((ROOT / "action.yml").read_text())["outputs"])
