"""The SSH connection to a build host: the route sshconfig.py resolved (through its jump hosts), each host's
key checked, commands that die with it.

Host keys are checked strictly, on every hop, for paramiko and for git's ssh alike: a key not in
`~/.ssh/known_hosts` (under the name OpenSSH looks it up by: HostKeyAlias, or `[host]:port`) is refused
unless `build-host-accept-new` is true (then it is recorded, like OpenSSH's `accept-new`); a changed key is
always refused. git's ssh gets a config file of its own, written from the same route, so both reach the
host one way. A command run without stdin runs under a guard that kills its whole session when our channel
goes away. Every failure is one line: `build-host: HOST:PORT: STAGE: REASON` (`stage`).
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
from fabric import Config, Connection
from invoke.exceptions import UnexpectedExit

from . import log
from .errors import BAD_INPUT, FAILED, Failure, Unreachable, no_space
from .sshconfig import Hop, Route

CONNECT_TIMEOUT_SECONDS = 30
KEEPALIVE_SECONDS = 15
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


def failure(host: Hop, stage: str, reason: str, code: int = FAILED, jump: bool = False) -> Failure:
    """The one line of a failure at `host` (a jump host is named so)."""
    return Failure(f"build-host: {host.label}{' (jump host)' if jump else ''}: {stage}: {reason}", code)


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
class Credentials:
    """What CI hands over where no ~/.ssh exists (build-host-key, build-host-known-hosts): a private key's
    text and known_hosts lines, used besides ~/.ssh's, for every hop."""

    key: str = ""
    known_hosts: str = ""

    def pkey(self) -> paramiko.PKey | None:
        """The key, as paramiko loads it (its type read from its text)."""
        if not self.key:
            return None
        for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            with contextlib.suppress(paramiko.SSHException, ValueError):
                return kind.from_private_key(io.StringIO(self.key))
        raise Failure("build-host-key: paramiko reads no ed25519, ECDSA or RSA private key in it", BAD_INPUT)


NO_CREDENTIALS = Credentials()


@dataclass(frozen=True)
class KnownHosts:
    """known_hosts as OpenSSH reads it: plain entries, and the keys its `@revoked` lines name.
    `@cert-authority` lines are skipped with a notice (paramiko checks no certificates)."""

    entries: tuple[paramiko.hostkeys.HostKeyEntry, ...]
    revoked: tuple[bytes, ...]  # the revoked keys, as their wire bytes

    @classmethod
    def read(cls, path: Path, more: str = "") -> KnownHosts:
        """`path`'s lines, and `more` (build-host-known-hosts) after them."""
        entries, revoked = [], []
        text = (path.read_text(errors="replace") if path.exists() else "") + "\n" + more
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

    def keys_of(self, name: str) -> dict[str, paramiko.PKey]:
        """The keys known_hosts has for `name` (hashed names too), none that it revokes: key type, key."""
        keys = paramiko.HostKeys()
        for entry in self.entries:
            if entry.key.asbytes() not in self.revoked:
                for hostname in entry.hostnames:
                    keys.add(hostname, entry.key.get_name(), entry.key)
        return dict(keys.lookup(name) or {})


class _Refuse(paramiko.MissingHostKeyPolicy):
    """paramiko's RejectPolicy, keeping the key so the message can show its fingerprint."""

    def __init__(self, known: KnownHosts) -> None:
        self.known = known

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.known.refuse_revoked(key)
        raise UnknownHostKey(key)


class _AcceptNew(paramiko.MissingHostKeyPolicy):
    """OpenSSH's `accept-new`: a host with no key on record gets this one, appended to known_hosts under the
    name OpenSSH looks it up by (never a key that known_hosts revokes)."""

    def __init__(self, path: Path, known: KnownHosts, name: str) -> None:
        self.path, self.known, self.name = path, known, name

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.known.refuse_revoked(key)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(paramiko.hostkeys.HostKeyEntry([self.name], key).to_line())
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.info(f"host-key: {self.name}: new key {fingerprint(key)} accepted and recorded in {self.path}")


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

    def close(self) -> None:
        """This connection, then the jump hosts' it went through."""
        super().close()
        if isinstance(self.gateway, Connection):
            self.gateway.close()

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


