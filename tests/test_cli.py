"""The real `invoke` command line: bad input stops before anything is touched, and no shell ever runs
what a path or value holds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_invoke
from linux_remote import git

# (arguments after `invoke`, the setting the one line must name). Every row exits 2.
BAD_INPUT = [
    (["boot", "--memory", "4X"], "memory"),
    (["boot", "--memory", "0"], "memory"),
    (["boot", "--cpus", "0"], "cpus"),
    (["boot", "--cpus", "two"], "cpus"),
    (["boot", "--name", "../x"], "name"),
    (["boot", "--name", "-x"], "name"),
    (["boot", "--name", "a" * 250], "name"),
    (["boot", "--version", "v2/../../x"], "version"),
    (["boot", "--kconfig", "no-such-file"], "kconfig"),
    (["boot", "--kconfig-base", "huge"], "kconfig-base"),
    (["boot", "--kconfig-base", "tiny", "--arch", "s390x"], "kconfig-base"),
    (["boot", "--arch", "sparc"], "arch"),
    (["boot", "--accel", "fast"], "accel"),
    (["boot", "--arch", "s390x", "--accel", "kvm"], "accel"),
    (["boot", "--verbose", "maybe"], "verbose"),
    (["boot", "--workspace-rw", "yes"], "workspace-rw"),
    (["boot", "--splat-check", "True"], "splat-check"),
    (["boot", "--splat-allow", "(unclosed"], "splat-allow"),
    (["boot", "--run-timeout", "-1"], "run-timeout"),
    (["boot", "--boot-timeout", "soon"], "boot-timeout"),
    (["boot", "--network", "tap"], "network"),
    (["boot", "--append", "quiet foo='bar"], "append"),
    (["boot", "--qemu-opts", "-device 'unterminated"], "qemu-opts"),
    (["boot", "--qemu-opts", "-device virtio-rng-pci,id=$(reboot)"], "qemu-opts"),
    (["boot", "--qemu-opts", "-name '' -device x"], "qemu-opts"),  # refused, never silently dropped
    (["boot", "--kernel", "/etc"], "kernel"),
    (["boot", "--kernel", "/dev/null"], "kernel"),
    (["boot", "--kernel", "no-such-kernel"], "kernel"),
    (["boot", "--cache-dir", "/etc/passwd"], "cache-dir"),
    (["boot", "--cache-dir", "/etc/passwd/below"], "cache-dir"),
    (["boot", "--log-dir", "/proc/nope"], "log-dir"),
    (["boot", "--extra-rwdirs", "/tmp/a=b"], "extra-rwdirs"),
    (["boot", "--cc", "gcc; rm -rf /"], "cc"),
    (["boot", "--llvm", "yes"], "llvm"),
    (["boot", "--kernel-compile-cache", "no"], "kernel-compile-cache"),
    (["boot", "--vmlinux-h", "0"], "vmlinux-h"),
    (["boot", "--tag", "--upload-pack=evil"], "tag"),
    (["boot", "--kernel-url", "-oProxyCommand=evil"], "kernel-url"),
    (["boot", "--build-host", "host; id"], "build-host"),
    (["boot", "--build-host", "builder:99999"], "build-host"),
    (["boot", "--build-host", "builder:0"], "build-host"),
    (["boot", "--build-host-accept-new", "Y"], "build-host-accept-new"),
    (["deps", "--packages", "openssh-server-"], "packages"),
    (["deps", "--packages", "--allow-unauthenticated"], "packages"),
    (["deps", "--packages", "Upper"], "packages"),
    (["deps", "--deps-retries", "0"], "deps-retries"),
    (["deps", "--deps-timeout", "1.5"], "deps-timeout"),
    (["deps", "--install-recommends", "maybe"], "install-recommends"),
    (["deps", "--apt-cache", "1"], "apt-cache"),
    (["build", "--tag", "v6.12", "--name", ".hidden"], "name"),
    (["resolve", "--tag", "v6.12", "--version", ""], "version"),
    (["bisect", "--bad", "v6.12"], "good"),
    (["bisect", "--good", "v6.11"], "bad"),
    (["bisect", "--good=--upload-pack=evil", "--bad", "v6.12"], "good"),
    (["bisect", "--good", "v6.11", "--bad", "v6.12", "--on-build-failure", "maybe"], "on-build-failure"),
    (["bisect", "--good", "v6.11", "--bad", "v6.12", "--results", "ktap", "--test", "t", "--same-crash"], "same-crash"),
    (["boot", "--debug", "kasan,kcsan"], "debug"),
    (["boot", "--vmcore", "on-failure", "--arch", "s390x"], "vmcore"),
    (["matrix", "--tag", "v6.12,,v6.6"], "tag"),
    (["matrix", "--tag", "v6.12", "--arch", "x86_64,arm64", "--kconfig-base", "tiny,nope"], "kconfig-base"),
    (["matrix", "--tag", "v6.12", "--arch", "x86_64,s390x", "--vmcore", "on-failure"], "vmcore"),
    (["matrix", "--arch", "x86_64,arm64"], "tag"),
    (["build", "--tag", "v6.12", "--ccache-remote", "https://cache.example/c"], "ccache-remote"),
    (["build", "--tag", "v6.12", "--distcc-hosts", "@helper:/tmp/distccd"], "distcc-hosts"),
    (["build", "--tag", "v6.12", "--distcc-hosts", "helper/4"], "distcc-hosts"),  # TCP, without distcc-tcp
    (["boot", "--distcc-tcp", "yes"], "distcc-tcp"),
    (["bisect", "--good", "v6.11", "--bad", "v6.12", "--memory", "4X"], "memory"),
    (["cache", "--keep", "-1"], "keep"),
    (["cache", "--max-size", "20X"], "max-size"),
]


@pytest.mark.parametrize(("args", "named"), BAD_INPUT, ids=[" ".join(a)[:60] for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_naming_it_and_touches_nothing(cli, home, workspace, args, named):
    done = cli(*args, *(["--", "touch ran"] if args[0] in ("boot", "bisect", "matrix") else []))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"vngtasks: {named}: "), done.stderr
    assert list(home.iterdir()) == [] and list(workspace.iterdir()) == []


def test_a_cache_dir_too_long_for_qemu_s_qmp_socket_is_bad_input_with_vmcore(cli, home, workspace, tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"MZ")
    long = tmp_path / ("c" * 80)
    done = cli("boot", "--kernel", str(kernel), "--vmcore", "on-failure", "--cache-dir", str(long), "--", "touch ran")
    assert done.returncode == 2 and done.stderr.startswith("vngtasks: cache-dir: too long a path for QEMU's QMP socket")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert list(home.iterdir()) == [] and list(workspace.iterdir()) == [] and not long.exists()


def test_invokes_own_parse_errors_are_bad_input_too(cli, home, workspace):
    for args in (["boot", "--nope", "1"], ["boot", "--memory"], ["no-such-task"], ["--help", "no-such-task"]):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.strip().splitlines()[-1].startswith("vngtasks: "), done.stderr
    assert list(home.iterdir()) == [] and list(workspace.iterdir()) == []


def test_a_misspelt_setting_in_env_or_invoke_yaml_is_named(cli, home: Path, workspace: Path):
    done = cli("settings", env={"INVOKE_VNG_MEMROY": "1G"})
    assert done.returncode == 2 and done.stderr.strip() == (
        "vngtasks: memroy: not a known setting (INVOKE_VNG_MEMROY in the environment)"
    )
    (home / ".invoke.yaml").write_text("vng:\n  memroy: 1G\n")
    done = cli("settings")
    assert done.returncode == 2 and done.stderr.startswith("vngtasks: memroy: not a known setting"), done.stderr


def test_a_file_where_the_propagated_sha_goes_is_bad_input(cli, tmp_path: Path, workspace: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "commit", "-q", "--allow-empty", "-m", "one")
    git(repo, "tag", "v1")
    (workspace / ".vng-sha-default").write_text("not a directory")
    done = cli("resolve", "--tag", "v1", "--kernel-url", str(repo), "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "vngtasks: .vng-sha-default: exists in the workspace and is not a directory"
    ), done.stderr


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


def test_tasks_are_listed(cli):
    listed = cli("--list").stdout
    assert "boot" in listed and "settings" in listed


# ---- no shell parses a path: vng pastes paths into a command line its shell runs, so every path that
# reaches it (and the workspace's own name) holds plain characters only; the rest is refused as bad input.

PAYLOADS = ["$(touch${IFS}pwned)", "`touch${IFS}pwned`", ";touch${IFS}pwned;", "|touch${IFS}pwned"]
PATH_SETTINGS = ["workspace", "cache-dir", "log-dir", "extra-rwdirs", "kernel", "kconfig", "kconfig-base"]


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("setting", PATH_SETTINGS)
def test_no_shell_runs_what_a_path_holds(home: Path, tmp_path: Path, setting: str, payload: str):
    where = tmp_path / f"w{payload}x"  # exists, so only its characters can be wrong
    where.mkdir()
    (where / "kernel.config").write_text("CONFIG_IKCONFIG=y\n")
    workspace = where if setting == "workspace" else tmp_path
    value = {"kernel": str(where / "kernel.config"), "kconfig": str(where / "kernel.config")}
    value["kconfig-base"] = value["kconfig"]
    flags = [] if setting == "workspace" else [f"--{setting}", value.get(setting, str(where))]
    done = run_invoke(("boot", *flags, "--", "true"), home=home, cwd=workspace)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"vngtasks: {setting}: ") and "shell command" in done.stderr, done.stderr
    assert not [p for p in tmp_path.rglob("pwned")] and not Path("pwned").exists()


def test_a_github_file_in_an_unplain_directory_is_refused(cli, tmp_path: Path, home: Path):
    odd = tmp_path / "runner$(touch pwned)"
    odd.mkdir()
    (tmp_path / "vmlinuz").write_bytes(b"a kernel image")  # refused before QEMU or a kernel is needed
    done = cli("boot", "--kernel", str(tmp_path / "vmlinuz"), "--", "true", env={"GITHUB_OUTPUT": str(odd / "output")})
    assert done.returncode == 2 and done.stderr.startswith("vngtasks: GITHUB_OUTPUT: "), done.stderr
    assert not list(tmp_path.rglob("pwned")) and not os.path.exists("pwned")


def test_a_command_of_ours_that_fails_exits_1_whatever_its_own_status():
    """make exits 2 when it fails: that must not read as bad input (2) here."""
    from invoke import Context
    from invoke.exceptions import Exit

    from vngtasks.tasks import _common

    with pytest.raises(Exit) as stopped, _common.exit_statuses():
        Context().run("exit 2", hide=True, in_stream=False)
    assert stopped.value.code == 1 and stopped.value.message == "vngtasks: `exit 2` failed with exit status 2"


def test_the_workspaces_vngtasks_yaml_is_read_below_env_and_flags(cli, home: Path, workspace: Path):
    (home / ".invoke.yaml").write_text("vng:\n  memory: 1G\n  cpus: 1\n")
    (workspace / "vngtasks.yaml").write_text("vng:\n  memory: 2G\n  cpus: 3\n  name: ws\n")
    done = cli("settings", env={"INVOKE_VNG_CPUS": "2"})
    shown = dict(line.split("=", 1) for line in done.stdout.splitlines())
    assert (shown["memory-mib"], shown["cpus"], shown["name"]) == ("2048", "2", "ws")  # over ~/.invoke.yaml
    assert done.stderr.strip() == f"vngtasks: settings: read {home / '.invoke.yaml'}, {workspace / 'vngtasks.yaml'}"
    assert cli("boot", "--memory", "4X", "--", "true").stderr.startswith("vngtasks: memory: '4X'")  # flags win
    (workspace / "vngtasks.yaml").write_text("vng:\n  memroy: 2G\n")
    done = cli("settings")
    assert done.returncode == 2 and done.stderr.startswith("vngtasks: memroy: not a known setting"), done.stderr
    (workspace / "vngtasks.yaml").write_text("- not a mapping\n")
    done = cli("settings")
    assert done.returncode == 2 and done.stderr.startswith("vngtasks: vngtasks.yaml: "), done.stderr


def test_a_path_that_a_link_makes_unplain_is_refused_after_the_resolve(cli, tmp_path: Path):
    """cache-dir is plain, but its runs/ is a link to a directory whose name vng's shell would run: the path
    that reaches the vng line is checked, after every resolve."""
    evil = tmp_path / "x" / "evil$(touch${IFS}PWNED)"
    evil.mkdir(parents=True)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "runs").symlink_to(evil)
    (tmp_path / "vmlinuz").write_bytes(b"a kernel image")
    done = cli("boot", "--kernel", str(tmp_path / "vmlinuz"), "--cache-dir", str(cache_dir), "--dry-run", "--", "true")
    assert done.returncode == 2 and done.stderr.splitlines()[-1].startswith("vngtasks: cache-dir: "), done.stderr
    assert "$(touch" not in done.stdout and not list(tmp_path.rglob("PWNED"))
