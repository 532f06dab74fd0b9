"""Building a kernel on another machine over SSH, with the same steps as a local build.

A Fabric `Connection` is an invoke `Context`, so `build.py`'s steps run on the build host
unchanged: its cores, its ccache, a work tree per cache key under `~/.cache/vngtasks` there.
A local kernel tree (a path or `file://` URL the build host cannot see) is pushed with git
over ssh to a bare repository there, so only missing objects travel. The trimmed result comes
back as one tar stream into the local cache's temp directory, which becomes the entry in one
rename, exactly as a local build's does.

Host keys are checked strictly, for paramiko and for git's ssh alike: a key not in
`~/.ssh/known_hosts` is refused unless `build-host-accept-new` is true (then it is recorded,
like OpenSSH's `accept-new`); a changed key is always refused. `~/.ssh/config` is not read.
Every failure is one line: `build-host: HOST:PORT: STAGE: REASON`.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import re
import shlex
import socket
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
from fabric import Config, Connection
from invoke import Context
from invoke.exceptions import UnexpectedExit

from . import arches, build, cache, deps, log, untar
from .errors import BAD_INPUT, FAILED, MISSING_TOOL, Failure
from .resolve import Resolved
from .settings import InputError, Settings

CONNECT_TIMEOUT_SECONDS = 30
KEEPALIVE_SECONDS = 15
REMOTE_ROOT = ".cache/vngtasks"  # under the build host's $HOME
LOW_DISK_BYTES = 10 * 1024**3  # a kernel build with debug info needs several GiB
_HOST = re.compile(r"(?:(?P<user>[^@]+)@)?(?P<hostname>[^:@]+)(?::(?P<port>[0-9]+))?")
# Paths we hand to `cd` and make: invoke's `cd` escapes spaces only, so keep them plain.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")
_WRITTEN = re.compile(r"Writing objects: 100% \([0-9]+/[0-9]+\), ([0-9.]+) (bytes|KiB|MiB|GiB)")
_ERROR = re.compile(r"(?i)\b(error|fatal|denied|failed|refused|cannot|could not)\b")
_UNITS = {"bytes": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}

# Runs one command in a session of its own (pid in "$2"), killed as a whole when our SSH
# channel goes away: the guard reads the channel's stdin, which reaches EOF only then.
_GUARD = """\
exec 3<&0 </dev/null
setsid sh -c "$1" &
pid=$!
echo "$pid" > "$2"
setsid sh -c 'cat >/dev/null; kill -TERM "-$1" 2>/dev/null' guard "$pid" <&3 3<&- &
guard=$!
exec 3<&-
wait "$pid"
status=$?
kill -TERM "-$guard" 2>/dev/null
rm -f "$2"
exit "$status"
"""


@dataclass(frozen=True)
class Host:
    """`[user@]host[:port]`, as the `build-host` setting gives it."""

    user: str | None
    hostname: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Host:
        found = _HOST.fullmatch(text)
        port = int(found["port"]) if found and found["port"] else 22
        if not found or not 1 <= port <= 65535:
            raise InputError("build_host", f"{text!r} is not valid: expected [user@]host[:port]")
        return cls(found["user"], found["hostname"], port)

    @property
    def label(self) -> str:
        return f"{self.hostname}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts names this host (OpenSSH and paramiko agree)."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def failure(self, stage: str, reason: str, code: int = FAILED) -> Failure:
        return Failure(f"build-host: {self.label}: {stage}: {reason}", code)


def known_hosts_file() -> Path:
    return Path.home() / ".ssh" / "known_hosts"


def fingerprint(key: paramiko.PKey) -> str:
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


class UnknownHostKey(paramiko.SSHException):
    def __init__(self, key: paramiko.PKey) -> None:
        super().__init__("host key not in known_hosts")
        self.key = key


class RevokedHostKey(paramiko.SSHException):
    def __init__(self, key: paramiko.PKey) -> None:
        super().__init__("host key revoked in known_hosts")
        self.key = key


@dataclass(frozen=True)
class KnownHosts:
    """known_hosts as OpenSSH reads it: plain entries, and the keys its `@revoked` lines name.
    `@cert-authority` lines are skipped with a notice (paramiko checks no certificates)."""

    entries: tuple[paramiko.hostkeys.HostKeyEntry, ...]
    revoked: tuple[bytes, ...]  # the revoked keys, as their wire bytes

    @classmethod
    def read(cls, path: Path) -> KnownHosts:
        entries, revoked = [], []
        text = path.read_text(errors="replace") if path.exists() else ""
        for number, line in enumerate(text.splitlines(), 1):
            marker, _, rest = line.strip().partition(" ") if line.strip().startswith("@") else ("", "", line)
            if not rest.strip() or rest.strip().startswith("#"):
                continue
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(rest.strip(), number)
            except Exception as error:  # paramiko raises several kinds for a line it cannot read
                log.warn(f"host-key: {path}:{number}: skipped, not a known_hosts line ({_describe(error)})")
                continue
            if entry is None or entry.key is None:
                continue
            if marker == "@revoked":
                revoked.append(entry.key.asbytes())
            elif marker:
                log.info(f"host-key: {path}:{number}: {marker} lines are not used by vngtasks: skipped")
            else:
                entries.append(entry)
        return cls(tuple(entries), tuple(revoked))

    def refuse_revoked(self, key: paramiko.PKey) -> None:
        if key.asbytes() in self.revoked:
            raise RevokedHostKey(key)


class _Refuse(paramiko.MissingHostKeyPolicy):
    """paramiko's RejectPolicy, keeping the key so the message can show its fingerprint."""

    def __init__(self, known: KnownHosts) -> None:
        self.known = known

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.known.refuse_revoked(key)
        raise UnknownHostKey(key)


