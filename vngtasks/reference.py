"""The settings table rendered for people: the README's settings table and action.yml's inputs.

Both files hold the rendering between two marker lines; tests/test_reference.py fails when either
is not current, and rewrites both with VNGTASKS_REGEN_GOLDEN=1.
"""

from __future__ import annotations

import json

from .settings import SETTINGS, Setting

README_MARKERS = ("<!-- settings table: from vngtasks/settings.py -->", "<!-- end of settings table -->")
ACTION_MARKERS = ("  # inputs: from vngtasks/settings.py", "  # end of inputs")


def _tasks(setting: Setting) -> str:
    return ", ".join(setting.tasks) if setting.tasks else "(config, env, action)"


def readme_table() -> str:
    rows = ["| setting | default | flag of | meaning |", "|---------|---------|---------|---------|"]
    for setting in SETTINGS:
        default = setting.shown or (f"`{setting.default}`" if setting.default else "")
        rows.append(f"| `{setting.dashed}` | {default} | {_tasks(setting)} | {setting.help} |")
    return "\n".join(rows)


def action_input_name(setting: Setting) -> str:
    return setting.action_input or setting.dashed


def action_inputs() -> str:
    """action.yml's `inputs:` entries, one line each."""
    lines = []
    for setting in SETTINGS:
        spec = {"description": setting.help[0].upper() + setting.help[1:]}
        spec.update({"required": True} if setting.action_required else {"default": setting.default})
        fields = ", ".join(f"{key}: {json.dumps(value)}" for key, value in spec.items())
        lines.append(f"  {action_input_name(setting)}: {{{fields}}}")
    return "\n".join(lines)


def replace_between(text: str, markers: tuple[str, str], body: str) -> str:
    """`text` with the lines between the two marker lines replaced by `body`."""
    begin, end = markers
    head, rest = text.split(begin + "\n", 1)
    _, tail = rest.split(end + "\n", 1)
    return f"{head}{begin}\n{body}\n{end}\n{tail}"
