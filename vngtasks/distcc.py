"""distcc-hosts: a build's compilations sent to helper machines by distcc, under ccache (CCACHE_PREFIX=distcc).

ccache looks every object up first (its local store, then ccache-remote); only a miss is compiled, and distcc
sends that compilation, preprocessed on the building machine, to a helper with a free slot. Make's `-j` is the
helpers' slots added up (at least the building machine's cores). Linking, BTF (pahole), objtool and the rest of
the build stay on the building machine.

SSH (`[USER]@HOST[/SLOTS][,lzo]`) is the default: the building machine's own OpenSSH starts `distccd --inetd` on
the helper for each compilation, as that user, through the wrapper `ssh_wrapper` gives, which reads the config
`ssh_config` gives ($HOME's ~/.ssh/config, known_hosts and keys; and the agent): only a host key in known_hosts
(never a prompt, never a key recorded), no ProxyCommand or ProxyJump, no password prompt, no forwarding.
TCP (`HOST[:PORT][/SLOTS][,lzo]`) only with distcc-tcp true, and a warning: a distccd on TCP runs compilers for
whoever reaches its port. `localhost[/SLOTS]` compiles here.

A compilation that fails on a helper (a helper gone, no distccd there, a helper dying mid-compilation) is compiled
again, on another helper or here (distcc's fallback); the build's distcc log (DISTCC_LOG, in its tools directory)
is read afterwards, bounded, and those failures become one warning (`warn_failures`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from . import log
from .errors import BAD_INPUT, Failure
from .validate import STRICT_PATH, Given, InputError

MOST_HELPERS = 32
MOST_SLOTS = 64  # a helper's
DEFAULT_SLOTS = {"ssh": 4, "tcp": 4, "local": 2}  # distcc's own defaults, written out so `-j` matches them

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = rf"{_LABEL}(?:\.{_LABEL})*"
_SLOTS = r"(?:/(?P<slots>[1-9][0-9]?))?"
_OPTIONS = r"(?P<lzo>,lzo)?"
_SSH = re.compile(rf"(?P<user>[a-z_][a-z0-9_.-]{{0,31}})?@(?P<host>{_HOSTNAME}){_SLOTS}{_OPTIONS}")
_TCP = re.compile(rf"(?P<host>{_HOSTNAME})(?::(?P<port>[1-9][0-9]{{0,4}}))?{_SLOTS}{_OPTIONS}")
_LOCAL = re.compile(rf"localhost{_SLOTS}")
EXPECTED = "[USER]@HOST[/SLOTS][,lzo] (SSH), HOST[:PORT][/SLOTS][,lzo] (TCP, with distcc-tcp) or localhost[/SLOTS]"

# The ssh distcc runs (DISTCC_SSH): the building machine's OpenSSH, strict. Fixed words only: distcc adds
# `[-l USER] HOST distccd --inetd ...`, each an argument of its own.
SSH_OPTIONS = (
    "BatchMode=yes", "StrictHostKeyChecking=yes", "UpdateHostKeys=no", "ProxyCommand=none", "ProxyJump=none",
    "ForwardAgent=no", "ForwardX11=no", "ClearAllForwardings=yes", "PermitLocalCommand=no", "ControlMaster=no",
    "ControlPath=none", "ConnectTimeout=10",
)  # fmt: skip


@dataclass(frozen=True)
class Helper:
    """One entry of distcc-hosts: how distcc reaches it, and its slots (written into `spec`)."""

    kind: str  # "ssh", "tcp" or "local"
    host: str
    slots: int
    spec: str  # as DISTCC_HOSTS takes it, slots explicit

    def __str__(self) -> str:
        return self.spec


def parse(key: str, value: str, given: Given) -> tuple[Helper, ...]:
    """distcc's host list (space-separated), SSH, TCP or localhost entries; `:COMMAND` (a command the helper's
    shell would run) and pump mode are refused. TCP needs distcc-tcp true (checked with the other settings)."""
    helpers = []
    for entry in value.split():
        helpers.append(_helper(key, entry))
    if len(helpers) > MOST_HELPERS:
        raise InputError(key, f"at most {MOST_HELPERS} hosts")
    if helpers and all(helper.kind == "local" for helper in helpers):
        raise InputError(key, "names no helper: only localhost")
    hosts = [(helper.kind, helper.host) for helper in helpers]
    if len(set(hosts)) != len(hosts):
        raise InputError(key, "names a host twice")
    return tuple(helpers)


def _helper(key: str, entry: str) -> Helper:
    if found := _LOCAL.fullmatch(entry):
        kind = "local"
    elif found := _SSH.fullmatch(entry):
        kind = "ssh"
    elif (found := _TCP.fullmatch(entry)) and not (found["port"] and int(found["port"]) > 65535):
        kind = "tcp"
    else:
        raise InputError(key, f"{entry!r} is not valid: expected {EXPECTED}")
    slots = int(found["slots"]) if found["slots"] else DEFAULT_SLOTS[kind]
    if slots > MOST_SLOTS:
        raise InputError(key, f"{entry!r}: at most {MOST_SLOTS} slots")
    if kind == "local":
        return Helper(kind, "localhost", slots, f"localhost/{slots}")
    where = f"{found['user'] or ''}@{found['host']}" if kind == "ssh" else found["host"]
    port = f":{found['port']}" if kind == "tcp" and found["port"] else ""
    return Helper(kind, found["host"], slots, f"{where}{port}/{slots}{found['lzo'] or ''}")


def jobs(helpers: tuple[Helper, ...], cores: int) -> int:
    """Make's -j: every helper's slots, at least the building machine's cores."""
    return max(cores, sum(helper.slots for helper in helpers)) if helpers else cores


