"""Turning `tag` into the exact commit to build: a 40-hex SHA, a propagated SHA, or the remote's refs.

Matching is exact: for tag T, `refs/tags/T^{}` (an annotated tag peeled to its commit), else
`refs/tags/T`, else `refs/heads/T`; refs that merely end in T never match. Jobs of one workflow
run share the answer through `<workspace>/.vng-sha-{name}/resolved.json`, read with no network at all.
When the remote cannot be reached, the newest cached kernel of the same name and arch stands in.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from invoke import Context
from invoke.exceptions import CommandTimedOut

from . import log
from .cache import KernelCache, kernels_root
from .errors import BAD_INPUT, FAILED, Failure
from .files import write_atomically
from .kconfig import key_tag
from .settings import Settings

ATTEMPTS = 3
RETRY_DELAY_SECONDS = 1.0  # backoff: 1 s, then 2 s
ATTEMPT_TIMEOUT_SECONDS = 60

_SHA = re.compile(r"[0-9a-fA-F]{40}")


@dataclass(frozen=True)
class Resolved:
    sha: str  # 40 hex digits, lowercase
    ref: str  # the ref that matched; "" when none did (a SHA given, propagated or stale)
    source: str  # "sha" | "propagated" | "remote" | "stale"

    @property
    def sha12(self) -> str:
        return self.sha[:12]


class RemoteFailed(Failure):
    """The remote could not be reached (as opposed to a ref it does not have)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, FAILED)


def is_sha(text: str) -> bool:
    return _SHA.fullmatch(text) is not None


def match(refs: str, tag: str) -> tuple[str, str] | None:
    """(sha, ref) for `tag` in `git ls-remote` output, by exact name, tags before branches."""
    table = {ref: sha for sha, ref in (line.split("\t", 1) for line in refs.splitlines() if "\t" in line)}
    tag_ref, branch_ref = f"refs/tags/{tag}", f"refs/heads/{tag}"
    for ref, peeled in ((tag_ref, tag_ref + "^{}"), (tag_ref, tag_ref), (branch_ref, branch_ref)):
        if peeled in table and is_sha(table[peeled]):
            if ref == tag_ref and branch_ref in table:
                log.info(f"tag: {tag!r} is both a tag and a branch: using the tag")
            return table[peeled].lower(), ref
    return None


def ls_remote(c: Context, url: str, *, retry_delay: float = RETRY_DELAY_SECONDS) -> str:
    """The remote's refs; `RemoteFailed` after `ATTEMPTS` tries with a growing pause between them."""
    command = shlex.join(["git", "ls-remote", "--", url])
    problem = ""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            result = c.run(
                command,
                hide=True,
                warn=True,
                in_stream=False,
                env={"GIT_TERMINAL_PROMPT": "0"},
                timeout=ATTEMPT_TIMEOUT_SECONDS,
            )
        except CommandTimedOut:
            problem = f"no answer within {ATTEMPT_TIMEOUT_SECONDS} s"
        else:
            if result.ok:
                return result.stdout
            lines = result.stderr.strip().splitlines()
            problem = lines[-1] if lines else _status(result.exited)
        log.warn(f"kernel-url: attempt {attempt}/{ATTEMPTS} to reach {url} failed: {problem}")
        if attempt < ATTEMPTS:
            time.sleep(retry_delay * attempt)
    raise RemoteFailed(f"kernel-url: cannot reach {url} after {ATTEMPTS} attempts: {problem}")


def _status(exited: int) -> str:
    return f"git killed by signal {-exited}" if exited < 0 else f"git exit status {exited}"


def remote(c: Context, url: str, tag: str, *, retry_delay: float = RETRY_DELAY_SECONDS) -> Resolved:
    found = match(ls_remote(c, url, retry_delay=retry_delay), tag)
    if found is None:
        raise Failure(
            f"tag: {tag!r} is no tag or branch of {url} (exact names only; a commit needs all 40 hex digits)",
            FAILED,
        )
    return Resolved(sha=found[0], ref=found[1], source="remote")


PROPAGATED = "resolved.json"  # in `.vng-sha-{name}/`: what the action's SHA cache layer carries


def sha_file(workspace: Path, name: str) -> Path:
    return workspace / f".vng-sha-{name}" / PROPAGATED