def connect(route: Route, accept_new: bool, credentials: Credentials = NO_CREDENTIALS) -> BuildHost:
    """An open connection to the build host, through its jump hosts, each hop's key matched in known_hosts
    (or new and accepted)."""
    path = known_hosts_file()
    try:
        known = KnownHosts.read(path, credentials.known_hosts)
    except OSError as error:
        raise failure(route.target, "host-key", f"cannot read {path}: {error.strerror}") from None
    pkey = credentials.pkey()
    gateway: BuildHost | None = None
    try:
        for jump in route.jumps:
            gateway = _open(jump, gateway, known, path, accept_new, pkey, jump=True)
        return _open(route.target, gateway, known, path, accept_new, pkey)
    except BaseException as error:
        if gateway is not None:
            gateway.close()
        if isinstance(error, Failure):
            raise Unreachable(str(error)) from None
        raise


def _open(host: Hop, gateway: BuildHost | None, known: KnownHosts, path: Path, accept_new: bool,
          pkey: paramiko.PKey | None = None, jump: bool = False) -> BuildHost:  # fmt: skip
    """One hop's connection, opened (through `gateway`, the hop before it), its key checked."""
    timeout = host.connect_timeout or CONNECT_TIMEOUT_SECONDS
    config = Config(lazy=True, overrides={"load_ssh_configs": False, "timeouts": {"connect": timeout}})
    keys: dict[str, object] = {"key_filename": [str(key) for key in host.identities]} if host.identities else {}
    if host.identities_only and host.identities:
        keys |= {"look_for_keys": False, "allow_agent": False}
    if pkey is not None:
        keys["pkey"] = pkey
    proxy = shlex.join(["sh", "-c", host.proxy_command]) if host.proxy_command else None
    conn = BuildHost(host.hostname, user=host.user, port=host.port, config=config, gateway=gateway or proxy,
                     connect_kwargs=keys)  # fmt: skip
    # paramiko looks a key up under `host` or `[host]:port`; known_hosts has it under OpenSSH's name for it.
    asked = host.hostname if host.port == 22 else f"[{host.hostname}]:{host.port}"
    for key_type, key in (known.keys_of(host.known_hosts_name) or {}).items():
        conn.client.get_host_keys().add(asked, key_type, key)
    policy = _AcceptNew(path, known, host.known_hosts_name) if accept_new else _Refuse(known)
    conn.client.set_missing_host_key_policy(policy)
    try:
        conn.open()
    except RevokedHostKey as error:
        reason = f"host key {fingerprint(error.key)} is REVOKED in {path}: refused"
        raise failure(host, "host-key", reason, jump=jump) from None
    except UnknownHostKey as error:
        scan = shlex.join(["ssh-keyscan", "-p", str(host.port), "-t", error.key.get_name(), host.hostname])
        add = f"`{scan} >> ~/.ssh/known_hosts`" if not host.key_alias else f"a line for {host.key_alias} (HostKeyAlias)"
        raise failure(host, "host-key", f"unknown host key {fingerprint(error.key)}: refused. If that is the host's"
                      f" key, trust it with {add} or set build-host-accept-new true", jump=jump) from None  # fmt: skip
    except paramiko.BadHostKeyException as error:
        raise failure(
            host,
            "host-key",
            f"host key CHANGED: offered {fingerprint(error.key)}, known_hosts has {fingerprint(error.expected_key)}:"
            f" refused (if the change is expected: `ssh-keygen -R {shlex.quote(host.known_hosts_name)}`)",
            jump=jump,
        ) from None
    except paramiko.AuthenticationException as error:
        tried = ", ".join(map(str, host.identities)) if host.identities else "the SSH agent and ~/.ssh/id_* keys"
        raise failure(host, "auth", f"{conn.user}: {error} (tried {tried})", jump=jump) from None
    except paramiko.ssh_exception.NoValidConnectionsError as error:
        codes = {getattr(e, "errno", None) for e in error.errors.values()}
        reason = "connection refused" if codes == {errno.ECONNREFUSED} else str(error)
        raise failure(host, "connect", reason, jump=jump) from None
    except TimeoutError:
        raise failure(host, "connect", f"no answer within {timeout} s", jump=jump) from None
    except socket.gaierror as error:
        raise failure(host, "connect", f"cannot resolve {host.hostname}: {error.strerror}", jump=jump) from None
    except (OSError, EOFError, paramiko.SSHException) as error:
        raise failure(host, "connect", _describe(error), jump=jump) from None
    if conn.transport is not None:
        conn.transport.set_keepalive(KEEPALIVE_SECONDS)
    return conn


