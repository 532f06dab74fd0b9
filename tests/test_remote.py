"""Remote builds over a real sshd on 127.0.0.1: host keys, faults, and (slow) a real kernel."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import random
import shlex
import shutil
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
from conftest import CCACHE_ENV, FOREIGN_CACHE, HOST_PACKAGES, TinyBuild
from invoke import Context
from linux_remote import CCACHE_DIR, KCONFIG, TAG

from vngtasks import arches, buildhost, buildhost_ssh, buildsteps, errors, kernelmake, sshconfig, untar
from vngtasks.errors import Failure, Unreachable
from vngtasks.guestroot import ROOTS
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
    address: str = "127.0.0.1"

    @property
    def target(self) -> str:
        return f"root@{self.address}:{self.port}"

    def trust(self, home: Path, name: str = "") -> None:
        """Record the host key in the test user's known_hosts (under `name`: by default, as OpenSSH names it)."""
        (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
        with (home / ".ssh" / "known_hosts").open("a") as out:
            out.write(f"{name or f'[{self.address}]:{self.port}'} {self.host_key}\n")

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

    def start(path: str = REMOTE_PATH, home_size: str = "", netns: str = "", address: str = "127.0.0.1",
              keys: tuple[str, ...] = ()) -> Sshd:  # fmt: skip
        """An sshd on `address` (in network namespace `netns`), taking the test user's key or those in `keys`."""
        where = tmp_path / f"sshd-{len(started)}"
        where.mkdir()
        host_key = keygen(where / "host_key")
        (where / "authorized_keys").write_text("".join(key + "\n" for key in keys or (client_key,)))
        remote_home = tmp_path / f"remote-home-{len(started)}"
        remote_home.mkdir()
        if home_size:  # a small disk of its own for the build host's home
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={home_size}", "tmpfs", str(remote_home)])
            if mounted.returncode != 0:
                pytest.skip("cannot mount a tmpfs here")
            mounts.append(remote_home)
        port = free_port()
        (where / "sshd_config").write_text(
            f"ListenAddress {address}\nPort {port}\nHostKey {where / 'host_key'}\nPidFile {where / 'sshd.pid'}\n"
            f"PermitRootLogin prohibit-password\nAuthorizedKeysFile {where / 'authorized_keys'}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"SetEnv HOME={remote_home} PATH={path} CCACHE_DIR={CCACHE_DIR}\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        log = where / "sshd.log"
        with log.open("w") as out:
            inside = in_netns(netns) if netns else []
            process = subprocess.Popen([*inside, str(SSHD), "-D", "-e", "-f", str(where / "sshd_config")], stderr=out)
        server = Sshd(port, host_key, remote_home, process, log, address)
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


@dataclass(frozen=True)
class Bastion:
    """Two test hosts in network namespaces of their own: the jump host, reachable from here at `jump_address`,
    and the build host at `build_address`, reachable from the jump host's namespace only."""

    jump_netns: str
    build_netns: str
    jump_address: str
    build_address: str


# The bastion's addresses are fixed: its tests run one at a time, on one pytest worker.
ONE_BASTION_AT_A_TIME = pytest.mark.xdist_group("bastion")


@pytest.fixture
def bastion() -> Iterator[Bastion]:
    """here <-> jump (10.201.N.0/30) <-> build (10.202.N.0/30); here has no route to the build host. Names and
    subnets are new for every bastion (N counts them): a namespace just deleted may linger a while."""
    number = next(_BASTIONS) % 250 + 1  # an address's third byte
    tag = f"{os.getpid() % 1000}x{number}"
    jump, build = f"vngt-j{tag}", f"vngt-b{tag}"
    here, there = f"10.201.{number}", f"10.202.{number}"
    steps = [
        ["ip", "netns", "add", jump], ["ip", "netns", "add", build],
        ["ip", "link", "add", f"vj{tag}", "type", "veth", "peer", "name", f"vjp{tag}"],
        ["ip", "link", "set", f"vjp{tag}", "netns", jump],
        ["ip", "addr", "add", f"{here}.1/30", "dev", f"vj{tag}"], ["ip", "link", "set", f"vj{tag}", "up"],
        [*in_netns(jump), "ip", "addr", "add", f"{here}.2/30", "dev", f"vjp{tag}"],
        [*in_netns(jump), "ip", "link", "set", f"vjp{tag}", "up"], [*in_netns(jump), "ip", "link", "set", "lo", "up"],
        [*in_netns(jump), "ip", "link", "add", f"vb{tag}", "type", "veth", "peer", "name", f"vbp{tag}"],
        [*in_netns(jump), "ip", "link", "set", f"vbp{tag}", "netns", build],
        [*in_netns(jump), "ip", "addr", "add", f"{there}.1/30", "dev", f"vb{tag}"],
        [*in_netns(jump), "ip", "link", "set", f"vb{tag}", "up"],
        [*in_netns(build), "ip", "addr", "add", f"{there}.2/30", "dev", f"vbp{tag}"],
        [*in_netns(build), "ip", "link", "set", f"vbp{tag}", "up"], [*in_netns(build), "ip", "link", "set", "lo", "up"],
    ]  # fmt: skip
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        yield Bastion(jump, build, f"{here}.2", f"{there}.2")
    finally:
        subprocess.run(["ip", "link", "del", f"vj{tag}"], capture_output=True)
        for netns in (jump, build):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def in_netns(name: str) -> list[str]:
    """A command's prefix that runs it in network namespace `name` (of `ip netns add`). Not `ip -n` or `ip netns
    exec`: they remount / and /sys, which fails where / is no mount point (a chroot: ../shared/fresh-machine)."""
    return ["nsenter", f"--net=/run/netns/{name}"]


_BASTIONS = itertools.count(os.getpid() % 50 * 5)  # each pytest worker's from a place of its own


def behind_a_bastion(start_sshd, bastion: Bastion, home: Path) -> tuple[Sshd, Sshd]:
    """The jump host's sshd (the test user's usual key) and the build host's behind it, which takes only
    ~/.ssh/builder_key; ~/.ssh/config reaches the build host as `builder` through an Include, with
    HostName, Port, User, IdentityFile, IdentitiesOnly, ProxyJump and the jump host as `jumper`."""
    builder_key = keygen(home / ".ssh" / "builder_key")
    jump = start_sshd(netns=bastion.jump_netns, address=bastion.jump_address)
    build = start_sshd(netns=bastion.build_netns, address=bastion.build_address, keys=(builder_key,))
    (home / ".ssh" / "config.d").mkdir()
    (home / ".ssh" / "config").write_text("Include ~/.ssh/config.d/*.conf\n")
    (home / ".ssh" / "config.d" / "hosts.conf").write_text(
        f"Host builder\n  HostName {build.address}\n  Port {build.port}\n  User root\n"
        "  IdentityFile ~/.ssh/builder_key\n  IdentitiesOnly yes\n  ProxyJump jumper\n"
        f"Host jumper\n  HostName {jump.address}\n  Port {jump.port}\n  User root\n"
    )
    return jump, build


def build_args(sshd_target: str, tmp_path: Path, url: str = "https://127.0.0.1:9/linux.git", tag: str = SHA):
    return ["build", "--tag", tag, "--kernel-url", url, "--build-host", sshd_target, "--cache-dir", str(tmp_path / "c")]


def no_entries(tmp_path: Path) -> bool:
    kernels = tmp_path / "c" / "kernels"
    return not kernels.exists() or not [p for p in kernels.iterdir() if not p.name.startswith(".")]


def loopback_route(port: int) -> sshconfig.Route:
    """root@127.0.0.1:PORT, as build-host names it with no ~/.ssh/config."""
    return sshconfig.Route(f"root@127.0.0.1:{port}", sshconfig.Hop("root", "127.0.0.1", port))


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("vngtasks: build-host: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_host_parsing_without_a_config(tmp_path: Path):
    none = tmp_path / "no-config"
    route = sshconfig.resolve("build.example.org", config=none)
    assert route.target == sshconfig.Hop(None, "build.example.org", 22) and route.jumps == ()
    assert sshconfig.resolve("ci@10.0.0.2:2222", config=none).target == sshconfig.Hop("ci", "10.0.0.2", 2222)
    assert sshconfig.resolve("ci@h:2222", config=none).target.known_hosts_name == "[h]:2222"
    assert sshconfig.resolve("h", config=none).target.known_hosts_name == "h"
    with pytest.raises(ValueError, match="build-host"):
        sshconfig.resolve("h:70000", config=none)


def test_a_port_out_of_range_is_bad_input(cli, tmp_path: Path):
    done = cli(*build_args("builder:70000", tmp_path))
    assert done.returncode == 2
    expected = (
        "vngtasks: build-host: 'builder:70000' is not valid: expected an alias of ~/.ssh/config or [user@]host[:port]"
    )
    assert done.stderr.splitlines()[-1] == expected


def test_local_repositories_are_pushed_and_urls_fetched_there(tmp_path: Path):
    assert buildhost.local_repo(f"file://{tmp_path}") == tmp_path
    assert buildhost.local_repo(str(tmp_path)) == tmp_path
    assert buildhost.local_repo("https://git.kernel.org/linux.git") is None
    assert buildhost.local_repo("git@github.com:torvalds/linux.git") is None


def test_git_ssh_is_as_strict_as_paramiko_on_the_same_route(home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(home))
    jump = sshconfig.Hop("j", "bastion", 2200)
    target = sshconfig.Hop("u", "h", 2222, key_alias="builder", identities=(home / "k",), identities_only=True)
    text = buildhost_ssh.git_ssh_config(sshconfig.Route("builder", target, (jump,))).replace("\n  ", " | ")
    assert "Host vngtasks-jump-0 | HostName bastion | Port 2200 | HostKeyAlias [bastion]:2200" in text, text
    assert f"Host {buildhost_ssh.GIT_HOST} | HostName h | Port 2222 | HostKeyAlias builder" in text
    assert text.count("StrictHostKeyChecking yes") == 2 and text.count("BatchMode yes") == 2
    assert text.count(f"UserKnownHostsFile {home}/.ssh/known_hosts") == 2
    assert f"IdentityFile {home}/k | IdentitiesOnly yes | ProxyJump vngtasks-jump-0" in text


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


def test_a_matrix_s_build_host_that_refuses_gives_its_cells_to_the_other(cli, start_sshd, home: Path, tmp_path: Path):
    """Two build hosts, the first refusing connections: its cell goes back, with one warning, and the other host takes
    every cell (each fails there at its fetch of a kernel-url nobody serves: no-kernel, as a build's failure is).
    The second host's key is known from build-host-known-hosts only: its lines serve every host of the list."""
    sshd = start_sshd()
    refused = f"127.0.0.1:{free_port()}"
    shas = ("1" * 40, "2" * 40)
    args = ["matrix", "--tag", ",".join(shas), "--kernel-url", "https://127.0.0.1:9/linux.git", "--build-host",
            f"{refused} {sshd.target}", "--build-host-known-hosts", f"[127.0.0.1]:{sshd.port} {sshd.host_key}",
            "--cache-dir", str(tmp_path / "c"), "--log-dir", str(tmp_path / "logs"), "--", "true"]  # fmt: skip
    done = cli(*args)
    assert done.returncode == 1, done.stderr
    warned = [line for line in done.stderr.splitlines() if "connection refused" in line]
    assert warned == [f"vngtasks: warning: matrix: build-host: {refused}: connect: connection refused: no more "
                      "builds there, its cell goes to another build host"], done.stderr  # fmt: skip
    cells = json.loads((tmp_path / "logs" / "matrix.json").read_text())["cells"]
    assert [(c["sha"], c["result"]) for c in cells] == [(sha, "no-kernel") for sha in shas]
    no_kernel = [line for line in done.stderr.splitlines() if ": no kernel: " in line]
    assert len(no_kernel) == 2 and all(f"build-host: 127.0.0.1:{sshd.port}: fetch: " in line for line in no_kernel)


def test_a_single_build_goes_to_the_first_build_host_of_a_list(cli, start_sshd, home: Path, tmp_path: Path):
    """`invoke build` with two build hosts: the first (refusing) is the one tried, the second (up) never reached."""
    sshd = start_sshd()
    sshd.trust(home)
    refused = f"127.0.0.1:{free_port()}"
    done = cli(*build_args(f"{refused} {sshd.target}", tmp_path))
    assert done.returncode == 1
    assert error_line(done.stderr) == f"vngtasks: build-host: {refused}: connect: connection refused"
    assert sshd.sessions() == [] and "Accepted" not in sshd.log.read_text()


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
    return buildhost_ssh.connect(loopback_route(sshd.port), accept_new=False), tree, dest


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
    route = loopback_route(sshd.port)
    lock = str(sshd.remote_home / "vng-kernel-k.lock")
    first, second = buildhost_ssh.connect(route, accept_new=False), buildhost_ssh.connect(route, accept_new=False)
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


def guarded_connection(
    start_sshd, home: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Sshd, buildhost_ssh.BuildHost, str]:
    """A trusted sshd on loopback, a connection to it whose commands have a pid file there (as a build's do), and a
    `sleep` duration that names our command in ps."""
    monkeypatch.setenv("HOME", str(home))
    sshd = start_sshd()
    sshd.trust(home)
    conn = buildhost_ssh.connect(loopback_route(sshd.port), accept_new=False)
    conn.pidfile = str(sshd.remote_home / "command.pid")
    return sshd, conn, f"{random.randint(1000, 9999)}.{random.randint(100, 999)}"


def test_remote_commands_die_with_the_connection(start_sshd, home: Path, monkeypatch: pytest.MonkeyPatch):
    sshd, conn, seconds = guarded_connection(start_sshd, home, monkeypatch)
    host = loopback_route(sshd.port).target
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
    assert isinstance(failures[0], Unreachable)  # the commit is not to blame (a matrix, a bisect)
    assert _wait(lambda: not _pids(f"sleep {seconds}")), "the remote command outlived its connection"
    conn.close()


def test_a_failing_command_is_stopped_as_a_whole_while_connected(start_sshd, home: Path, monkeypatch):
    _, conn, seconds = guarded_connection(start_sshd, home, monkeypatch)
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


def test_a_matrix_stopping_ends_a_build_thread_s_command_there(start_sshd, home: Path, monkeypatch):
    """A matrix's build thread waits in a command on its build host; the matrix stops (the event its Threads set): the
    connection is ended from the watcher (buildhost._end: the command killed through its pid file, the connection
    closed), the thread's wait ends in Abandoned, not in a failure a cell would be kept with, and nothing is left
    running there."""
    from vngtasks import supervise

    sshd, conn, seconds = guarded_connection(start_sshd, home, monkeypatch)
    stop, ended = threading.Event(), []

    def build_thread() -> None:
        with supervise.stops_when(stop):
            try:
                with (
                    supervise.ended_when_stopped(lambda: buildhost._end(conn)),
                    buildhost_ssh.stage(conn, loopback_route(sshd.port).target, "build"),
                ):
                    conn.run(f"sleep {seconds}", in_stream=False, hide=True)
            except BaseException as error:  # which one is the test's point
                ended.append(error)

    thread = threading.Thread(target=build_thread)
    thread.start()
    assert _wait(lambda: _pids(f"sleep {seconds}")), "the remote command never started"
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive() and [type(e) for e in ended] == [supervise.Abandoned]
    assert _wait(lambda: not _pids(f"sleep {seconds}")), "the command outlived the stop"
    assert not conn.is_connected


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
    route = loopback_route(sshd.port)
    host = route.target
    conn = buildhost_ssh.connect(route, accept_new=False)
    far = buildhost.survey(conn, host)
    there = buildsteps.plan_on(settings, SHA, far, f"{sshd.remote_home}/work")
    env = buildsteps.make_env(there, far)
    kernelmake.forget_ccache_counts(conn, env)
    compile_one(conn, there, env, source)
    counts = kernelmake.ccache_counts(conn, env)
    conn.close()
    assert (counts["hits"], counts["misses"]) == (1, 0)


def test_ccache_remote_reaches_the_build_host_in_a_private_file_only(
    start_sshd, home: Path, tmp_path: Path, monkeypatch
):
    """ccache-remote on a build host (Redis, with a password): an object compiled here, a miss written to the remote,
    is a remote hit there, where the local ccache is empty. The URL reached the build host in a file only its owner
    reads, removed after the build: never on a command line or in an environment of ours there."""
    from servers import PASSWORD, start_redis

    monkeypatch.setenv("HOME", str(home))
    server = start_redis(tmp_path / "redis")
    try:
        sshd = start_sshd()
        sshd.trust(home)
        source = f"int vngtasks_probe_{random.getrandbits(64)}(void) {{ return 1; }}\n"  # new to every ccache
        settings = effective(DEFAULTS, {"tag": SHA, "ccache_remote": server.url}, workspace=tmp_path)
        here = buildsteps.Plan(
            settings, SHA, str(tmp_path / "here" / "linux"), arches.host(), 1, str(tmp_path / "here" / "tools")
        )
        env_here = buildsteps.build_env(here, str(home), {"CCACHE_DIR": str(tmp_path / "ccache-here")})
        buildsteps.write_tools(Context(), here)
        with buildsteps.ccache_config(Context(), here, env_here):
            compile_one(Context(), here, env_here, source)
        assert server.stored() > 0
        route = loopback_route(sshd.port)
        conn = buildhost_ssh.connect(route, accept_new=False)
        ran: list[tuple[str, dict]] = []
        run = conn.run

        def recorded(command: str, **kwargs):
            ran.append((command, kwargs.get("env") or {}))
            return run(command, **kwargs)

        conn.run = recorded
        far = buildhost.survey(conn, route.target)
        there = buildsteps.plan_on(settings, SHA, far, f"{sshd.remote_home}/work")
        env = {**buildsteps.make_env(there, far), "CCACHE_DIR": f"{sshd.remote_home}/ccache"}
        config = Path(env["CCACHE_CONFIGPATH"])
        kernelmake.forget_ccache_counts(conn, env)
        buildsteps.write_tools(conn, there)
        with buildsteps.ccache_config(conn, there, env):
            assert config.stat().st_mode & 0o777 == 0o600 and PASSWORD in config.read_text()
            compile_one(conn, there, env, source)
        counts = kernelmake.ccache_counts(conn, env)
        conn.close()
    finally:
        server.stop()
    assert (counts["remote_hits"], counts["misses"], counts["remote_errors"]) == (1, 0, 0), counts
    assert not config.exists()
    password = PASSWORD.replace("%2F", "/")
    leaked = [command for command, environment in ran if PASSWORD in command + repr(environment)]
    assert not leaked and not [c for c, e in ran if password in c + repr(e)], leaked


def test_a_builds_ccache_counts_are_its_own_while_another_build_shares_the_directory(tmp_path: Path, monkeypatch):
    """Two builds share one CCACHE_DIR (a build host's, at once): each build's hits and misses in its metadata
    are of its own compilations, not the directory's counters moving under both."""
    monkeypatch.setenv("CCACHE_DIR", str(tmp_path / "ccache"))
    settings = effective(DEFAULTS, {"tag": SHA}, workspace=tmp_path)
    ours, theirs = (
        buildsteps.Plan(settings, SHA, str(tmp_path / n / "linux"), arches.host(), 1, str(tmp_path / n / "tools"))
        for n in ("ours", "theirs")
    )
    env = buildsteps.build_env(ours, str(tmp_path))
    source = f"int vngtasks_probe_{random.getrandbits(64)}(void) {{ return 1; }}\n"
    kernelmake.forget_ccache_counts(Context(), env)
    compile_one(Context(), ours, env, source)  # a miss
    compile_one(Context(), theirs, buildsteps.build_env(theirs, str(tmp_path)), "int other(void) { return 2; }\n")
    compile_one(Context(), ours, env, source)  # a hit
    counts = kernelmake.ccache_counts(Context(), env)
    assert (counts["hits"], counts["misses"]) == (1, 1)


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
@ONE_BASTION_AT_A_TIME
def test_build_on_the_host_then_boot_here(
    cli, start_sshd, bastion: Bastion, home: Path, tmp_path: Path, workspace: Path, kernel_tree, tiny_build: TinyBuild
):
    """The session's tiny kernel filled the tests' ccache here: the build host, sharing it, hits it. The build
    host is `builder` of ~/.ssh/config, behind a jump host (behind_a_bastion): the push, the commands and the
    kernel's stream home all go through it."""
    repo, sha = kernel_tree
    jump, sshd = behind_a_bastion(start_sshd, bastion, home)
    jump.trust(home)
    sshd.trust(home)
    (workspace / "ci").mkdir()
    # The fragment every kernel-building test uses: one config, one ccache (and the upload path is tested).
    (workspace / "ci" / "kernel.config").write_text(KCONFIG.read_text())
    args = ["boot", "--tag", "v6.12", "--kernel-url", str(repo), "--name", "far", "--build-host", "builder"]
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
    assert metadata["built_on"] == f"{bastion.build_address}:{sshd.port}" and metadata["sha"] == sha
    assert metadata["pushed_bytes"] > 100_000_000  # the first push ships the whole tree
    hits, misses = metadata["ccache"]["hits"], metadata["ccache"]["misses"]
    assert hits > 20 * misses, metadata["ccache"]  # the objects the local tiny build compiled
    assert "struct task_struct {" in (entry / "vmlinux.h").read_text()
    # The work tree is gone; the key's empty lock file stays (removing a flock file races the next locker).
    left = list((sshd.remote_home / ".cache" / "vngtasks" / "remote-work").iterdir())
    assert [p.name for p in left] == [f"{entry.name}.lock"] and left[0].stat().st_size == 0
    assert not _processes_under(sshd.remote_home)


@pytest.mark.slow
@HOST_PACKAGES  # arm64_build runs invoke deps --arch arm64
def test_a_matrix_builds_a_cell_on_each_build_host_at_once_fails_by_its_cells_and_resumes(
    cli, start_sshd, home: Path, tmp_path: Path, workspace: Path, remote, tiny_build: TinyBuild, arm64_build: TinyBuild
):
    """`invoke matrix` over v6.12 and its commit named by SHA, x86_64 and arm64 (tiny), with two build hosts (each its
    own sshd and home; they share the tests' ccache, which the session's two kernels filled): the two kernels build
    at once, one on each host, each pushed there; the SHA's cells are the same kernels. Four boots here; the
    workload fails on arm64, which fails the run and is named. The re-run resumes from the kept cells: nothing is
    built or booted again."""
    url, sha = remote
    hosts = [start_sshd(), start_sshd()]
    for sshd in hosts:
        sshd.trust(home)
    (workspace / "ci").mkdir()
    (workspace / "ci" / "kernel.config").write_text(KCONFIG.read_text())
    cache_dir = tmp_path / "c"
    cache_dir.mkdir()
    (cache_dir / ROOTS).symlink_to(FOREIGN_CACHE / ROOTS)  # arm64's guest root, made by arm64_build's `invoke deps`
    flags = ("--tag", f"{TAG},{sha}", "--arch", "x86_64,arm64", "--kernel-url", url, "--name", "ci")
    flags += ("--kconfig-base", "tiny", "--kconfig", "ci/kernel.config", "--cache-dir", str(cache_dir))
    flags += ("--build-host", " ".join(sshd.target for sshd in hosts))
    workload = 'uname -m; test "$(uname -m)" = x86_64'
    args = ("matrix", *flags, "--log-dir", "logs", "--verbose", "false", "--", workload)
    summary = workspace / "step-summary.md"
    first = cli(*args, env={**CCACHE_ENV, "GITHUB_STEP_SUMMARY": str(summary)}, timeout=2400)
    assert first.returncode == errors.FAILED, first.stderr[-3000:]
    assert "one build per build host at once (2)" in first.stderr
    built_on = {}
    for entry in (cache_dir / "kernels").glob("vng-kernel-ci-*"):
        metadata = json.loads((entry / "metadata.json").read_text())
        built_on[metadata["arch"]] = metadata["built_on"]
        assert metadata["pushed_bytes"] > 100_000_000  # each host got the whole tree
    assert sorted(built_on.values()) == sorted(f"{s.address}:{s.port}" for s in hosts), built_on  # one kernel each
    rows = [line for line in first.stdout.splitlines() if line.startswith((f"| {TAG} |", f"| {sha}"))]
    assert len(rows) == 4 and [row.split(" | ")[4] for row in rows] == ["passed", "failed (1)"] * 2, first.stdout
    assert all(" | built | " in row for row in rows[:2]), first.stdout
    assert all(row in summary.read_text() for row in rows)
    failed = [line for line in first.stderr.splitlines() if line.startswith("vngtasks: warning: matrix: ")]
    assert failed == [f"vngtasks: warning: matrix: {TAG} arm64 tiny: failed (1)",
                      f"vngtasks: warning: matrix: {sha} arm64 tiny: failed (1)"]  # fmt: skip
    assert first.stderr.count("booted in") == 4
    assert first.stderr.count("cache: miss ") == 2  # two kernels, each built once: the SHA's cells found them
    # Each build's lines are its cell's: make's, labeled.
    assert f"[01-{TAG}-x86_64-tiny] " in first.stdout and f"[02-{TAG}-arm64-tiny] " in first.stdout
    report = json.loads((workspace / "logs" / "matrix.json").read_text())
    assert [(c["arch"], c["result"], c["sha"]) for c in report["cells"]] == [("x86_64", "passed", sha),
                                                                            ("arm64", "failed", sha)] * 2  # fmt: skip
    assert (workspace / "logs" / "matrix" / f"02-{TAG}-arm64-tiny" / "vng-console.log").is_file()
    again = cli(*args, env=CCACHE_ENV, timeout=600)
    assert (
        again.returncode == errors.FAILED and "resumed from" in again.stderr and "4 of 4 cell(s) done" in again.stderr
    )
    assert "matrix: cell" not in again.stderr and "booted in" not in again.stderr, again.stderr
    assert [line for line in again.stdout.splitlines() if line.startswith((f"| {TAG} |", f"| {sha}"))] == rows
    for sshd in hosts:  # the work trees are gone
        assert not list((sshd.remote_home / ".cache" / "vngtasks" / "remote-work").glob("*/"))
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


@ONE_BASTION_AT_A_TIME
def test_an_alias_of_ssh_config_reaches_the_build_host_through_its_jump_host_for_us_and_for_git(
    start_sshd, bastion: Bastion, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """build-host as ssh takes it: `builder`, from a file the config Includes, behind a jump host that alone
    can reach it. paramiko's connection and git's push both go that way, with every host key checked."""
    monkeypatch.setenv("HOME", str(home))
    jump, build = behind_a_bastion(start_sshd, bastion, home)
    jump.trust(home)
    build.trust(home)
    here = subprocess.run(["ssh", "-o", "ConnectTimeout=3", "-o", "BatchMode=yes", "-p", str(build.port),
                           bastion.build_address, "true"], capture_output=True, text=True)  # fmt: skip
    assert here.returncode == 255  # from here, the build host cannot be reached but through the jump host
    route = sshconfig.resolve("builder")
    assert route.target == sshconfig.Hop("root", bastion.build_address, build.port, None,
                                          (home / ".ssh" / "builder_key",), True)  # fmt: skip
    assert [hop.label for hop in route.jumps] == [f"{bastion.jump_address}:{jump.port}"]
    conn = buildhost_ssh.connect(route, accept_new=False)
    try:
        assert conn.run("echo $HOME", hide=True, in_stream=False).stdout.strip() == str(build.remote_home)
        repo = tmp_path / "repo"
        sha = small_repo(repo, b"pushed through the jump host\n")
        bare = f"{build.remote_home}/pushed.git"
        assert buildhost.push(Context(), conn, route, repo, sha, bare, "refs/vngtasks/test") > 0
        shown = conn.run(f"git -C {bare} cat-file -p {sha}:big", hide=True, in_stream=False).stdout
        assert shown == "pushed through the jump host\n"
    finally:
        conn.close()


@ONE_BASTION_AT_A_TIME
def test_a_jump_hosts_unknown_key_is_refused(cli, start_sshd, bastion: Bastion, home: Path, tmp_path: Path):
    jump, build = behind_a_bastion(start_sshd, bastion, home)
    build.trust(home)  # but not the jump host
    done = cli(*build_args("builder", tmp_path))
    assert done.returncode == 1, done.stderr
    line = error_line(done.stderr)
    assert line.startswith(f"vngtasks: build-host: {bastion.jump_address}:{jump.port} (jump host): host-key: "
                           "unknown host key ssh-ed25519 "), line  # fmt: skip
    assert fingerprint(jump.host_key) in line and no_entries(tmp_path)


def test_a_host_key_alias_names_the_key_in_known_hosts(cli, start_sshd, home: Path, tmp_path: Path):
    sshd = start_sshd()
    sshd.trust(home, name="builder-key")  # known under its alias only
    (home / ".ssh" / "config").write_text(
        f"Host builder\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n  HostKeyAlias builder-key\n"
    )
    done = cli(*build_args("builder", tmp_path))
    assert "host-key" not in done.stderr, done.stderr  # it got past the key check: it fails later, on its fetch
    assert error_line(done.stderr).startswith(f"vngtasks: build-host: 127.0.0.1:{sshd.port}: ")


def test_a_proxy_command_is_refused_unless_allowed(cli, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(home))
    (home / ".ssh").mkdir(exist_ok=True)
    (home / ".ssh" / "config").write_text("Host builder\n  ProxyCommand nc -q0 %h 22\n")
    done = cli(*build_args("builder", tmp_path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"vngtasks: build-host builder: ProxyCommand in {home}/.ssh/config runs a shell command vngtasks does not"
        " control: refused (set build-host-proxy-command true to allow it)"
    )
    assert no_entries(tmp_path)
    route = sshconfig.resolve("builder", allow_proxy_command=True)
    assert route.target.proxy_command == "nc -q0 builder 22"


def test_a_matrix_s_later_build_host_with_a_bad_route_is_bad_input_before_anything(cli, home: Path, tmp_path: Path):
    """The second build host of a matrix (reached only in its build thread) is resolved with the first, before any tag
    is resolved or kernel fetched: its refused ProxyCommand is one line, exit 2, nothing written."""
    (home / ".ssh").mkdir(exist_ok=True)
    (home / ".ssh" / "config").write_text("Host builder2\n  ProxyCommand nc -q0 %h 22\n")
    args = ["matrix", "--tag", "v1,v2", "--kernel-url", "https://127.0.0.1:9/linux.git", "--build-host",
            "127.0.0.1:9 builder2", "--cache-dir", str(tmp_path / "c"), "--", "true"]  # fmt: skip
    done = cli(*args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("vngtasks: build-host builder2: ProxyCommand in ")
    assert not (tmp_path / "c").exists()


def test_settings_and_a_dry_run_say_where_a_build_would_go(cli, home: Path, tmp_path: Path):
    (home / ".ssh").mkdir(exist_ok=True)
    (home / ".ssh" / "config").write_text(
        "Host builder\n  HostName 10.9.9.9\n  Port 2222\n  User ci\n  IdentityFile ~/.ssh/builder_key\n"
        "  ProxyJump bob@bastion:2200\n"
    )
    shown = cli("settings", env={"INVOKE_VNG_BUILD_HOST": "builder"})
    expected = f"ci@10.9.9.9:2222 key {home}/.ssh/builder_key via bob@bastion:2200 keys: the agent, ~/.ssh/id_*"
    assert f"build-host-route={expected}\n" in shown.stdout, shown.stderr
    planned = cli(*build_args("builder", tmp_path), "--dry-run")
    assert f"built on {expected} over SSH" in planned.stdout, planned.stderr
    # Several build hosts: every route in the list's order; a single build would go to the first.
    shown = cli("settings", env={"INVOKE_VNG_BUILD_HOST": "builder me@big2:2200"})
    assert "\nbuild-host=builder me@big2:2200\n" in shown.stdout
    assert f"\nbuild-host-route={expected}; me@big2:2200 keys: " in shown.stdout, shown.stdout
    planned = cli(*build_args("builder me@big2:2200", tmp_path), "--dry-run")
    assert f"built on {expected} over SSH" in planned.stdout, planned.stderr


def test_ci_credentials_reach_the_build_host_where_no_ssh_directory_exists(cli, start_sshd, home: Path, tmp_path: Path):
    """A runner has no ~/.ssh: the key and the host's known_hosts line come as settings (the action's inputs,
    from secrets), for paramiko and for git's push alike. `invoke settings` never shows the key."""
    sshd = start_sshd()  # it takes the key start_sshd made in ~/.ssh
    key = (home / ".ssh" / "id_ed25519").read_text()
    shutil.rmtree(home / ".ssh")
    env = {
        "INVOKE_VNG_BUILD_HOST_KEY": key,
        "INVOKE_VNG_BUILD_HOST_KNOWN_HOSTS": f"[127.0.0.1]:{sshd.port} {sshd.host_key}",
    }
    tree = tmp_path / "tree"
    sha = small_repo(tree, b"not a kernel\n")
    done = cli(*build_args(sshd.target, tmp_path, url=str(tree), tag="v1"), env=env)
    assert done.returncode != 0
    line = error_line(done.stderr)
    assert f"127.0.0.1:{sshd.port}: build: " in line, line  # past the key check, the login and the push
    pushed = sshd.remote_home / ".cache" / "vngtasks" / "remote-git" / "default.git"
    assert (
        subprocess.run(["git", "-C", str(pushed), "cat-file", "-t", sha], capture_output=True, text=True).stdout
        == "commit\n"
    )
    shown = cli("settings", env=env)
    assert "build-host-key=(set, not shown)\n" in shown.stdout and "PRIVATE KEY" not in shown.stdout + shown.stderr
    assert not (home / ".ssh").exists()  # nothing recorded: the known_hosts line is the setting's