def warn_tcp(helpers: tuple[Helper, ...]) -> None:
    tcp = [helper.spec for helper in helpers if helper.kind == "tcp"]
    if tcp:
        log.warn(f"distcc-hosts: {', '.join(tcp)} over plain TCP (distcc-tcp true): a distccd there runs compilers "
                 "for whoever reaches its port, and sources and objects cross the network unencrypted")  # fmt: skip


def environment(helpers: tuple[Helper, ...], tools_dir: str) -> dict[str, str]:
    """Make's environment for a build with helpers: ccache hands its misses to distcc, which reads the hosts, its
    state and its log in the build's tools directory, and reaches SSH helpers through the strict wrapper."""
    return {
        "CCACHE_PREFIX": "distcc",
        "DISTCC_HOSTS": " ".join(helper.spec for helper in helpers),
        "DISTCC_SSH": f"{tools_dir}/{SSH_WRAPPER}",
        "DISTCC_DIR": f"{tools_dir}/{STATE_DIR}",
        "DISTCC_LOG": f"{tools_dir}/{LOG_FILE}",
        "DISTCC_FALLBACK": "1",
        SSH_CONFIG_VARIABLE: f"{tools_dir}/{SSH_CONFIG}",
    }


SSH_WRAPPER = "distcc-ssh"
SSH_CONFIG = "distcc-ssh.config"
SSH_CONFIG_VARIABLE = "VNGTASKS_DISTCC_SSH_CONFIG"  # the wrapper's -F: a path in the environment, never in a script
STATE_DIR = "distcc"
LOG_FILE = "distcc.log"
IDENTITIES = ("id_rsa", "id_ecdsa", "id_ed25519")  # ssh's default keys, as paramiko tries them for the build host


def ssh_wrapper() -> str:
    """The program DISTCC_SSH names: OpenSSH with our config file and SSH_OPTIONS, distcc's arguments passed on
    untouched, its complaints into distcc's log (not between make's lines)."""
    options = " ".join(f"-o {option}" for option in SSH_OPTIONS)
    return f'#!/bin/sh\nexec ssh -F "${SSH_CONFIG_VARIABLE}" {options} "$@" 2>>"$DISTCC_LOG"\n'


def ssh_config(home: str, identities: list[str]) -> str:
    """The config the wrapper's ssh reads: the building machine's ~/.ssh/config, then its known_hosts and keys, `~`
    being $HOME as everywhere in vngtasks (ssh's own ~ is /etc/passwd's). `home` and `identities` are plain paths
    (nothing ssh's config parser reads more into), else a Failure."""
    for path in (home, *identities):
        if not STRICT_PATH.fullmatch(path):
            raise Failure(f"distcc-hosts: {log.printable(path)!r}: ssh would read more into this path: only "
                          "letters, digits and . _ / + - are used", BAD_INPUT)  # fmt: skip
    lines = [f"Include {home}/.ssh/config", "Host *", f"  UserKnownHostsFile {home}/.ssh/known_hosts"]
    return "\n".join([*lines, *(f"  IdentityFile {path}" for path in identities)]) + "\n"


@dataclass(frozen=True)
class Outcome:
    """What distcc's log says of a build: compilations per host (as DISTCC_HOSTS names it, or localhost), how many
    failed on a helper (each then compiled again: on another helper or here), and the first error about one."""

    compiled: dict[str, int]
    failed: int
    first_error: str


ANSWER_BYTES = 4 << 20  # of each answer of outcome_commands read back (a few bytes per compilation)
# A compilation that failed on a helper, in distcc's words (it then tries another helper, or compiles here); the
# kernel's compiler probes fail "on localhost" on purpose (a helper's spec has slots). And ssh's own complaints.
_HELPER_FAILED = r"failed to distribute|server provided no answer|ERROR: compile .* on [^ ]+/[0-9]+[^ ]* failed"
_PID = re.compile(r"distcc\[([0-9]{1,10})\] ")


# Commands on the building machine that read its distcc log (large: some lines per compilation), each answer small.
def outcome_commands(distcc_log: str) -> dict[str, list[str]]:
    return {
        "compiled": ["sed", "-n", "s/^distcc\\[[0-9]*\\] compile .* on \\([^ ]*\\) completed ok$/\\1/p", distcc_log],
        "failed": ["grep", "-E", f"^distcc\\[[0-9]+\\] .*({_HELPER_FAILED})|^ssh: ", distcc_log],
    }


def outcome(answers: Mapping[str, str], helpers: tuple[Helper, ...]) -> Outcome:
    """Outcome from the answers of outcome_commands (hostile text: only the hosts of the list are counted; a failed
    compilation is one distcc process, however many lines it logged)."""
    known = {helper.spec: 0 for helper in helpers} | {"localhost": 0}
    for line in answers.get("compiled", "").splitlines()[: 1 << 20]:
        if line in known:
            known[line] += 1
    lines = answers.get("failed", "").splitlines()[: 1 << 20]
    failed = {found[1] for line in lines if (found := _PID.match(line))}
    first = next((line for line in lines if line.startswith("ssh: ")), lines[0] if lines else "")
    return Outcome(known, len(failed), log.printable(_PID.sub("", first, count=1).strip())[:200])


def warn_failures(found: Outcome, compilations: int) -> None:
    """One warning for all compilations that failed on a helper."""
    if found.failed:
        why = f" (first: {found.first_error})" if found.first_error else ""
        log.warn(f"distcc-hosts: {found.failed} of {compilations} compilations failed on a helper and were compiled "
                 f"again, on another helper or on the building machine{why}")  # fmt: skip