class _AcceptNew(paramiko.MissingHostKeyPolicy):
    """OpenSSH's `accept-new`: a host with no key on record gets this one, appended to known_hosts
    (never a key that known_hosts revokes)."""

    def __init__(self, path: Path, known: KnownHosts) -> None:
        self.path, self.known = path, known

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.known.refuse_revoked(key)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(paramiko.hostkeys.HostKeyEntry([hostname], key).to_line())
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.info(f"host-key: {hostname}: new key {fingerprint(key)} accepted and recorded in {self.path}")


class BuildHost(Connection):
    """A Connection whose env values are quoted, and whose stdin-less commands die with it."""

    pidfile = ""  # set once the work directory is known

    def run(self, command: str, **kwargs: object):  # type: ignore[override]
        if self.pidfile and kwargs.get("in_stream") is False:
            command = shlex.join(["sh", "-c", _GUARD, "vngtasks-build", command, self.pidfile])
        env = kwargs.pop("env", None) or {}
        if env:  # Fabric would paste the values in unquoted
            assignments = " ".join(f"{name}={shlex.quote(str(value))}" for name, value in sorted(env.items()))
            command = f"export {assignments} && {command}"
        return super().run(command, **kwargs)

    def stop_build(self) -> None:
        """Kill the session of the command in flight, if any and if we still can."""
        if not (self.pidfile and self.is_connected):
            return
        quoted = shlex.quote(self.pidfile)
        with contextlib.suppress(Exception):
            super().run(
                f'test -s {quoted} && kill -TERM "-$(cat {quoted})" 2>/dev/null; rm -f {quoted}',
                hide=True,
                warn=True,
                in_stream=False,
                timeout=30,
            )


