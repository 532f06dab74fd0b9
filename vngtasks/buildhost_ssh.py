"""The SSH connection to a build host: its address, its host key checked, commands that die with it.

Host keys are checked strictly, for paramiko and for git's ssh alike: a key not in
`~/.ssh/known_hosts` is refused unless `build-host-accept-new` is true (then it is recorded,
like OpenSSH's `accept-new`); a changed key is always refused. `~/.ssh/config` is not read.
A command run without stdin runs under a guard that kills its whole session when our channel
goes away. Every failure is one line: `build-host: HOST:PORT: STAGE: REASON` (`stage`).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import re
import shlex
import socket
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
from fabric import Config, Connection
from invoke.exceptions import UnexpectedExit

from . import log
from .errors import FAILED, Failure, no_space
from .validate import InputError

CONNECT_TIMEOUT_SECONDS = 30
KEEPALIVE_SECONDS = 15
_HOST = re.compile(r"(?:(?P<user>[^@]+)@)?(?P<hostname>[^:@]+)(?::(?P<port>[0-9]+))?")
_ERROR = re.compile(r"(?i)\b(error|fatal|denied|failed|refused|cannot|could not)\b")


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
class SshAddress:
    """`[user@]host[:port]`, as the `build-host` setting gives it."""

    user: str | None
    hostname: str
    port: int

    @classmethod
    def parse(cls, text: str) -> SshAddress:
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


def connect(host: SshAddress, accept_new: bool) -> BuildHost:
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
def stage(conn: BuildHost, host: SshAddress, name: str) -> Iterator[None]:
    """Turn whatever fails inside into one line naming the host and `name`."""
    try:
        yield
    except Failure as failure:
        if str(failure).startswith("build-host: "):
            raise
        raise host.failure(name, _lost_or(conn, str(failure)), failure.code) from None
    except UnexpectedExit as error:
        raise host.failure(name, _lost_or(conn, command_problem(error.result), error.result.exited)) from None
    except (EOFError, paramiko.SSHException) as error:  # the transport gave up under us
        raise host.failure(name, _lost_or(conn, _describe(error), -1)) from None
    except (OSError, tarfile.TarError) as error:
        raise host.failure(name, _lost_or(conn, _describe(error))) from None


def _lost_or(conn: BuildHost, reason: str, exited: int = 0) -> str:
    """A dropped connection explains everything that went wrong after it: say that instead."""
    if exited == -1 or not conn.is_connected:
        return "connection lost"
    return reason


def command_problem(result: object) -> str:
    stdout, stderr = getattr(result, "stdout", ""), getattr(result, "stderr", "")
    if no_space(stdout, stderr):
        return "no space left on device"
    for text in (stderr, stdout):  # a program's complaint is on stderr, when it makes one
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if _ERROR.search(line)]
        if errors or lines:  # the first error is the cause; what follows is mostly its consequences
            return _short(errors[0] if errors else lines[-1])
    return f"exit status {getattr(result, 'exited', '?')}"


def _short(line: str, limit: int = 200) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."


def git_ssh_command(host: SshAddress) -> str:
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
