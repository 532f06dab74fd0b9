"""Remote builds over a real sshd on 127.0.0.1: host keys, faults, and (slow) a real kernel."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TinyBuild
from invoke import Context
from linux_remote import CCACHE_DIR, KCONFIG

from vngtasks import arches, buildhost, buildhost_ssh, buildsteps, kernelmake, untar
from vngtasks.errors import Failure
from vngtasks.settings import DEFAULTS, effective

SSHD = Path("/usr/sbin/sshd")
SHA = "0123456789abcdef0123456789abcdef01234567"
REMOTE_PATH = f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SSHD.exists() or os.geteuid() != 0, reason="needs root and openssh-server"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


def fingerprint(public_key: str) -> str:
    listed = subprocess.run(["ssh-keygen", "-lf", "-"], input=public_key, capture_output=True, text=True, check=True)
    return listed.stdout.split()[1]


@dataclass
class Sshd:
    port: int
    host_key: str  # "ssh-ed25519 AAAA..."
    remote_home: Path  # $HOME of the sessions: the build host's ~
    process: subprocess.Popen
    log: Path

    @property
    def target(self) -> str:
        return f"root@127.0.0.1:{self.port}"

    def trust(self, home: Path) -> None:
        """Record the host key in the test user's known_hosts."""
        (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
        with (home / ".ssh" / "known_hosts").open("a") as out:
            out.write(f"[127.0.0.1]:{self.port} {self.host_key}\n")

    def sessions(self) -> list[int]:
        """The sshd processes serving connections (children of the listener)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()] if children.exists() else []


@pytest.fixture
def start_sshd(tmp_path: Path, home: Path) -> Iterator[Callable[..., Sshd]]:
    """Start a real sshd on a free port: own host key, and the test user's key authorized for root."""
    started: list[Sshd] = []
    mounts: list[Path] = []
    (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
    client_key = keygen(home / ".ssh" / "id_ed25519")

    def start(path: str = REMOTE_PATH, home_size: str = "") -> Sshd:
        where = tmp_path / f"sshd-{len(started)}"
        where.mkdir()
        host_key = keygen(where / "host_key")
        (where / "authorized_keys").write_text(client_key + "\n")
        remote_home = tmp_path / f"remote-home-{len(started)}"
        remote_home.mkdir()
        if home_size:  # a small disk of its own for the build host's home
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={home_size}", "tmpfs", str(remote_home)])
            if mounted.returncode != 0:
                pytest.skip("cannot mount a tmpfs here")
            mounts.append(remote_home)
        port = free_port()
        (where / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {where / 'host_key'}\nPidFile {where / 'sshd.pid'}\n"
            f"PermitRootLogin prohibit-password\nAuthorizedKeysFile {where / 'authorized_keys'}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"SetEnv HOME={remote_home} PATH={path} CCACHE_DIR={CCACHE_DIR}\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        log = where / "sshd.log"
        with log.open("w") as out:
            process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(where / "sshd_config")], stderr=out)
        server = Sshd(port, host_key, remote_home, process, log)
        started.append(server)
        deadline = time.monotonic() + 10
        while "Server listening" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        return server

    yield start
    for server in started:
        for pid in [*server.sessions(), server.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        server.process.wait(timeout=10)
    for mount in mounts:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def build_args(sshd_target: str, tmp_path: Path, url: str = "https://127.0.0.1:9/linux.git", tag: str = SHA):
    return ["build", "--tag", tag, "--kernel-url", url, "--build-host", sshd_target, "--cache-dir", str(tmp_path / "c")]


def no_entries(tmp_path: Path) -> bool:
    kernels = tmp_path / "c" / "kernels"
    return not kernels.exists() or not [p for p in kernels.iterdir() if not p.name.startswith(".")]


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("vngtasks: build-host: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_host_parsing():
    address = buildhost_ssh.SshAddress
    assert address.parse("build.example.org") == address(None, "build.example.org", 22)
    assert buildhost_ssh.SshAddress.parse("ci@10.0.0.2:2222") == buildhost_ssh.SshAddress("ci", "10.0.0.2", 2222)
    assert buildhost_ssh.SshAddress.parse("ci@h:2222").known_hosts_name == "[h]:2222"
    assert buildhost_ssh.SshAddress.parse("h").known_hosts_name == "h"
    with pytest.raises(ValueError, match="build-host"):
        buildhost_ssh.SshAddress.parse("h:70000")


def test_a_port_out_of_range_is_bad_input(cli, tmp_path: Path):
    done = cli(*build_args("builder:70000", tmp_path))
    assert done.returncode == 2
    expected = "vngtasks: build-host: 'builder:70000' is not valid: expected [user@]host[:port]"
    assert done.stderr.splitlines()[-1] == expected


def test_local_repositories_are_pushed_and_urls_fetched_there(tmp_path: Path):
    assert buildhost.local_repo(f"file://{tmp_path}") == tmp_path
    assert buildhost.local_repo(str(tmp_path)) == tmp_path
    assert buildhost.local_repo("https://git.kernel.org/linux.git") is None
    assert buildhost.local_repo("git@github.com:torvalds/linux.git") is None


def test_git_ssh_is_as_strict_as_paramiko(home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(home / "a b"))
    command = buildhost_ssh.git_ssh_command(buildhost_ssh.SshAddress("u", "h", 2222))
    assert "StrictHostKeyChecking=yes" in command and "-F none" in command and "BatchMode=yes" in command
    assert f"'UserKnownHostsFile={home}/a b/.ssh/known_hosts'" in command


def test_unknown_host_key_is_refused_with_how_to_trust_it(cli, start_sshd, home: Path, tmp_path: Path):
    sshd = start_sshd()
    done = cli(*build_args(sshd.target, tmp_path))
    assert done.returncode == 1, done.stderr
    line = error_line(done.stderr)
    assert line.startswith(f"vngtasks: build-host: 127.0.0.1:{sshd.port}: host-key: unknown host key ssh-ed25519 ")
    assert fingerprint(sshd.host_key) in line and "ssh-keyscan -p" in line and "build-host-accept-new true" in line
    assert not (home / ".ssh" / "known_hosts").exists()
    assert no_entries(tmp_path) and not list(sshd.remote_home.iterdir())


def test_accept_new_records_the_key_then_it_is_known(cli, start_sshd, home: Path, tmp_path: Path):
    sshd = start_sshd()
    done = cli(*build_args(sshd.target, tmp_path), "--build-host-accept-new", "true")
    # Connected and went on: the kernel-url (nothing listens there) fails at the fetch stage on the host.
    assert f"build-host: 127.0.0.1:{sshd.port}: fetch: " in error_line(done.stderr), done.stderr
    assert f"new key ssh-ed25519 {fingerprint(sshd.host_key)} accepted and recorded" in done.stderr
    known = (home / ".ssh" / "known_hosts").read_text()
    assert known == f"[127.0.0.1]:{sshd.port} {sshd.host_key}\n"
    again = cli(*build_args(sshd.target, tmp_path))  # no opt-in needed now
    assert ": fetch: " in error_line(again.stderr) and "new key" not in again.stderr
    assert (home / ".ssh" / "known_hosts").read_text() == known
    assert no_entries(tmp_path)


def test_known_hosts_markers_are_read_as_openssh_does(cli, start_sshd, home: Path, tmp_path: Path):
    """`@cert-authority` lines are skipped with a notice, a line paramiko cannot read with a warning; the
    plain line of the host's key still lets the build go on (to the fetch, which fails: nothing listens)."""
    sshd = start_sshd()
    (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
    (home / ".ssh" / "known_hosts").write_text(
        f"@cert-authority *.example.org {keygen(tmp_path / 'ca')}\n"
        "[127.0.0.1]:1 ssh-ed25519 not-base64!\n"
        f"[127.0.0.1]:{sshd.port} {sshd.host_key}\n"
    )
    done = cli(*build_args(sshd.target, tmp_path))
    assert done.returncode == 1 and f"127.0.0.1:{sshd.port}: fetch: " in error_line(done.stderr), done.stderr
    assert "@cert-authority lines are not used by vngtasks: skipped" in done.stderr
    assert "known_hosts:2: skipped, not a known_hosts line" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("accept_new", ["false", "true"])
def test_a_revoked_host_key_is_refused(cli, start_sshd, home: Path, tmp_path: Path, accept_new: str):
    sshd = start_sshd()
    sshd.trust(home)  # listed as known, and revoked too: revoked wins, as in OpenSSH
    with (home / ".ssh" / "known_hosts").open("a") as known:
        known.write(f"@revoked * {sshd.host_key}\n")
    done = cli(*build_args(sshd.target, tmp_path), "--build-host-accept-new", accept_new)
    assert done.returncode == 1
    line = error_line(done.stderr)
    assert f"127.0.0.1:{sshd.port}: host-key: host key ssh-ed25519 {fingerprint(sshd.host_key)} is REVOKED" in line
    assert no_entries(tmp_path) and not list(sshd.remote_home.iterdir())


def test_a_changed_host_key_is_refused_even_with_accept_new(cli, start_sshd, home: Path, tmp_path: Path):
    sshd = start_sshd()
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {keygen(tmp_path / 'old')}\n")
    before = (home / ".ssh" / "known_hosts").read_text()
    done = cli(*build_args(sshd.target, tmp_path), "--build-host-accept-new", "true")
    assert done.returncode == 1
    line = error_line(done.stderr)
    assert f"127.0.0.1:{sshd.port}: host-key: host key CHANGED" in line and "refused" in line
    assert fingerprint(sshd.host_key) in line and "ssh-keygen -R" in line
    assert (home / ".ssh" / "known_hosts").read_text() == before
    assert no_entries(tmp_path) and not list(sshd.remote_home.iterdir())


def test_connection_refused_is_one_line(cli, tmp_path: Path):
    port = free_port()
    done = cli(*build_args(f"127.0.0.1:{port}", tmp_path))
    assert done.returncode == 1
    assert error_line(done.stderr) == f"vngtasks: build-host: 127.0.0.1:{port}: connect: connection refused"
    assert "Traceback" not in done.stderr and no_entries(tmp_path)


def test_auth_failure_is_one_line(cli, start_sshd, home: Path, tmp_path: Path):
    sshd = start_sshd()
    sshd.trust(home)
    keygen_path = home / ".ssh" / "id_ed25519"
    keygen_path.unlink()
    keygen_path.with_suffix(".pub").unlink()
    keygen(keygen_path)  # a key the server does not know
    done = cli(*build_args(sshd.target, tmp_path))
    assert done.returncode == 1
    line = error_line(done.stderr)
    assert line.startswith(f"vngtasks: build-host: 127.0.0.1:{sshd.port}: auth: root: Authentication failed")
    assert no_entries(tmp_path)


def test_missing_toolchain_is_listed_with_how_to_install(cli, start_sshd, home: Path, tmp_path: Path):
    sshd = start_sshd(path="/usr/bin:/bin")  # no vng on the build host's PATH
    sshd.trust(home)
    done = cli(*build_args(sshd.target, tmp_path))
    assert done.returncode == 127
    line = error_line(done.stderr)
    assert f"127.0.0.1:{sshd.port}: deps: missing on the build host: vng (`pip install virtme-ng` there" in line
    assert no_entries(tmp_path)


def small_repo(path: Path, content: bytes) -> str:
    """A git repository with one file and tag v1; its commit."""
    path.mkdir()
    (path / "big").write_bytes(content)
    for command in (["init", "-q"], ["add", "big"], ["commit", "-q", "-m", "big"], ["tag", "v1"]):
        subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", *command], check=True)
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_a_local_tree_is_pushed_and_checked_out_there_with_the_fragments(
    cli, start_sshd, home: Path, tmp_path: Path, workspace: Path
):
    sshd = start_sshd()
    sshd.trust(home)
    sha = small_repo(tmp_path / "tree", b"not a kernel\n")
    (workspace / "extra.config").write_text("CONFIG_IKCONFIG=y\n")
    done = cli(
        *build_args(sshd.target, tmp_path, url=f"file://{tmp_path / 'tree'}", tag="v1"), "--kconfig", "extra.config"
    )
    # Everything up to make ran on the host; make itself fails there: not a kernel tree.
    assert done.returncode == 1 and f"127.0.0.1:{sshd.port}: build: " in error_line(done.stderr), done.stderr
    assert f"push: {tmp_path / 'tree'} to 127.0.0.1:{sshd.port}: " in done.stderr
    (work,) = (sshd.remote_home / ".cache" / "vngtasks" / "remote-work").glob("vng-kernel-default-*-v2")
    assert work.name == f"vng-kernel-default-x86_64-{sha[:12]}-v2"
    assert (work / "linux" / "big").read_text() == "not a kernel\n"
    assert (work / "tools" / "kconfig.config").read_text() == "CONFIG_IKCONFIG=y\n"
    assert "CONFIG_DEBUG_INFO_BTF=y" in (work / "tools" / "btf.config").read_text()
    assert not (work / "command.pid").exists() and no_entries(tmp_path)
    failed = "build: kconfig: virtme-configkernel --defconfig failed: make: *** No rule to make target"
    assert error_line(done.stderr).endswith(f"{failed} 'x86_64_defconfig'.  Stop.")


def test_a_full_disk_on_the_build_host_is_one_line(cli, start_sshd, home: Path, tmp_path: Path):
    sshd = start_sshd(home_size="2m")
    sshd.trust(home)
    tree = tmp_path / "tree"
    small_repo(tree, random.randbytes(4 * 1024 * 1024))  # incompressible: more than the disk
    done = cli(*build_args(sshd.target, tmp_path, url=str(tree), tag="v1"))
    assert done.returncode == 1, done.stderr
    assert error_line(done.stderr) == f"vngtasks: build-host: 127.0.0.1:{sshd.port}: push: no space left on device"
    assert "free under" in done.stderr  # the low-disk warning came first
    assert no_entries(tmp_path)


def _build_host_tree(start_sshd, home: Path, tmp_path: Path, monkeypatch, image: bytes):
    """A build host whose tree holds `image` as its bzImage; a connection to it, the tree, an empty entry."""
    monkeypatch.setenv("HOME", str(home))
    sshd = start_sshd()
    sshd.trust(home)
    tree = sshd.remote_home / "tree"
    (tree / "arch" / "x86" / "boot").mkdir(parents=True)
    (tree / "arch" / "x86" / "boot" / "bzImage").write_bytes(image)
    dest = tmp_path / "entry"
    dest.mkdir()
    return buildhost_ssh.connect(buildhost_ssh.SshAddress("root", "127.0.0.1", sshd.port), accept_new=False), tree, dest


def test_the_result_comes_back_as_one_binary_stream(start_sshd, home: Path, tmp_path: Path, monkeypatch):
    image = random.randbytes(3 * 1024 * 1024)  # binary: any decoding on the way would break it
    conn, tree, dest = _build_host_tree(start_sshd, home, tmp_path, monkeypatch, image)
    (tree / "System.map").write_text("ffffffff81000000 T _text\n")
    (tree / "not-kept").write_text("x")
    received = buildhost.download(conn, str(tree), ["System.map", "arch/x86/boot/bzImage"], dest)
    conn.close()
    assert (dest / "arch" / "x86" / "boot" / "bzImage").read_bytes() == image
    assert (dest / "System.map").read_text() == "ffffffff81000000 T _text\n"
    assert not (dest / "not-kept").exists()
    assert len(image) < received < len(image) + 64 * 1024


def test_a_link_the_build_host_sends_back_is_refused(start_sshd, home: Path, tmp_path: Path, monkeypatch):
    """A hostile build host: `System.map` is a symlink to the build host's /etc/passwd in the stream."""
    conn, tree, dest = _build_host_tree(start_sshd, home, tmp_path, monkeypatch, b"kernel")
    (tree / "System.map").symlink_to("/etc/passwd")
    with pytest.raises(untar.UnsafeMember, match=r"^'System.map': a symlink to '/etc/passwd'"):
        buildhost.download(conn, str(tree), ["System.map", "arch/x86/boot/bzImage"], dest)
    conn.close()
    assert list(dest.iterdir()) == []


def test_builds_of_one_key_on_one_host_take_turns(start_sshd, home: Path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(home))
    sshd = start_sshd()
    sshd.trust(home)
    host = buildhost_ssh.SshAddress("root", "127.0.0.1", sshd.port)
    lock = str(sshd.remote_home / "vng-kernel-k.lock")
    first, second = buildhost_ssh.connect(host, accept_new=False), buildhost_ssh.connect(host, accept_new=False)
    buildhost.hold_lock(first, lock, "k")
    waiter = threading.Thread(target=buildhost.hold_lock, args=(second, lock, "k"))
    waiter.start()
    waiter.join(timeout=4)
    assert waiter.is_alive(), "the second build did not wait"
    assert "lock: another build of k is running on the build host: waiting for it" in capsys.readouterr().err
    first.close()  # the first build is over (or its connection dropped): the lock goes with it
    waiter.join(timeout=15)
    assert not waiter.is_alive()
    second.close()


def test_remote_commands_die_with_the_connection(start_sshd, home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(home))
    sshd = start_sshd()
    sshd.trust(home)
    host = buildhost_ssh.SshAddress("root", "127.0.0.1", sshd.port)
    conn = buildhost_ssh.connect(host, accept_new=False)
    conn.pidfile = str(sshd.remote_home / "command.pid")
    seconds = f"{random.randint(1000, 9999)}.{random.randint(100, 999)}"  # names our sleep in ps
    failures: list[Failure] = []

    def run() -> None:
        try:
            with buildhost_ssh.stage(conn, host, "build"):
                conn.run(f"echo started; sleep {seconds}", in_stream=False, hide=True)
        except Failure as failure:
            failures.append(failure)

    thread = threading.Thread(target=run)
    thread.start()
    assert _wait(lambda: _pids(f"sleep {seconds}")), "the remote command never started"
    assert (sshd.remote_home / "command.pid").read_text().strip().isdigit()
    for pid in sshd.sessions():
        os.kill(pid, signal.SIGKILL)  # the connection drops; the build host stays up
    thread.join(timeout=30)
    assert [str(f) for f in failures] == [f"build-host: 127.0.0.1:{sshd.port}: build: connection lost"]
    assert _wait(lambda: not _pids(f"sleep {seconds}")), "the remote command outlived its connection"
    conn.close()


def test_a_failing_command_is_stopped_as_a_whole_while_connected(start_sshd, home: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(home))
    sshd = start_sshd()
    sshd.trust(home)
    conn = buildhost_ssh.connect(buildhost_ssh.SshAddress("root", "127.0.0.1", sshd.port), accept_new=False)
    conn.pidfile = str(sshd.remote_home / "command.pid")
    seconds = f"{random.randint(1000, 9999)}.{random.randint(100, 999)}"
    thread = threading.Thread(
        target=lambda: conn.run(f"sleep {seconds} & sleep {seconds}", in_stream=False, hide=True, warn=True)
    )
    thread.start()
    assert _wait(lambda: len(_pids(f"sleep {seconds}")) == 2)
    conn.stop_build()  # what a local failure (Ctrl-C, a bad download) does on its way out
    assert _wait(lambda: not _pids(f"sleep {seconds}")), "stop_build left the command running"
    thread.join(timeout=30)
    assert conn.run("echo still usable", hide=True, in_stream=False).stdout.strip() == "still usable"
    conn.close()


def test_the_build_host_hits_objects_compiled_here(start_sshd, home: Path, tmp_path: Path, monkeypatch):
    """ccache hashes LANG, LC_ALL, LC_CTYPE and LC_MESSAGES into every object's key: the build environment pins
    them, so an object compiled here (LANG=C.UTF-8) hits on a build host whose SSH sessions set no locale."""
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("CCACHE_DIR", str(CCACHE_DIR))  # the build host's sessions get the same one (start_sshd)
    sshd = start_sshd()
    sshd.trust(home)
    source = f"int vngtasks_probe_{random.getrandbits(64)}(void) {{ return 1; }}\n"  # new to the ccache
    settings = effective(DEFAULTS, {"tag": SHA}, workspace=tmp_path)
    here = buildsteps.Plan(
        settings, SHA, str(tmp_path / "here" / "linux"), arches.host(), 1, str(tmp_path / "here" / "tools")
    )
    compile_one(Context(), here, buildsteps.build_env(here, str(home)), source)
    host = buildhost_ssh.SshAddress("root", "127.0.0.1", sshd.port)
    conn = buildhost_ssh.connect(host, accept_new=False)
    far = buildhost.survey(conn, host)
    there = buildsteps.plan_on(settings, SHA, far, f"{sshd.remote_home}/work")
    env = buildsteps.make_env(there, far)
    before = kernelmake.ccache_stats(conn, env)
    compile_one(conn, there, env, source)
    after = kernelmake.ccache_stats(conn, env)
    conn.close()
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 0)


def compile_one(c: Context, plan: buildsteps.Plan, env: dict[str, str], source: str) -> None:
    """Compile one C file in the plan's tree through its compiler wrapper, as make would."""
    c.run(shlex.join(["mkdir", "-p", plan.tree]), hide=True, in_stream=False)
    buildsteps.write_tools(c, plan)
    c.run(f"cat > {shlex.quote(plan.tree)}/probe.c", in_stream=io.StringIO(source), hide=True)
    with c.cd(plan.tree):
        c.run(
            shlex.join([f"{plan.tools_dir}/cc", "-c", "probe.c", "-o", "probe.o"]), env=env, hide=True, in_stream=False
        )


def _pids(command_line: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"^{command_line}$"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def _wait(condition: Callable[[], object], seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


# --- slow: a real kernel, built on the "remote" (this machine through sshd) and booted here ---


@pytest.mark.slow
def test_killing_the_session_mid_build_leaves_nothing(cli, start_sshd, home: Path, tmp_path: Path, kernel_tree):
    repo, _ = kernel_tree
    sshd = start_sshd()
    sshd.trust(home)
    args = build_args(sshd.target, tmp_path, url=str(repo), tag="v6.12")
    build = subprocess.Popen(
        [sys.executable, "-m", "invoke", "-r", str(Path(__file__).parent.parent), *args],
        env={**_cli_env(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    work = sshd.remote_home / ".cache" / "vngtasks" / "remote-work"
    started = _wait(lambda: build.poll() is not None or list(work.glob("*/linux/scripts/basic/fixdep")), 900)
    assert started and build.poll() is None, build.communicate()[1][-3000:]
    for pid in sshd.sessions():
        os.kill(pid, signal.SIGKILL)
    _, err = build.communicate(timeout=120)
    assert build.returncode == 1, err[-3000:]
    assert error_line(err) == f"vngtasks: build-host: 127.0.0.1:{sshd.port}: build: connection lost"
    assert no_entries(tmp_path)
    assert _wait(lambda: not _processes_under(sshd.remote_home)), "remote build processes outlived the connection"


@pytest.mark.slow
def test_build_on_the_host_then_boot_here(
    cli, start_sshd, home: Path, tmp_path: Path, workspace: Path, kernel_tree, tiny_build: TinyBuild
):
    """The session's tiny kernel filled the tests' ccache here: the build host, sharing it, hits it."""
    repo, sha = kernel_tree
    sshd = start_sshd()
    sshd.trust(home)
    (workspace / "ci").mkdir()
    # The fragment every kernel-building test uses: one config, one ccache (and the upload path is tested).
    (workspace / "ci" / "kernel.config").write_text(KCONFIG.read_text())
    args = ["boot", "--tag", "v6.12", "--kernel-url", str(repo), "--name", "far", "--build-host", sshd.target]
    args += [
        "--kconfig-base",
        "tiny",
        "--kconfig",
        "ci/kernel.config",
        "--cache-dir",
        str(tmp_path / "c"),
        "--verbose",
        "false",
        "--",
    ]
    done = cli(*args, "uname -r; test -e /proc/config.gz && echo config.gz-present", timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"__far__{sha[:12]}" in done.stdout and "config.gz-present" in done.stdout
    (entry,) = (tmp_path / "c" / "kernels").glob("vng-kernel-far-*")
    metadata = json.loads((entry / "metadata.json").read_text())
    assert metadata["built_on"] == f"127.0.0.1:{sshd.port}" and metadata["sha"] == sha
    assert metadata["pushed_bytes"] > 100_000_000  # the first push ships the whole tree
    hits, misses = metadata["ccache"]["hits"], metadata["ccache"]["misses"]
    assert hits > 20 * misses, metadata["ccache"]  # the objects the local tiny build compiled
    assert "struct task_struct {" in (entry / "vmlinux.h").read_text()
    # The work tree is gone; the key's empty lock file stays (removing a flock file races the next locker).
    left = list((sshd.remote_home / ".cache" / "vngtasks" / "remote-work").iterdir())
    assert [p.name for p in left] == [f"{entry.name}.lock"] and left[0].stat().st_size == 0
    assert not _processes_under(sshd.remote_home)


def _cli_env(home: Path) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("INVOKE_", "GITHUB_", "XDG_"))}
    return {**environ, "HOME": str(home)}


def _processes_under(path: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if Path(os.readlink(proc / "cwd")).is_relative_to(path):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_a_full_disk_here_is_named_in_the_one_line(cli, tmp_path: Path):
    """The cache dir on a full disk: git's "No space left on device" is the reason, not "cannot fetch"."""
    tree = tmp_path / "tree"
    small_repo(tree, random.randbytes(4 * 1024 * 1024))
    cache_dir = tmp_path / "c"
    cache_dir.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(cache_dir)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        done = cli(
            "build", "--tag", "v1", "--kernel-url", str(tree), "--kconfig-base", "tiny", "--cache-dir", str(cache_dir)
        )
    finally:
        subprocess.run(["umount", "--lazy", str(cache_dir)], check=False)
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("vngtasks: tag: cannot fetch commit ") and line.endswith(
        f": no space left on device under {cache_dir}/work/default-{arches.host().name}/linux"
    ), done.stderr
