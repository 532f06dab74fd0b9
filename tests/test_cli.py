"""The real `invoke` command line: bad input stops before anything is touched."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--memory", "4X", "memory"),
        ("--cpus", "0", "cpus"),
        ("--name", "../x", "name"),
        ("--kconfig", "no-such-file", "kconfig"),
        ("--arch", "sparc", "arch"),
        ("--verbose", "maybe", "verbose"),
        ("--run-timeout", "-1", "run-timeout"),
        ("--accel", "fast", "accel"),
    ],
)
def test_bad_flag_exits_2_and_touches_nothing(cli, home: Path, workspace: Path, flag: str, value: str, named: str):
    done = cli("boot", flag, value, "--", "touch", "ran")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"vngtasks: {named}: "), done.stderr
    assert list(home.iterdir()) == [] and list(workspace.iterdir()) == []


def test_env_feeds_the_same_validation(cli, home: Path):
    done = cli("boot", "--", "true", env={"INVOKE_VNG_NAME": "../x"})
    assert done.returncode == 2 and done.stderr.startswith("vngtasks: name: ")
    assert list(home.iterdir()) == []


def test_sources_layer_defaults_yaml_env(cli, home: Path):
    (home / ".invoke.yaml").write_text("vng:\n  memory: 1G\n  cpus: 1\n  verbose: false\n")
    shown = dict(line.split("=", 1) for line in cli("settings", env={"INVOKE_VNG_CPUS": "2"}).stdout.splitlines())
    assert shown["memory-mib"] == "1024"  # invoke.yaml over the default
    assert shown["cpus"] == "2"  # env over invoke.yaml
    assert shown["verbose"] == "false"  # a YAML boolean is accepted
    assert shown["version"] == "v2"  # declared default


def test_flag_beats_env(cli, home: Path):
    # A valid env value with a bad flag: the flag is what gets validated.
    done = cli("boot", "--memory", "4X", "--", "true", env={"INVOKE_VNG_MEMORY": "1G"})
    assert done.returncode == 2 and done.stderr.startswith("vngtasks: memory: '4X'")


def test_no_workload_is_bad_input(cli):
    done = cli("boot")
    assert done.returncode == 2 and done.stderr.startswith("vngtasks: run: ")


def test_kvm_for_a_foreign_arch_is_bad_input(cli):
    done = cli("boot", "--arch", "s390x", "--accel", "kvm", "--", "true")
    assert done.returncode == 2 and done.stderr.startswith("vngtasks: accel: "), done.stderr


def test_tasks_are_listed(cli):
    listed = cli("--list").stdout
    assert "boot" in listed and "settings" in listed