def connect(host: Host, accept_new: bool) -> BuildHost:
    """An open connection whose host key matched known_hosts (or was new and accepted)."""
    config = Config(lazy=True, overrides={"load_ssh_configs": False, "timeouts": {"connect": CONNECT_TIMEOUT_SECONDS}})
    conn = BuildHost(host.hostname, user=host.user, port=host.port, config=config)
    path = known_hosts_file()
    try:
        known = KnownHosts.read(path)
    except OSError as error:
        raise host.failure("host-key", f"cannot read {path}: {error.strerror}") from None
    for entry in known.entries:  # a revoked key is in no entry: it can only be refused as unknown
        if entry.key.asbytes() not in known.revoked:
            for name in entry.hostnames:
                conn.client.get_host_keys().add(name, entry.key.get_name(), entry.key)
    conn.client.set_missing_host_key_policy(_AcceptNew(path, known) if accept_new else _Refuse(known))
    try:
        conn.open()
    except RevokedHostKey as error:
        raise host.failure("host-key", f"host key {fingerprint(error.key)} is REVOKED in {path}: refused") from None
    except UnknownHostKey as error:
        scan = shlex.join(["ssh-keyscan", "-p", str(host.port), "-t", error.key.get_name(), host.hostname])
        raise host.failure(
            "host-key",
            f"unknown host key {fingerprint(error.key)}: refused. If that is the host's key, trust it with"
            f" `{scan} >> ~/.ssh/known_hosts` or set build-host-accept-new true",
        ) from None
    except paramiko.BadHostKeyException as error:
        raise host.failure(
            "host-key",
            f"host key CHANGED: offered {fingerprint(error.key)}, known_hosts has {fingerprint(error.expected_key)}:"
            f" refused (if the change is expected: `ssh-keygen -R {shlex.quote(host.known_hosts_name)}`)",
        ) from None
    except paramiko.AuthenticationException as error:
        user = conn.user
        raise host.failure(
            "auth", f"{user}: {error} (tried the SSH agent and ~/.ssh/id_* keys; ~/.ssh/config is not read)"
        ) from None
    except paramiko.ssh_exception.NoValidConnectionsError as error:
        codes = {getattr(e, "errno", None) for e in error.errors.values()}
        reason = "connection refused" if codes == {errno.ECONNREFUSED} else str(error)
        raise host.failure("connect", reason) from None
    except TimeoutError:
        raise host.failure("connect", f"no answer within {CONNECT_TIMEOUT_SECONDS} s") from None
    except socket.gaierror as error:
        raise host.failure("connect", f"cannot resolve {host.hostname}: {error.strerror}") from None
    except (OSError, EOFError, paramiko.SSHException) as error:
        raise host.failure("connect", _describe(error)) from None
    if conn.transport is not None:
        conn.transport.set_keepalive(KEEPALIVE_SECONDS)
    return conn


def _describe(error: BaseException) -> str:
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


@contextlib.contextmanager
def stage(conn: BuildHost, host: Host, name: str) -> Iterator[None]:
    """Turn whatever fails inside into one line naming the host and `name`."""
    try:
        yield
    except Failure as failure:
        if str(failure).startswith("build-host: "):
            raise
        raise host.failure(name, _lost_or(conn, str(failure)), failure.code) from None
    except UnexpectedExit as error:
        raise host.failure(name, _lost_or(conn, _command_problem(error.result), error.result.exited)) from None
    except (EOFError, paramiko.SSHException) as error:  # the transport gave up under us
        raise host.failure(name, _lost_or(conn, _describe(error), -1)) from None
    except (OSError, tarfile.TarError) as error:
        raise host.failure(name, _lost_or(conn, _describe(error))) from None


def _lost_or(conn: BuildHost, reason: str, exited: int = 0) -> str:
    """A dropped connection explains everything that went wrong after it: say that instead."""
    if exited == -1 or not conn.is_connected:
        return "connection lost"
    return reason


def _command_problem(result: object) -> str:
    stdout, stderr = getattr(result, "stdout", ""), getattr(result, "stderr", "")
    if "No space left on device" in stdout + stderr:
        return "no space left on device"
    for text in (stderr, stdout):  # a program's complaint is on stderr, when it makes one
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if _ERROR.search(line)]
        if errors or lines:  # the first error is the cause; what follows is mostly its consequences
            return _short(errors[0] if errors else lines[-1])
    return f"exit status {getattr(result, 'exited', '?')}"


