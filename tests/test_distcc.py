"""distcc-hosts: the host list, make's environment and -j, the strict ssh distcc runs, the one warning for failures;
and (slow) a real build whose misses two helpers compile over SSH, each its own sshd in a network namespace."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY_TREE
from linux_remote import KCONFIG
from test_remote import REMOTE_PATH, Sshd, in_netns
from test_remote import start_sshd as start_sshd  # a fixture this module's tests use

from vngtasks import arches, buildsteps, deps, distcc, settings
from vngtasks.buildsteps import Machine
from vngtasks.errors import Failure
from vngtasks.settings import DEFAULTS
from vngtasks.validate import Given, InputError

GIVEN = Given(Path("/w"), arches.host())


def parsed(value: str) -> tuple[distcc.Helper, ...]:
    return distcc.parse("distcc_hosts", value, GIVEN)


@pytest.mark.unit
def test_ssh_is_the_default_and_every_entry_gets_its_slots_written_out():
    helpers = parsed("@build1 ci@build2.example.org/8,lzo localhost/3 10.0.0.7/2")
    assert [(h.kind, h.host, h.slots, h.spec) for h in helpers] == [
        ("ssh", "build1", 4, "@build1/4"),
        ("ssh", "build2.example.org", 8, "ci@build2.example.org/8,lzo"),
        ("local", "localhost", 3, "localhost/3"),
        ("tcp", "10.0.0.7", 2, "10.0.0.7/2"),
    ]
    assert parsed("") == ()
    assert distcc.jobs(helpers, 2) == 17 and distcc.jobs(parsed("@a/1"), 2) == 2 and distcc.jobs((), 6) == 6


@pytest.mark.unit
@pytest.mark.parametrize(
    "value",
    [
        "@build1:/usr/bin/distccd",  # a command the helper's shell would run
        "@build1/4,cpp",  # pump mode: the helper would read this machine's headers list
        "@-oProxyCommand=sh",
        "-l@build1",
        "@build1/0",
        "@build1/65",
        "@build1/4,lzo,lzo",
        "build1:0",
        "build1:65536",
        "--randomize @build1",
        "@build1 @build1",
        "localhost/2",
        "@under_score",
        "@build1;reboot",
        "user$(id)@build1",
        " ".join(f"@h{n}" for n in range(33)),
    ],
)
def test_what_distcc_or_a_shell_would_read_more_into_is_refused(value):
    with pytest.raises(InputError) as refused:
        parsed(value)
    assert refused.value.input == "distcc-hosts"


@pytest.mark.unit
def test_tcp_needs_distcc_tcp_and_distcc_needs_ccache(tmp_path):
    flags = {"cache_dir": str(tmp_path), "distcc_hosts": "@a build2:3632"}
    with pytest.raises(InputError, match="build2:3632/4 is reached over plain TCP"):
        settings.effective({}, flags, workspace=tmp_path)
    assert settings.effective({}, {**flags, "distcc_tcp": "true"}, workspace=tmp_path).distcc_hosts[1].kind == "tcp"
    with pytest.raises(InputError, match="needs kernel-compile-cache true"):
        settings.effective({}, {**flags, "distcc_hosts": "@a", "kernel_compile_cache": "false"}, workspace=tmp_path)


def plan_with(tmp_path: Path, hosts: str, cores: int = 2) -> buildsteps.Plan:
    s = settings.effective({}, {"cache_dir": str(tmp_path), "distcc_hosts": hosts}, workspace=tmp_path)
    machine = Machine("/home/u", arches.host(), cores, "vng", "/usr/bin", "")
    return buildsteps.plan_on(s, "a" * 40, machine, "/w/work")


@pytest.mark.unit
def test_make_compiles_through_ccache_then_distcc_with_the_hosts_slots(tmp_path):
    plan = plan_with(tmp_path, "@h1/3 @h2/3")
    env = buildsteps.build_env(plan, "/home/u", {})
    assert plan.jobs == 6
    assert env["CCACHE_PREFIX"] == "distcc" and env["DISTCC_HOSTS"] == "@h1/3 @h2/3"
    assert env["DISTCC_SSH"] == "/w/work/tools/distcc-ssh" and env["DISTCC_LOG"] == "/w/work/tools/distcc.log"
    assert env["DISTCC_DIR"] == "/w/work/tools/distcc" and env["DISTCC_FALLBACK"] == "1"
    without = buildsteps.build_env(plan_with(tmp_path, ""), "/home/u", {})
    assert not [key for key in without if key.startswith("DISTCC") or key == "CCACHE_PREFIX"]


@pytest.mark.unit
def test_the_ssh_distcc_runs_is_strict_and_passes_distccs_arguments_untouched(tmp_path):
    """The wrapper run by /bin/sh with a stand-in `ssh` that prints its arguments and complains: our config (its
    path from the environment), the strict options, then what distcc gave, each word as it was (a `$(...)` is
    never run); the complaint goes to distcc's log."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ssh").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\necho no route >&2\n')
    (tmp_path / "bin" / "ssh").chmod(0o755)
    wrapper = tmp_path / distcc.SSH_WRAPPER
    wrapper.write_text(distcc.ssh_wrapper())
    wrapper.chmod(0o755)
    given = ["-l", "ci", "build1", "distccd", "--inetd", "$(touch owned)"]
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", **distcc.environment(parsed("@build1"), str(tmp_path))}
    done = subprocess.run([str(wrapper), *given], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    options = [word for option in distcc.SSH_OPTIONS for word in ("-o", option)]
    assert done.stdout.splitlines() == ["-F", str(tmp_path / distcc.SSH_CONFIG), *options, *given]
    assert "StrictHostKeyChecking=yes" in options and "BatchMode=yes" in options and "ProxyCommand=none" in options
    assert not (tmp_path / "owned").exists() and done.stderr == ""
    assert (tmp_path / distcc.LOG_FILE).read_text() == "no route\n"


@pytest.mark.unit
def test_the_ssh_config_is_home_s_with_plain_paths_only():
    config = distcc.ssh_config("/home/ci", ["/home/ci/.ssh/id_ed25519"])
    assert config.splitlines() == ["Include /home/ci/.ssh/config", "Host *",
                                   "  UserKnownHostsFile /home/ci/.ssh/known_hosts",
                                   "  IdentityFile /home/ci/.ssh/id_ed25519"]  # fmt: skip
    for home in ("/home/c i", "/home/%d", "/home/~ci", "relative"):
        with pytest.raises(Failure, match="ssh would read more into this path"):
            distcc.ssh_config(home, [])


DISTCC_LOG = (
    "distcc[10] compile from lib/crc7.c to lib/crc7.o\n"
    "distcc[10] compile lib/crc7.c on @h1/1 completed ok\n"
    "distcc[11] compile lib/crc8.c on @h2/1 completed ok\n"
    "distcc[12] compile lib/crc4.c on @h2/1 completed ok\n"
    "ssh: connect to host 10.0.0.3 port 22: Connection refused\x1b]0;owned\x07\n"
    "distcc[13] ERROR: compile (null) on localhost failed\n"
    "distcc[13] (dcc_r_result_header) ERROR: server provided no answer.\n"
    "distcc[13] ERROR: compile lib/crc16.c on @h3/1 failed\n"
    "distcc[13] Warning: failed to distribute lib/crc16.c to @h3/1, running locally instead\n"
    "distcc[13] compile lib/crc16.c on localhost completed ok\n"
    "distcc[14] compile lib/x.c on @forged/9 completed ok\n"
)


@pytest.mark.unit
def test_distccs_log_gives_each_helpers_count_and_one_printable_warning(tmp_path, capsys):
    """The commands that read the log, run on a real one; its text is hostile: only the list's hosts are counted,
    the error is made printable."""
    (tmp_path / "distcc.log").write_text(DISTCC_LOG)
    commands = distcc.outcome_commands(str(tmp_path / "distcc.log"))
    answers = {name: subprocess.run(argv, capture_output=True, text=True).stdout for name, argv in commands.items()}
    found = distcc.outcome(answers, parsed("@h1/1 @h2/1 @h3/1"))
    assert found.compiled == {"@h1/1": 1, "@h2/1": 2, "@h3/1": 0, "localhost": 1} and found.failed == 1
    assert found.first_error == "ssh: connect to host 10.0.0.3 port 22: Connection refused?]0;owned?"
    # Without ssh's line: distcc's first about a helper, not the kernel's compiler probes failing on localhost.
    (tmp_path / "distcc.log").write_text("".join(line for line in DISTCC_LOG.splitlines(True) if "ssh:" not in line))
    answers = {name: subprocess.run(argv, capture_output=True, text=True).stdout for name, argv in commands.items()}
    first = distcc.outcome(answers, parsed("@h3/1")).first_error
    assert first == "(dcc_r_result_header) ERROR: server provided no answer."
    distcc.warn_failures(found, 40)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("vngtasks: warning: distcc-hosts: 1 of 40 compilations failed on a helper")
    distcc.warn_failures(distcc.Outcome({}, 0, ""), 40)
    assert capsys.readouterr().err == ""


@pytest.mark.unit
def test_deps_installs_distcc_and_ssh_where_the_build_runs(tmp_path):
    distro = deps.Distro.of('ID=debian\nVERSION_ID="12"\n')
    ssh = settings.effective({}, {"cache_dir": str(tmp_path), "distcc_hosts": "@h1"}, workspace=tmp_path)
    wanted = deps.wanted(ssh, distro, arches.host(), False)
    assert "distcc" in wanted and "openssh-client" in wanted
    assert "distcc" not in deps.wanted(settings.effective({}, {"cache_dir": str(tmp_path)}, workspace=tmp_path),
                                       distro, arches.host(), False)  # fmt: skip


# What the slow test's build compiles: seven objects of lib/ that the tiny kernel has not (each its own file), in
# the session's tiny tree, so make compiles only them, with an empty ccache, so each one is a miss sent to distcc.
NEW_OBJECTS = ("CRC_CCITT", "CRC16", "CRC_ITU_T", "CRC64", "CRC4", "CRC7", "CRC8")


def helper_namespace(tag: str, number: int) -> tuple[str, str]:
    """A test host: a network namespace with a veth to this one (10.203.NUMBER.0/30); (its name, its address)."""
    netns, here = f"vngt-d{tag}", f"10.203.{number}"
    steps = [
        ["ip", "netns", "add", netns],
        ["ip", "link", "add", f"vd{tag}", "type", "veth", "peer", "name", f"vdp{tag}"],
        ["ip", "link", "set", f"vdp{tag}", "netns", netns],
        ["ip", "addr", "add", f"{here}.1/30", "dev", f"vd{tag}"], ["ip", "link", "set", f"vd{tag}", "up"],
        [*in_netns(netns), "ip", "addr", "add", f"{here}.2/30", "dev", f"vdp{tag}"],
        [*in_netns(netns), "ip", "link", "set", f"vdp{tag}", "up"], [*in_netns(netns), "ip", "link", "set", "lo", "up"],
    ]  # fmt: skip
    for step in steps:
        subprocess.run(step, check=True, capture_output=True)
    return netns, f"{here}.2"


@pytest.fixture
def helpers(start_sshd, home: Path, tmp_path: Path) -> Iterator[list[Sshd]]:
    """Three test hosts named helper1, helper2 and dying in ~/.ssh/config (root, the test user's key), each an sshd
    in a network namespace of its own, their keys in known_hosts. dying's `distccd`, at its first compilation,
    stops dying's sshd and fails: a helper that dies mid-build."""
    dying_bin = tmp_path / "dying-bin"
    dying_bin.mkdir()
    pid_file = shlex.quote(str(tmp_path / "sshd-2" / "sshd.pid"))  # start_sshd's third
    (dying_bin / "distccd").write_text(f'#!/bin/sh\nkill "$(cat {pid_file})"\nexit 1\n')
    (dying_bin / "distccd").chmod(0o755)
    first = os.getpid() % 80 * 3
    tags = [f"{os.getpid() % 1000}x{n}" for n in range(3)]
    made: list[str] = []
    try:
        servers = []
        for number, (name, tag) in enumerate(zip(("helper1", "helper2", "dying"), tags, strict=True)):
            netns, address = helper_namespace(tag, first + number + 1)
            made.append(tag)
            sshd = start_sshd(
                netns=netns, address=address, **({"path": f"{dying_bin}:{REMOTE_PATH}"} if number == 2 else {})
            )
            sshd.trust(home)
            with (home / ".ssh" / "config").open("a") as config:
                config.write(f"Host {name}\n  HostName {address}\n  Port {sshd.port}\n  User root\n")
            servers.append(sshd)
        yield servers
    finally:
        for tag in made:
            subprocess.run(["ip", "link", "del", f"vd{tag}"], capture_output=True)
            subprocess.run(["ip", "netns", "del", f"vngt-d{tag}"], capture_output=True)


def accepted(sshd: Sshd) -> int:
    """Connections the helper's sshd let in: one per compilation distcc sent it."""
    return sshd.log.read_text().count("Accepted publickey")


@pytest.mark.slow
@TINY_TREE
def test_helpers_over_ssh_compile_a_builds_misses_and_a_helper_that_dies_mid_build_falls_back(
    cli, helpers: list[Sshd], workspace: Path, tiny_build, tmp_path: Path
):
    """In the session's tiny tree, a fragment with NEW_OBJECTS and an empty ccache: every compilation is a miss that
    distcc sends over SSH. `dying` is first in the list and dies at its first compilation, which then runs here,
    and the build ends with one warning. Both other helpers compile some; the kernel boots.
    The fragment also turns IKCONFIG off: the tree's earlier builds had it, and this build's .config is made afresh
    from this fragment (a changed fragment applies to the next build in the same work tree)."""
    helper1, helper2, dying = helpers
    (workspace / "ci").mkdir()
    kept = [line for line in KCONFIG.read_text().splitlines(True) if not line.startswith("CONFIG_IKCONFIG")]
    new = "".join(f"CONFIG_{name}=y\n" for name in NEW_OBJECTS)
    (workspace / "ci" / "kernel.config").write_text("".join(kept) + "# CONFIG_IKCONFIG is not set\n" + new)

    args = ["build", *tiny_build.args, "--version", "farm", "--distcc-hosts", "@dying/1 @helper1/1 @helper2/1"]
    done = cli(*args, env={"CCACHE_DIR": str(tmp_path / "empty-ccache")}, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    entry = Path(done.stdout.strip().splitlines()[-1])
    metadata = json.loads((entry / "metadata.json").read_text())
    assert metadata["ccache"]["misses"] >= len(NEW_OBJECTS), metadata["ccache"]
    # dying took one compilation and died with it; that one ran here, and dying was reached no more.
    assert accepted(dying) == 1 and accepted(helper1) >= 1 and accepted(helper2) >= 1
    warnings = [line for line in done.stderr.splitlines() if "distcc" in line]  # (the key's version is not)
    assert len(warnings) == 1 and "compilations failed on a helper" in warnings[0], done.stderr[-4000:]
    rest = done.stdout + "".join(line for line in done.stderr.splitlines(True) if line not in warnings[0])
    assert "distcc[" not in rest and "ssh: " not in rest  # distcc's and ssh's messages: in distcc's log
    compiled = metadata["distcc"]["compiled"]
    assert metadata["distcc"]["failed"] >= 1 and compiled["localhost"] >= 1, metadata["distcc"]
    assert compiled["@dying/1"] == 0 and compiled["@helper1/1"] >= 1 and compiled["@helper2/1"] >= 1, compiled
    config = (entry / ".config").read_text().splitlines()
    assert all(f"CONFIG_{name}=y" in config for name in NEW_OBJECTS)
    assert "# CONFIG_IKCONFIG is not set" in config and "CONFIG_IKCONFIG_PROC=y" not in config
    booted = cli("boot", "--kernel", str(entry), "--cache-dir", str(tmp_path / "c"), "--verbose", "false", "--",
                 "grep -q crc7 /proc/kallsyms && echo HAS_CRC7", timeout=600)  # fmt: skip
    assert booted.returncode == 0 and "HAS_CRC7" in booted.stdout, booted.stderr[-3000:]


@pytest.mark.unit
def test_a_build_writes_the_wrapper_its_config_with_the_keys_that_exist_and_starts_distcc_afresh(tmp_path):
    from invoke import Context

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ecdsa").write_text("a key\n")
    plan = plan_with(tmp_path, "@h1")
    plan = buildsteps.Plan(plan.settings, plan.sha, str(tmp_path / "w/linux"), plan.host_arch, plan.jobs,
                           str(tmp_path / "w/tools"))  # fmt: skip
    tools = Path(plan.tools_dir)
    (tools / distcc.STATE_DIR / "backoff").mkdir(parents=True)  # an earlier build's: helpers it gave up on
    (tools / distcc.LOG_FILE).write_text("distcc[1] compile a.c on @h1/4 completed ok\n")
    buildsteps.write_distcc_files(Context(), plan, str(home))
    assert (tools / distcc.SSH_CONFIG).read_text() == distcc.ssh_config(str(home), [f"{home}/.ssh/id_ecdsa"])
    assert (tools / distcc.SSH_WRAPPER).read_text() == distcc.ssh_wrapper()
    assert os.access(tools / distcc.SSH_WRAPPER, os.X_OK)
    assert list((tools / distcc.STATE_DIR).iterdir()) == [] and not (tools / distcc.LOG_FILE).exists()


@pytest.mark.integration
def test_on_a_build_host_distcc_runs_there_with_its_own_ssh(start_sshd, home: Path, tmp_path: Path, monkeypatch):
    """The build host (sshd on loopback) compiles a probe through its own ccache and distcc; distcc reaches the helper
    (another sshd) with the build host's $HOME/.ssh: its config, its key, its known_hosts."""
    from test_remote import SHA, compile_one, keygen, loopback_route

    from vngtasks import buildhost, buildhost_ssh, kernelmake

    monkeypatch.setenv("HOME", str(home))
    build = start_sshd()
    build.trust(home)
    there_ssh = build.remote_home / ".ssh"
    there_ssh.mkdir(mode=0o700)
    helper = start_sshd(keys=(keygen(there_ssh / "id_ed25519"),))  # takes the build host's key only
    helper.trust(build.remote_home)
    (there_ssh / "config").write_text(f"Host helper\n  HostName 127.0.0.1\n  Port {helper.port}\n  User root\n")
    s = settings.effective(DEFAULTS, {"tag": SHA, "distcc_hosts": "@helper/1"}, workspace=tmp_path)
    conn = buildhost_ssh.connect(loopback_route(build.port), accept_new=False)
    try:
        far = buildhost.survey(conn, loopback_route(build.port).target)
        plan = buildsteps.plan_on(s, SHA, far, f"{build.remote_home}/work")
        env = {**buildsteps.make_env(plan, far), "CCACHE_DIR": f"{build.remote_home}/ccache"}
        buildsteps.write_tools(conn, plan)
        buildsteps.write_distcc_files(conn, plan, far.home)
        compile_one(conn, plan, env, f"int vngtasks_probe_{os.getpid()}_{time.time_ns()}(void) {{ return 2; }}\n")
        found = kernelmake.distcc_outcome(conn, env, s.distcc_hosts)
    finally:
        conn.close()
    assert (Path(plan.tree) / "probe.o").is_file() and accepted(helper) == 1
    assert found.compiled == {"@helper/1": 1, "localhost": 0} and found.failed == 0, found


@pytest.mark.unit
def test_tcp_helpers_are_warned_of_at_every_build_and_a_build_host_must_have_distcc(tmp_path, capsys):
    """README: TCP only with a warning at every build (build_entry calls warn_tcp); a build host's check names
    distcc and openssh-client when they are missing there (its build packages)."""
    from vngtasks import buildhost

    distcc.warn_tcp(parsed("@h1 10.0.0.7/2"))
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("vngtasks: warning: distcc-hosts: 10.0.0.7/2 over plain TCP")
    distcc.warn_tcp(parsed("@h1 localhost"))
    assert capsys.readouterr().err == ""
    s = settings.effective({}, {"cache_dir": str(tmp_path), "distcc_hosts": "@h1"}, workspace=tmp_path)
    packages = buildhost.build_packages(s, deps.Distro.of('ID=debian\nVERSION_ID="12"\n'), arches.host())
    assert {"distcc", "openssh-client"} <= set(packages)
    assert str(s.distcc_hosts[0]) == "@h1/4"  # as `invoke settings` prints it