def _describe(error: BaseException) -> str:
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


@contextlib.contextmanager
def stage(conn: BuildHost, host: Hop, name: str) -> Iterator[None]:
    """Turn whatever fails inside into one line naming the host and `name`."""
    try:
        yield
    except Failure as failed:
        if str(failed).startswith("build-host: "):
            raise
        raise _lost_or(conn, host, name, str(failed), code=failed.code) from None
    except UnexpectedExit as error:
        raise _lost_or(conn, host, name, command_problem(error.result), error.result.exited) from None
    except (EOFError, paramiko.SSHException) as error:  # the transport gave up under us
        raise _lost_or(conn, host, name, _describe(error), -1) from None
    except (OSError, tarfile.TarError) as error:
        raise _lost_or(conn, host, name, _describe(error)) from None


def _lost_or(conn: BuildHost, host: Hop, stage: str, reason: str, exited: int = 0, code: int = FAILED) -> Failure:
    """The stage's failure; a dropped connection explains everything that went wrong after it: Unreachable, saying
    that instead."""
    if exited == -1 or not conn.is_connected:
        return Unreachable(str(failure(host, stage, "connection lost")))
    return failure(host, stage, reason, code)


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


GIT_HOST = "vngtasks-build-host"  # the build host's name in the config git's ssh gets


def git_ssh_config(route: Route, known_hosts: list[Path] | None = None, key: Path | None = None) -> str:
    """A config of its own for git's ssh (`ssh -F FILE`), written from the route paramiko took: every hop with
    its address, keys (and `key`, build-host-key's file) and key name, strict host keys and known_hosts of $HOME
    (ssh's own ~ is /etc/passwd's) or `known_hosts`, no prompt; the build host is GIT_HOST. Its values are
    plain (sshconfig.py), a ProxyCommand was allowed."""
    names = [f"vngtasks-jump-{number}" for number in range(len(route.jumps))]
    known = " ".join(str(path) for path in known_hosts or [known_hosts_file()])
    sections = []
    for hop, name, before in zip([*route.jumps, route.target], [*names, GIT_HOST], [None, *names], strict=True):
        lines = [f"Host {name}", f"  HostName {hop.hostname}", f"  Port {hop.port}"]
        lines += [f"  HostKeyAlias {hop.known_hosts_name}", f"  UserKnownHostsFile {known}"]
        lines += ["  StrictHostKeyChecking yes", "  BatchMode yes"]
        lines += [f"  ConnectTimeout {hop.connect_timeout or CONNECT_TIMEOUT_SECONDS}"]
        lines += [f"  User {hop.user}"] if hop.user else []
        lines += [f"  IdentityFile {path}" for path in [*([key] if key else []), *(hop.identities or identity_files())]]
        lines += ["  IdentitiesOnly yes"] if hop.identities_only else []
        lines += [f"  ProxyJump {before}"] if before else []
        lines += [f"  ProxyCommand {hop.proxy_command}"] if hop.proxy_command and not before else []
        sections.append("\n".join(lines))
    return "\n".join(sections) + "\n"


def identity_files() -> list[Path]:
    """The key files paramiko tries by default, those that exist."""
    ssh = Path.home() / ".ssh"
    return [ssh / name for name in ("id_rsa", "id_dsa", "id_ecdsa", "id_ed25519") if (ssh / name).is_file()]
