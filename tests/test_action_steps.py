"""The action's own steps (vngtasks/action.py, `invoke action.*`): inputs in once, outputs of earlier
steps checked, cache layers staged in and out. The act runs in test_action.py run them for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vngtasks import action, reference
from vngtasks.settings import SETTINGS
from vngtasks.validate import InputError

ROOT = Path(__file__).resolve().parent.parent
SHA = "0123456789abcdef0123456789abcdef01234567"
KEY = f"vng-kernel-ci-x86_64-{SHA[:12]}-v2+tiny"


def inputs(**changed: str) -> dict[str, str]:
    """Every input, as `toJSON(inputs)` gives them: the defaults, `name` and `run` set."""
    values = {reference.action_input_name(s): s.default for s in SETTINGS}
    return {**values, "name": "ci", "run": "make test\necho done", **changed}


def invoke(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("INVOKE_", "GITHUB_", "VNGTASKS_"))}
    return subprocess.run(
        [sys.executable, "-m", "invoke", "-r", str(ROOT), *args],
        env={**environ, "HOME": str(cwd), **env}, cwd=cwd, capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_inputs_become_one_settings_file_that_later_steps_read(tmp_path: Path) -> None:
    (tmp_path / "rt").mkdir()
    (tmp_path / "vngtasks.yaml").write_text("vng: {memory: 1G, cpus: '1'}\n")  # the action's inputs win
    given = inputs(memory="2G", **{"kernel-tag": "v6.12", "cache-dir": str(tmp_path / "cache")})
    env = {"VNGTASKS_ACTION_INPUTS": json.dumps(given), "RUNNER_TEMP": str(tmp_path / "rt"),
           "GITHUB_OUTPUT": str(tmp_path / "out")}  # fmt: skip
    done = invoke(["action.settings"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    outputs = dict(line.split("=", 1) for line in (tmp_path / "out").read_text().splitlines())
    path = Path(outputs["file"])
    assert path.parent == tmp_path / "rt" and path.stat().st_mode & 0o777 == 0o600
    assert yaml.safe_load(path.read_text())["vng"]["run"] == "make test\necho done"
    assert outputs["stage-dir"] == str(tmp_path / "cache" / "action" / "kernel")
    shown = invoke(["settings"], {"INVOKE_RUNTIME_CONFIG": str(path)}, tmp_path)
    assert "memory-mib=2048\n" in shown.stdout and "tag=v6.12\n" in shown.stdout and "cpus=" in shown.stdout
    assert "cpus=1\n" not in shown.stdout  # the settings file is above the workspace's vngtasks.yaml


@pytest.mark.parametrize(
    ("given", "error"),
    [
        (json.dumps(inputs(memory="4X")), "memory: '4X' is not a size"),
        (json.dumps({"no-such-input": "x"}), "no-such-input: not an input of vngtasks"),
        (json.dumps({"memory": 4}), "memory: expected a string"),
        ("[1, 2]", "VNGTASKS_ACTION_INPUTS: expected the action's inputs as a JSON object"),
        ("{", "VNGTASKS_ACTION_INPUTS: not JSON"),
    ],
)
def test_bad_inputs_are_one_line_and_exit_2_with_nothing_written(tmp_path: Path, given: str, error: str) -> None:
    (tmp_path / "rt").mkdir()
    env = {"VNGTASKS_ACTION_INPUTS": given, "RUNNER_TEMP": str(tmp_path / "rt"), "GITHUB_OUTPUT": str(tmp_path / "o")}
    done = invoke(["action.settings"], env, tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and error in done.stderr
    assert not list((tmp_path / "rt").iterdir()) and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "outputs",
    [
        {"sha": SHA, "key": KEY, "cache-hit": "maybe", "remote-failed": "false"},
        {"sha": SHA[:39], "key": KEY, "cache-hit": "true", "remote-failed": "false"},
        {"sha": SHA, "key": "../../etc", "cache-hit": "true", "remote-failed": "false"},
        {"sha": SHA, "key": KEY.replace(SHA[:12], "f" * 12), "cache-hit": "true", "remote-failed": "false"},
        {"sha": SHA, "key": KEY + "\nx=1", "cache-hit": "true", "remote-failed": "false"},
    ],
    ids=["flag", "short-sha", "path-key", "other-sha", "newline"],
)
def test_outputs_of_earlier_steps_are_checked(outputs: dict[str, str]) -> None:
    with pytest.raises(InputError, match=r"^KERNEL: "):
        action.kernel_from_outputs(json.dumps(outputs), "KERNEL", hit="cache-hit")


def test_a_resolved_kernel_passes_through_the_kernel_step() -> None:
    resolved = {"sha": SHA, "key": KEY, "cache-hit": "true", "remote-failed": "false"}
    found = action.kernel_from_outputs(json.dumps(resolved), "FIRST", hit="cache-hit")
    assert found.outputs() == {"sha": SHA, "sha12": SHA[:12], "key": KEY, "local-hit": "true", "remote-failed": "false"}
    # what the kernel step hands on, the finish step reads back the same
    assert action.kernel_from_outputs(json.dumps(found.outputs()), "KERNEL", hit="local-hit") == found
    assert action.how_it_came(found, restored=False, built_seconds=None) == (True, "cache hit (local)")
    assert action.how_it_came(found, restored=False, built_seconds=812) == (False, "built in 812 s")


def test_staging_in_moves_only_plain_entries_and_never_over_one(tmp_path: Path) -> None:
    stage, kernels = tmp_path / "stage", tmp_path / "kernels"
    (stage / KEY).mkdir(parents=True)
    (stage / KEY / "metadata.json").write_text("{}")
    (stage / "vng-kernel-evil").symlink_to("/etc")
    (stage / "not-a-key").mkdir()
    (kernels / "vng-kernel-kept").mkdir(parents=True)
    (stage / "vng-kernel-kept").mkdir()
    assert action.stage_in(stage, kernels) == [KEY]
    assert (kernels / KEY / "metadata.json").is_file()
    assert sorted(p.name for p in kernels.iterdir()) == sorted([KEY, "vng-kernel-kept"])


def test_staging_out_hard_links_the_entry(tmp_path: Path) -> None:
    entry = tmp_path / "kernels" / KEY
    entry.mkdir(parents=True)
    (entry / "bzImage").write_bytes(b"k")
    staged = action.stage_out(entry, tmp_path / "stage")
    assert (
        staged == tmp_path / "stage" / KEY and (staged / "bzImage").stat().st_ino == (entry / "bzImage").stat().st_ino
    )


def test_the_workspace_link_replaces_a_link_and_leaves_a_directory(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    entry.mkdir()
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "linux").symlink_to(tmp_path / "old")
    action.link_workspace(workspace, entry)
    assert os.readlink(workspace / "linux") == str(entry)
    (workspace / "linux").unlink()
    (workspace / "linux").mkdir()
    action.link_workspace(workspace, entry)
    assert (workspace / "linux").is_dir() and not (workspace / "linux").is_symlink()


def test_an_output_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        action.write_outputs(tmp_path / "out", {"key": "a\nsha=evil"})
    assert not (tmp_path / "out").exists()


def test_the_summary_row_escapes_the_tag(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    action.add_summary_row(summary, "ci", "a|b", SHA[:12], "cache hit (local)")
    action.add_summary_row(summary, "ci", "v6.12", SHA[:12], "built in 9 s")
    text = summary.read_text()
    assert text.count(action.SUMMARY_HEADER) == 1 and f"| ci | a\\|b → {SHA[:12]} | cache hit (local) |" in text


def test_the_kernel_and_finish_steps_hand_the_kernel_on(tmp_path: Path) -> None:
    """The steps after the resolve, as action.yml chains them: the kernel step's outputs are what the
    finish step reads (act runs the whole chain in test_action.py)."""
    (tmp_path / "rt").mkdir()
    cache_dir = tmp_path / "cache"
    (cache_dir / "kernels" / KEY).mkdir(parents=True)
    (cache_dir / "kernels" / KEY / "metadata.json").write_text("{}")
    out = tmp_path / "out"
    env = {"RUNNER_TEMP": str(tmp_path / "rt"), "GITHUB_OUTPUT": str(out), "GITHUB_STEP_SUMMARY": str(tmp_path / "s")}
    given = inputs(**{"kernel-tag": "v6.12", "cache-dir": str(cache_dir), "kconfig-base": "tiny"})
    assert invoke(["action.settings"], {**env, "VNGTASKS_ACTION_INPUTS": json.dumps(given)}, tmp_path).returncode == 0
    env["INVOKE_RUNTIME_CONFIG"] = out.read_text().split("file=", 1)[1].split("\n", 1)[0]

    def outputs() -> dict[str, str]:
        values = dict(line.split("=", 1) for line in out.read_text().splitlines())
        out.unlink()
        return values

    outputs()
    first = {"sha": SHA, "sha12": SHA[:12], "key": KEY, "cache-hit": "true", "remote-failed": "false"}
    done = invoke(["action.kernel"], {**env, "FIRST": json.dumps(first), "AGAIN": "{}"}, tmp_path)
    assert done.returncode == 0, done.stderr
    kernel = outputs()
    assert kernel == {"sha": SHA, "sha12": SHA[:12], "key": KEY, "local-hit": "true", "remote-failed": "false"}
    done = invoke(
        ["action.finish"], {**env, "KERNEL": json.dumps(kernel), "RESTORED": "", "BUILD_SECONDS": ""}, tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert outputs() == {"cache-hit": "true", "kernel-dir": str(cache_dir / "kernels" / KEY)}
    assert os.readlink(tmp_path / "linux") == str(cache_dir / "kernels" / KEY)
    assert f"| ci | v6.12 → {SHA[:12]} | cache hit (local) |" in (tmp_path / "s").read_text()
    # Built by the build step: its time and the entry's ccache counts (remote hits: it was built with a remote).
    counts = {"hits": 5, "local_hits": 3, "remote_hits": 2, "misses": 1, "remote_errors": 0}
    metadata = {"ccache": counts, "ccache_remote": "http://***@cache.example/ccache"}
    (cache_dir / "kernels" / KEY / "metadata.json").write_text(json.dumps(metadata))
    built = {**kernel, "local-hit": "false"}
    done = invoke(
        ["action.finish"], {**env, "KERNEL": json.dumps(built), "RESTORED": "", "BUILD_SECONDS": "93"}, tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert outputs()["cache-hit"] == "false"
    row = f"| ci | v6.12 → {SHA[:12]} | built in 93 s (ccache: 3 local hits, 2 remote hits, 1 miss) |"
    assert row in (tmp_path / "s").read_text()


def test_a_runtime_config_file_is_above_the_environment_and_the_workspace_file(tmp_path: Path) -> None:
    """README's order: ... vngtasks.yaml, INVOKE_VNG_* env, a runtime config file (`invoke -f FILE` or
    INVOKE_RUNTIME_CONFIG), then flags."""
    (tmp_path / "vngtasks.yaml").write_text("vng: {memory: 1G, cpus: '1'}\n")
    (tmp_path / "run.yaml").write_text("vng: {memory: 2G}\n")
    env = {"INVOKE_VNG_MEMORY": "3G", "INVOKE_VNG_CPUS": "2"}
    by_flag = invoke(["-f", str(tmp_path / "run.yaml"), "settings"], env, tmp_path)
    by_env = invoke(["settings"], {**env, "INVOKE_RUNTIME_CONFIG": str(tmp_path / "run.yaml")}, tmp_path)
    for shown in (by_flag, by_env):
        assert "memory-mib=2048\n" in shown.stdout and "cpus=2\n" in shown.stdout, shown.stderr
    (tmp_path / "vmlinuz").write_bytes(b"a kernel image")  # a dry run boots nothing: no /boot kernel needed
    boot = ["boot", "--kernel", "vmlinuz", "--memory", "4G", "--dry-run", "--", "true"]
    flagged = invoke(["-f", str(tmp_path / "run.yaml"), *boot], env, tmp_path)
    assert "--memory=4096M" in flagged.stdout, flagged.stderr


def test_a_ccache_dir_of_two_lines_is_bad_input_not_a_second_cache_path(tmp_path: Path) -> None:
    """CCACHE_DIR becomes a `path:` of actions/cache, which takes a path a line: a line break would save
    another directory (say ~/.ssh) to the cache."""
    (tmp_path / "rt").mkdir()
    env = {"VNGTASKS_ACTION_INPUTS": json.dumps(inputs()), "RUNNER_TEMP": str(tmp_path / "rt"),
           "GITHUB_OUTPUT": str(tmp_path / "out"), "CCACHE_DIR": f"{tmp_path}/ccache\n{tmp_path}/.ssh"}  # fmt: skip
    done = invoke(["action.settings"], env, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "vngtasks: CCACHE_DIR: must be a single line without control characters"
    assert not (tmp_path / "out").exists() and list((tmp_path / "rt").iterdir()) == []  # nothing written


def test_odd_keys_and_nul_characters_are_one_line_of_bad_input(tmp_path: Path) -> None:
    (tmp_path / "vngtasks.yaml").write_text('vng: {extra_rwdirs: "a\\0b"}\n')
    done = invoke(["settings"], {}, tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == "vngtasks: extra-rwdirs: holds a NUL character"
    (tmp_path / "vngtasks.yaml").write_text("vng: {__class__: x}\n")
    done = invoke(["settings"], {}, tmp_path)
    assert done.returncode == 2 and done.stderr.strip().startswith("vngtasks: __class__: not a known setting")


def test_a_ccache_remote_s_secrets_are_masked_first_and_never_shown(tmp_path: Path) -> None:
    (tmp_path / "rt").mkdir()
    url = "redis://ci:s3cret@cache.example:6379|connect-timeout=200"
    env = {"VNGTASKS_ACTION_INPUTS": json.dumps(inputs(**{"ccache-remote": url})), "RUNNER_TEMP": str(tmp_path / "rt"),
           "GITHUB_OUTPUT": str(tmp_path / "out")}  # fmt: skip
    done = invoke(["action.settings"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["::add-mask::ci:s3cret"] and "s3cret" not in done.stderr
    path = dict(line.split("=", 1) for line in (tmp_path / "out").read_text().splitlines())["file"]
    shown = invoke(["settings"], {"INVOKE_RUNTIME_CONFIG": path}, tmp_path)
    assert "ccache-remote=redis://***@cache.example:6379|connect-timeout=200\n" in shown.stdout
    assert "s3cret" not in shown.stdout + shown.stderr
