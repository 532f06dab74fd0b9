"""ccache's remote storage (the `ccache-remote` setting): its URL checked, shown without its secrets, and
the ccache configuration file a build reads it from.

The URL may hold a password or a bearer token. It never goes on a command line or into an environment
that we pass over SSH (a build host's `ps` would show both to its other users): each build writes it
into a 0600 ccache configuration file in its tools directory and points CCACHE_CONFIGPATH there. That
file also keeps the building machine's own `ccache.conf` lines (CCACHE_CONFIGPATH replaces it), except
the ones about remote storage, which are ours.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from .log import printable
from .validate import Given, InputError

SCHEMES = ("http", "redis")  # what Debian 12's ccache 4.7 offers over a network (no TLS in either)
# ccache's attributes after `|` (its manual's "Remote storage backends"); bearer-token is a secret.
ATTRIBUTES = ("read-only", "connect-timeout", "operation-timeout", "keep-alive", "layout", "bearer-token")
_SECRET_ATTRIBUTES = ("bearer-token",)
_ATTRIBUTE_VALUE = re.compile(r"[A-Za-z0-9._~%+/=:-]*")
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]")
_USERINFO = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=:-]+")  # RFC 3986's, percent-encoded where it needs to be
_PATH = re.compile(r"(/[A-Za-z0-9._~%+-]*)*")
# The lines of a machine's ccache.conf that a build's own file leaves out: remote storage is ours.
_OURS = re.compile(r"\s*(remote_storage|secondary_storage|reshare|remote_only)\s*=")
CONFIG_FILE = "ccache.conf"  # in the build's tools directory, 0600
_MAX_URL = 2048


def parse(key: str, value: str, given: Given) -> str:
    """`ccache-remote`: "" or one http:// or redis:// URL for ccache's remote_storage, with ccache's attributes
    after `|`. Errors never quote the value (it may hold a password)."""
    if not value:
        return ""
    if len(value) > _MAX_URL or not value.isprintable() or any(ch.isspace() for ch in value):
        raise InputError(key, f"one URL of at most {_MAX_URL} printable characters, no spaces (its value is not shown)")
    base, *attributes = value.split("|")
    parts = urlsplit(base)
    if parts.scheme in ("https", "rediss"):
        raise InputError(key, "ccache has no TLS for remote storage: use http:// or redis:// on a network you trust "
                              "(a private network, or a tunnel to the server)")  # fmt: skip
    if parts.scheme not in SCHEMES:
        raise InputError(key, "expected http://HOST[:PORT]/PATH or redis://HOST[:PORT][/DB] (its value is not shown)")
    userinfo, _, hostport = parts.netloc.rpartition("@")
    host = hostport.rsplit(":", 1)[0] if not hostport.endswith("]") else hostport
    if not _HOST.fullmatch(host) or (userinfo and not _USERINFO.fullmatch(userinfo)):
        raise InputError(key, "the URL's host (or its user and password) is not valid (its value is not shown)")
    try:
        port_zero = parts.port == 0
    except ValueError:
        port_zero = True
    if port_zero:
        raise InputError(key, "the URL's port is not a number from 1 to 65535")
    if parts.query or parts.fragment or "?" in base or "#" in base or not _PATH.fullmatch(parts.path):
        raise InputError(key, "the URL's path: letters, digits and . _ ~ % + - between slashes; no ? or #")
    if parts.scheme == "redis" and parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise InputError(key, "a redis:// URL's path is a database number")
    for attribute in attributes:
        name, _, setting = attribute.partition("=")
        if name not in ATTRIBUTES or not _ATTRIBUTE_VALUE.fullmatch(setting):
            raise InputError(key, f"{printable(name)!r} after `|`: ccache's attributes here are {', '.join(ATTRIBUTES)}"
                                  " with a value of letters, digits and . _ ~ % + / = : -")  # fmt: skip
    return value


def shown(url: str) -> str:
    """The URL as logs, metadata and summaries show it: its user and password, and secret attributes, as ***."""
    if not url:
        return ""
    base, *attributes = url.split("|")
    parts = urlsplit(base)
    netloc = parts.netloc if "@" not in parts.netloc else "***@" + parts.netloc.rpartition("@")[2]
    kept = [_shown_attribute(attribute) for attribute in attributes]
    return "|".join([parts._replace(netloc=netloc).geturl(), *kept])


def _shown_attribute(attribute: str) -> str:
    name, equals, _ = attribute.partition("=")
    return f"{name}=***" if equals and name in _SECRET_ATTRIBUTES else attribute


def secrets(url: str) -> list[str]:
    """The parts of the URL that are secret (its user-and-password part, secret attributes' values): what
    GitHub Actions is told to mask."""
    if not url:
        return []
    base, *attributes = url.split("|")
    netloc = urlsplit(base).netloc
    found = [netloc.rpartition("@")[0]] if "@" in netloc else []
    for attribute in attributes:
        name, _, value = attribute.partition("=")
        if name in _SECRET_ATTRIBUTES and value:
            found.append(value)
    return [secret for secret in found if secret]


def config_text(url: str, reshare: bool, own: str) -> str:
    """A build's ccache configuration file: the machine's own `ccache.conf` (`own`) less its remote storage
    lines, then the remote storage."""
    kept = [line for line in own.splitlines() if not _OURS.match(line)]
    return "\n".join([*kept, f"remote_storage = {url}", f"reshare = {'true' if reshare else 'false'}", ""])