@dataclass(frozen=True)
class Question:
    """What a recorded answer must have been the answer to, to be used again."""

    tag: str
    kernel_url: str
    run_id: str  # $GITHUB_RUN_ID: "" outside GitHub Actions
    reuse: bool  # the reuse-resolved setting: outside Actions, the only way a record is used

    @classmethod
    def of(cls, settings: Settings, environ: Mapping[str, str]) -> Question:
        return cls(settings.tag, settings.kernel_url, environ.get("GITHUB_RUN_ID", ""), settings.reuse_resolved)


def propagated(workspace: Path, name: str, question: Question) -> Resolved | None:
    """The SHA an earlier job of this workflow run resolved for the same tag and URL, if its record is
    here and valid; outside GitHub Actions only with `reuse-resolved` (a branch must move on a laptop)."""
    path = sha_file(workspace, name)
    if not question.run_id and not question.reuse:
        return None
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as error:
        log.warn(f"ignoring {path}: {error}")
        return None
    if not isinstance(record, dict) or not is_sha(str(record.get("sha", ""))):
        log.warn(f"ignoring {path}: no 40-hex commit in it")
        return None
    asked = {"tag": question.tag, "kernel_url": question.kernel_url}
    if question.run_id:
        asked["run_id"] = question.run_id  # the seed's scope: one workflow run
    differs = [key for key, value in asked.items() if record.get(key) != value]
    if differs:
        log.info(f"tag: {path} answered another {' and '.join(differs)}: asking the remote")
        return None
    return Resolved(sha=str(record["sha"]).lower(), ref="", source="propagated")


def propagate(workspace: Path, name: str, question: Question, sha: str, environ: Mapping[str, str]) -> Path:
    """Record the SHA with what it answers for later jobs, in one file replaced at once: a reader sees
    the old record or the new one, never one's tag with the other's SHA."""
    path = sha_file(workspace, name)
    if path.parent.exists() and not path.parent.is_dir():
        raise Failure(f"{path.parent.name}: exists in the workspace and is not a directory", BAD_INPUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "tag": question.tag,
        "kernel_url": question.kernel_url,
        "run_id": question.run_id,
        "run_attempt": environ.get("GITHUB_RUN_ATTEMPT", ""),
        "sha": sha,
    }
    write_atomically(path, json.dumps(record) + "\n")
    return path


def stale(settings: Settings) -> Resolved | None:
    """The newest cached kernel of this name, arch and version, to run when the remote is down."""
    base = key_tag(settings.kconfig_base, settings.debug)
    entry = KernelCache(kernels_root(settings)).newest(settings.name, settings.arch.name, settings.version, base)
    sha = str(entry.metadata.get("sha", "")) if entry else ""
    if entry is None or not is_sha(sha):
        return None
    log.warn(f"kernel-url unreachable: using the newest cached kernel {entry.key} (it may be stale)")
    return Resolved(sha=sha.lower(), ref=str(entry.metadata.get("ref", "")), source="stale")


def resolve_kernel(
    c: Context,
    settings: Settings,
    *,
    retry_delay: float = RETRY_DELAY_SECONDS,
    environ: Mapping[str, str] = os.environ,
    record: bool = True,
) -> Resolved:
    """SHA literal, else propagated SHA, else the remote (retried), else a stale cached kernel.
    `record`: keep the remote's answer for later jobs (a dry run does not)."""
    if is_sha(settings.tag):
        return Resolved(sha=settings.tag.lower(), ref="", source="sha")
    question = Question.of(settings, environ)
    shared = propagated(settings.workspace, settings.name, question)
    if shared is not None:
        log.info(f"tag: using {shared.sha12} from {sha_file(settings.workspace, settings.name)}")
        return shared
    try:
        resolved = remote(c, settings.kernel_url, settings.tag, retry_delay=retry_delay)
    except RemoteFailed as failure:
        fallback = stale(settings)
        if fallback is None:
            raise RemoteFailed(
                f"{failure}; remote failed and no cached kernel for {settings.name}-{settings.arch.name}"
                f" ({settings.version})"
            ) from None
        return fallback
    if record:
        propagate(settings.workspace, settings.name, question, resolved.sha, environ)
    log.info(f"tag: {settings.tag} is {resolved.sha12} ({resolved.ref})")
    return resolved
