"""Where `build-host` leads, as OpenSSH itself resolves it: `ssh -G` reads `~/.ssh/config` (and what it
Includes, and its Match blocks) and prints every option as it would use them, connecting nowhere.

`build-host` takes what `ssh` takes: an alias of that file, or `[user@]host[:port]`. Of the result vngtasks uses
HostName, Port, User, IdentityFile (and IdentitiesOnly), ProxyJump (each hop resolved the same way, each
host key checked), ConnectTimeout and HostKeyAlias; ProxyCommand runs a shell command from the config, which
vngtasks does not control: refused unless `build-host-proxy-command` is true. The file is `~/.ssh/config`
of $HOME (as known_hosts is); without `ssh` installed, or without the file, `build-host` is read as
`[user@]host[:port]` alone. Whatever the config says is held to plain characters before it goes anywhere
(a config file of git's ssh, paramiko's connection).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import BAD_INPUT, Failure
from .validate import ssh_destination

SSH_G_SECONDS = 20
# What `ssh -G` prints for IdentityFile when the config sets none: then the agent and ~/.ssh/id_* are tried.
DEFAULT_IDENTITIES = (
    "~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ecdsa_sk", "~/.ssh/id_ed25519", "~/.ssh/id_ed25519_sk",
    "~/.ssh/id_xmss", "~/.ssh/id_dsa",
)  # fmt: skip
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # a host name, an alias, a user
_PATH = re.compile(r"/[A-Za-z0-9._/+@%:~-]*")


@dataclass(frozen=True)
class Hop:
    """One SSH host on the way, resolved: where to connect, under which name known_hosts has its key, which
    keys to offer."""

    user: str | None
    hostname: str
    port: int
    key_alias: str | None = None  # HostKeyAlias
    identities: tuple[Path, ...] = ()  # IdentityFile set in the config; empty: the agent and ~/.ssh/id_*
    identities_only: bool = False
    connect_timeout: int | None = None
    proxy_command: str | None = None  # only when build-host-proxy-command allows it

    @property
    def label(self) -> str:
        return f"{self.hostname}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts names this host's key, as OpenSSH looks it up."""
        if self.key_alias:
            return self.key_alias
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def describe(self) -> str:
        """user@host:port, and the key, name and proxy it uses, for `invoke settings` and a dry run."""
        said = f"{self.user + '@' if self.user else ''}{self.label}"
        said += f" key {', '.join(map(str, self.identities))}" if self.identities else " keys: the agent, ~/.ssh/id_*"
        said += " only" if self.identities_only and self.identities else ""
        said += f" (known_hosts: {self.key_alias})" if self.key_alias else ""
        return said + (f" proxy command {self.proxy_command}" if self.proxy_command else "")


@dataclass(frozen=True)
class Route:
    """The build host, and the jump hosts before it (the first is connected to first)."""

    given: str  # build-host as given
    target: Hop
    jumps: tuple[Hop, ...] = ()

    def describe(self) -> str:
        via = "".join(f" via {hop.describe()}" for hop in self.jumps)
        return f"{self.target.describe()}{via}"