def _short(line: str, limit: int = 200) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass(frozen=True)
class Remote:
    """What we learn about the build host before building there."""

    home: str
    arch: arches.Arch
    jobs: int
    vng: str
    path: str
    ccache_dir: str

    @property
    def root(self) -> str:
        return f"{self.home}/{REMOTE_ROOT}"


def survey(conn: BuildHost, host: Host) -> Remote:
    probe = 'printf "%s\\n" "$HOME" "$(uname -m)" "$(nproc)" "$(command -v vng)" "$PATH" "${CCACHE_DIR:-}"'
    lines = conn.run(probe, hide=True, in_stream=False).stdout.split("\n")
    home, machine, jobs, vng, path, ccache_dir = (lines + [""] * 6)[:6]
    if not _PLAIN_PATH.fullmatch(home):
        raise host.failure("survey", f"$HOME is {home!r}: vngtasks needs a plain absolute path there")
    try:
        arch = arches.lookup(machine)
    except KeyError:
        raise host.failure("survey", f"unknown machine {machine!r} (uname -m)") from None
    return Remote(home, arch, int(jobs) if jobs.isdigit() else 1, vng, path, ccache_dir)


def build_packages(settings: Settings, distro: deps.Distro, host_arch: arches.Arch) -> list[str]:
    """What `invoke deps` would install, less what only booting needs."""
    boot_only = {settings.arch.qemu_package, *deps.BOOT_PACKAGES, *distro.names("virtiofsd", settings.arch)}
    boot_only |= set(settings.packages)
    boot_only -= set(deps.BUILD_PACKAGES)
    return [name for name in deps.wanted(settings, distro, host_arch, False) if name not in boot_only]


def check_toolchain(conn: BuildHost, host: Host, settings: Settings, remote: Remote) -> None:
    """Fail, listing what to install, unless the build host has the build packages and vng."""
    problems = []
    if conn.run("command -v dpkg-query", hide=True, warn=True, in_stream=False).ok:
        distro = deps.Distro.of(conn.run("cat /etc/os-release", hide=True, warn=True, in_stream=False).stdout)
        missing = deps.missing(conn, build_packages(settings, distro, remote.arch))
        if missing:
            problems.append(f"packages {' '.join(missing)} (`sudo apt-get install -y {shlex.join(missing)}` there)")
    else:
        log.warn(f"build-host: {host.label}: no dpkg there: not checking its build packages")
    if not remote.vng:
        problems.append("vng (`pip install virtme-ng` there, on the PATH of a non-interactive ssh session)")
    if problems:
        raise host.failure("deps", "missing on the build host: " + "; ".join(problems), MISSING_TOOL)


def local_repo(url: str) -> Path | None:
    """The local repository a kernel-url names, when the build host could not see it."""
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    if "://" in url or re.match(r"[^/]+:", url):  # a URL, or scp-like host:path
        return None
    path = Path(url).expanduser()
    return path.resolve() if path.exists() else None


def git_ssh_command(host: Host) -> str:
    """ssh for git push with the same policy as our connection (keys were checked on connect)."""
    argv = ["ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
    argv += ["-o", f"UserKnownHostsFile={known_hosts_file()}", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_SECONDS}"]
    for key in identity_files():  # ssh finds ~ in /etc/passwd, paramiko in $HOME: name the keys
        argv += ["-o", f"IdentityFile={key}"]
    return shlex.join(argv)


def identity_files() -> list[Path]:
    """The key files paramiko tries by default, those that exist."""
    ssh = Path.home() / ".ssh"
    return [ssh / name for name in ("id_rsa", "id_dsa", "id_ecdsa", "id_ed25519") if (ssh / name).is_file()]


def push(c: Context, conn: BuildHost, host: Host, repo: Path, sha: str, bare: str, ref: str) -> int:
    """Push commit `sha` of the local `repo` to `ref` of `bare` on the build host; bytes sent."""
    conn.run(f"test -d {shlex.quote(bare)} || git init -q --bare {shlex.quote(bare)}", hide=True, in_stream=False)
    user = f"{host.user}@" if host.user else ""
    url = f"ssh://{user}{host.hostname}:{host.port}{bare}"
    pushed = c.run(
        shlex.join(["git", "-C", str(repo), "push", "--progress", "--no-verify", url, f"+{sha}:{ref}"]),
        env={"GIT_SSH_COMMAND": git_ssh_command(host), "GIT_TERMINAL_PROMPT": "0"},
        hide=True,
        warn=True,
        in_stream=False,
    )
    if not pushed.ok:
        raise host.failure("push", _command_problem(pushed))
    written = _WRITTEN.search(pushed.stderr.replace("\r", "\n"))
    return round(float(written[1]) * _UNITS[written[2]]) if written else 0


def remote_plan(settings: Settings, sha: str, remote: Remote, work: str) -> build.Plan:
    return build.Plan(
        settings=settings,
        sha=sha,
        tree=f"{work}/linux",
        host_arch=remote.arch,
        jobs=remote.jobs,
        tools_dir=f"{work}/tools",
    )


def remote_env(plan: build.Plan, remote: Remote) -> dict[str, str]:
    """build_env on the build host: its ccache, and vng's directory first on its PATH."""
    env = build.build_env(plan, remote.home)
    if plan.settings.kernel_compile_cache:
        env["CCACHE_DIR"] = remote.ccache_dir or f"{remote.home}/.cache/ccache"
    env["PATH"] = f"{remote.vng.rsplit('/', 1)[0]}:{remote.path}"
    return env


def check_disk(conn: BuildHost, host: Host, path: str) -> None:
    free = conn.run(f"df -Pk {shlex.quote(path)} | awk 'NR==2 {{print $4}}'", hide=True, warn=True, in_stream=False)
    kib = free.stdout.strip()
    if kib.isdigit() and int(kib) * 1024 < LOW_DISK_BYTES:
        log.warn(f"build-host: {host.label}: only {cache.human_size(int(kib) * 1024)} free under {path}")


def hold_lock(conn: BuildHost, path: str, key: str) -> None:
    """Take flock(1) of `path` on the build host, waiting for its holder; held until `conn` closes."""
    transport = conn.client.get_transport()
    if transport is None or not transport.is_active():
        raise EOFError("connection lost")
    channel = transport.open_session()  # left open: closing the connection releases the lock
    channel.exec_command(shlex.join(["flock", path, "sh", "-c", "echo locked && exec cat >/dev/null"]))
    channel.settimeout(2)
    try:
        answer = channel.recv(16)
    except TimeoutError:
        log.info(f"lock: another build of {key} is running on the build host: waiting for it")
        channel.settimeout(None)
        answer = channel.recv(16)
    if not answer.startswith(b"locked"):
        raise OSError(f"flock {path} failed (exit status {channel.recv_exit_status()})")


def download(conn: BuildHost, tree: str, paths: list[str], dest: Path) -> int:
    """`paths` of the remote `tree` into `dest` as one tar stream over the SSH channel; bytes read."""
    transport = conn.client.get_transport()
    if transport is None or not transport.is_active():
        raise EOFError("connection lost")
    channel = transport.open_session()
    try:
        channel.exec_command(shlex.join(["tar", "-C", tree, "-cf", "-", "--files-from=-"]))
        channel.sendall(("\n".join(paths) + "\n").encode())
        channel.shutdown_write()
        stream = _Counted(channel.makefile("rb"))
        untar.unpack(stream, dest)
        while stream.read(65536):  # tar's trailing padding
            pass
        status = channel.recv_exit_status()
        if status != 0:
            problem = channel.makefile_stderr("rb").read().decode(errors="replace").strip().splitlines()
            raise OSError(f"tar exited with status {status}: {(problem or ['?'])[-1]}")
        return stream.count
    finally:
        channel.close()


class _Counted(io.RawIOBase):
    """A binary reader that counts what passes through."""

    def __init__(self, inner: io.BufferedIOBase | paramiko.ChannelFile) -> None:
        self.inner, self.count = inner, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.count += len(data)
        return data


def build_entry(
    c: Context, settings: Settings, kernels: cache.KernelCache, key: str, resolved: Resolved
) -> cache.Entry:
    """Build `resolved` on the build host and store the result as cache entry `key`."""
    try:
        host = Host.parse(settings.build_host)
    except InputError as error:
        raise Failure(str(error), BAD_INPUT) from None
    started = time.monotonic()
    conn = connect(host, settings.build_host_accept_new)
    try:
        return _build(c, conn, host, settings, kernels, key, resolved, started)
    except BaseException:
        conn.stop_build()
        raise
    finally:
        conn.close()


def _build(
    c: Context,
    conn: BuildHost,
    host: Host,
    s: Settings,
    kernels: cache.KernelCache,
    key: str,
    resolved: Resolved,
    started: float,
) -> cache.Entry:
    with stage(conn, host, "survey"):
        remote = survey(conn, host)
    with stage(conn, host, "deps"):
        check_toolchain(conn, host, s, remote)
    work = f"{remote.root}/remote-work/{key}"
    plan = remote_plan(s, resolved.sha, remote, work)
    with stage(conn, host, "prepare"):
        conn.run(shlex.join(["mkdir", "-p", work]), hide=True, in_stream=False)
        check_disk(conn, host, work)
    with stage(conn, host, "lock"):  # builds of this key from other machines take turns
        hold_lock(conn, f"{work}.lock", key)
    conn.pidfile = f"{work}/command.pid"
    pushed = 0
    repo = local_repo(s.kernel_url)
    with build.group(f"fetch {s.tag} ({plan.sha12}) on {host.label}"):
        if repo is not None:
            bare = f"{remote.root}/remote-git/{s.name}.git"
            with stage(conn, host, "push"):
                pushed = push(c, conn, host, repo, plan.sha, bare, f"refs/vngtasks/{s.name}-{s.arch.name}")
            log.info(f"push: {repo} to {host.label}: {cache.human_size(pushed)} sent")
            with stage(conn, host, "fetch"):
                build.fetch(conn, bare, plan.sha, plan.sha, plan.tree)
        else:
            with stage(conn, host, "fetch"):
                build.fetch(conn, s.kernel_url, s.tag, plan.sha, plan.tree)
    with stage(conn, host, "prepare"):
        build.write_tools(conn, plan)
    env = remote_env(plan, remote)
    with stage(conn, host, "build"):
        compiled = build.compile_measured(conn, plan, remote.vng, env)
    with stage(conn, host, "vmlinux-h"):
        has_header = build.write_vmlinux_h(conn, plan.tree) if s.vmlinux_h else False
    with stage(conn, host, "collect"):
        paths = build.kept_paths(conn, plan.tree, s.arch)
        metadata = {
            **build.describe(conn, plan, resolved, compiled, has_header),
            "built_on": host.label,
            "build_jobs": plan.jobs,
            "pushed_bytes": pushed,
        }
    with stage(conn, host, "download"):
        metadata["build_seconds"] = round(time.monotonic() - started, 1)
        with kernels.create(key, metadata) as temp:
            received = download(conn, plan.tree, paths, temp)
            build.prepare_modules(temp)
    entry = kernels.lookup(key)
    if entry is None:
        raise Failure(f"cache: {key} missing right after it was stored", FAILED)
    log.info(
        f"build: {key} built on {host.label} and stored ({cache.human_size(entry.size_bytes)},"
        f" {cache.human_size(received)} received) in {round(time.monotonic() - started, 1)} s"
    )
    conn.pidfile = ""
    with contextlib.suppress(Exception):  # the work tree was for this key only; ccache keeps the objects
        conn.run(shlex.join(["rm", "-rf", work]), hide=True, warn=True, in_stream=False)
    return entry