def parse_spec(text: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` or an alias: (user, host, port); InputError when it is neither."""
    return ssh_destination("build_host", text)


def resolve(given: str, allow_proxy_command: bool = False, config: Path | None = None) -> Route:
    """The route `build-host` names, as `ssh -G` resolves it with `config` (default ~/.ssh/config)."""
    config = config or Path.home() / ".ssh" / "config"
    options = _ssh_g(given, config) if _reads_config(config) else {}
    target = _hop(given, options, f"build-host {given}", config, allow_proxy_command)
    jumps = []
    for jump in _first(options, "proxyjump", "none").split(","):
        if jump != "none":
            hop_options = _ssh_g(jump, config)
            where = f"jump host {jump}"
            if _first(hop_options, "proxyjump", "none") != "none":
                raise Failure(f"{where}: its own ProxyJump is not followed: list every hop in build-host's ProxyJump",
                              BAD_INPUT)  # fmt: skip
            jumps.append(_hop(jump, hop_options, where, config, allow_proxy_command=False))
    return Route(given, target, tuple(jumps))


def _hop(given: str, options: dict[str, list[str]], where: str, config: Path, allow_proxy_command: bool) -> Hop:
    """One host, as `ssh -G` resolved `given` (`options`; none without a config: `given` as it is)."""
    user, host, port = parse_spec(given)
    if not options:
        return Hop(user, host, port or 22)
    proxy_command = _first(options, "proxycommand", "none")
    if proxy_command != "none" and _first(options, "proxyjump", "none") == "none" and not allow_proxy_command:
        raise Failure(
            f"{where}: ProxyCommand in {config} runs a shell command vngtasks does not control: refused"
            " (set build-host-proxy-command true to allow it)",
            BAD_INPUT,
        )
    hostname = _plain(where, "HostName", _first(options, "hostname", host))
    port = int(_first(options, "port", str(port or 22)))
    user = _plain(where, "User", _first(options, "user", user or "")) or None
    identities = options.get("identityfile", [])
    alias = _first(options, "hostkeyalias", "none")
    timeout = _first(options, "connecttimeout", "none")
    return Hop(
        user=user,
        hostname=hostname,
        port=port,
        key_alias=None if alias == "none" else _plain(where, "HostKeyAlias", alias),
        identities=() if tuple(identities) == DEFAULT_IDENTITIES else tuple(_identity(where, i) for i in identities),
        identities_only=_first(options, "identitiesonly", "no") == "yes",
        connect_timeout=int(timeout) if timeout.isdigit() else None,
        proxy_command=None if proxy_command == "none" else _expanded(proxy_command, hostname, port, user),
    )


def _reads_config(config: Path) -> bool:
    return config.is_file() and shutil.which("ssh") is not None


def _ssh_g(given: str, config: Path) -> dict[str, list[str]]:
    """`ssh -G` of `given` with `config`: each option (lower case) and its values, in order."""
    user, host, port = parse_spec(given)
    argv = ["ssh", "-F", str(config), "-G", *(["-l", user] if user else []), *(["-p", str(port)] if port else [])]
    try:
        done = subprocess.run([*argv, "--", host], capture_output=True, text=True, timeout=SSH_G_SECONDS,
                              stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise Failure(f"build-host {given}: `ssh -G` did not answer within {SSH_G_SECONDS} s", BAD_INPUT) from None
    if done.returncode != 0:
        problem = [line for line in done.stderr.splitlines() if line.strip()][-1:] or [f"exit {done.returncode}"]
        raise Failure(f"build-host {given}: {config}: {problem[0]}", BAD_INPUT)
    options: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        options.setdefault(key.lower(), []).append(value.strip())
    return options


def _first(options: dict[str, list[str]], key: str, default: str) -> str:
    return (options.get(key) or [default])[0]


def _plain(where: str, option: str, value: str) -> str:
    if value and not _NAME.fullmatch(value):
        raise Failure(f"{where}: {option} {value!r}: only letters, digits and . _ - are used", BAD_INPUT)
    return value


def _identity(where: str, value: str) -> Path:
    path = Path(value).expanduser()  # ~ of $HOME, as known_hosts' (ssh itself takes /etc/passwd's)
    if not _PATH.fullmatch(str(path)):
        raise Failure(f"{where}: IdentityFile {value!r}: not a plain path", BAD_INPUT)
    return path


def _expanded(command: str, host: str, port: int, user: str | None) -> str:
    """ProxyCommand's %h, %p, %r and %% as ssh expands them."""
    tokens = {"h": host, "p": str(port), "r": user or "", "%": "%"}
    return re.sub(r"%(.)", lambda found: tokens.get(found[1], found[0]), command)
