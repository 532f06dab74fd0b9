"""Building on a build host over SSH: build.py's one sequence, run on a Fabric Connection.

A Connection is an invoke Context, so the build's steps run there unchanged, with the build
host's cores and ccache, in a work tree per cache key under `~/.cache/vngtasks` there (removed
once the entry is home). What only a build host needs is here: the survey of the machine, the
check of its toolchain, the per-key lock held by the connection, the source — fetched there from
kernel-url, or, for a local kernel tree the build host cannot see, pushed with git over ssh to
a bare repository there, so only missing objects travel — and the result streamed home as one
checked tar stream into the local cache's temp directory, which becomes the entry in one rename.
The connection itself (host keys, the guard, one-line failures) is buildhost_ssh.py's.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import tempfile
import time
from pathlib import Path

import paramiko
from invoke import Context

from . import arches, build, cache, deps, files, log, supervise, untar, validate
from .buildhost_ssh import (
    GIT_HOST,
    NO_CREDENTIALS,
    BuildHost,
    Credentials,
    command_problem,
    connect,
    failure,
    git_ssh_config,
    known_hosts_file,
    stage,
)
from .buildsteps import Machine, Plan, fetch, plan_on
from .errors import BAD_INPUT, MISSING_TOOL, Failure
from .resolve import Resolved
from .settings import Settings
from .sshconfig import Hop, Route, resolve
from .validate import InputError

ROOT = ".cache/vngtasks"  # under the build host's $HOME
LOW_DISK_BYTES = 10 * 1024**3  # a kernel build with debug info needs several GiB
DOWNLOAD_SECONDS = 3600  # the built kernel's stream home, whole: far above a few hundred MiB over a slow link
DOWNLOAD_IDLE_SECONDS = 300  # the stream silent this long: it has stopped
_WRITTEN = re.compile(r"Writing objects: 100% \([0-9]+/[0-9]+\), ([0-9.]+) (bytes|KiB|MiB|GiB)")
_UNITS = {"bytes": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def survey(conn: BuildHost, host: Hop) -> Machine:
    """What we learn about the build host before building there (make's PATH: vng's directory first)."""
    probe = 'printf "%s\\n" "$HOME" "$(uname -m)" "$(nproc)" "$(command -v vng)" "$PATH" "${CCACHE_DIR:-}"'
    lines = conn.run(probe, hide=True, in_stream=False).stdout.split("\n")
    home, machine, jobs, vng, path, ccache_dir = (lines + [""] * 6)[:6]
    if not validate.STRICT_PATH.fullmatch(home):  # we hand it to `cd` and make (invoke's `cd` escapes spaces only)
        raise failure(host, "survey", f"$HOME is {home!r}: vngtasks needs a plain absolute path there")
    try:
        arch = arches.lookup(machine)
    except KeyError:
        raise failure(host, "survey", f"unknown machine {machine!r} (uname -m)") from None
    jobs_there = int(jobs) if jobs.isdigit() else 1
    return Machine(home, arch, jobs_there, vng, f"{vng.rsplit('/', 1)[0]}:{path}", ccache_dir)


def build_packages(settings: Settings, distro: deps.Distro, host_arch: arches.Arch) -> list[str]:
    """What `invoke deps` would install, less what only booting needs."""
    boot_only = {settings.arch.qemu_package, *deps.BOOT_PACKAGES, *distro.names("virtiofsd", settings.arch)}
    boot_only |= set(settings.packages)
    boot_only -= set(deps.BUILD_PACKAGES)
    return [name for name in deps.wanted(settings, distro, host_arch, False) if name not in boot_only]


def check_toolchain(conn: BuildHost, host: Hop, settings: Settings, machine: Machine) -> None:
    """Fail, listing what to install, unless the build host has the build packages and vng."""
    problems = []
    if conn.run("command -v dpkg-query", hide=True, warn=True, in_stream=False).ok:
        distro = deps.Distro.of(conn.run("cat /etc/os-release", hide=True, warn=True, in_stream=False).stdout)
        missing = deps.missing(conn, build_packages(settings, distro, machine.arch))
        if missing:
            problems.append(f"packages {' '.join(missing)} (`sudo apt-get install -y {shlex.join(missing)}` there)")
    else:
        log.warn(f"build-host: {host.label}: no dpkg there: not checking its build packages")
    if not machine.vng:
        problems.append("vng (`pip install virtme-ng` there, on the PATH of a non-interactive ssh session)")
    if problems:
        raise failure(host, "deps", "missing on the build host: " + "; ".join(problems), MISSING_TOOL)


def local_repo(url: str) -> Path | None:
    """The local repository a kernel-url names, when the build host could not see it."""
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    if "://" in url or re.match(r"[^/]+:", url):  # a URL, or scp-like host:path
        return None
    path = Path(url).expanduser()
    return path.resolve() if path.exists() else None


def push(
    c: Context, conn: BuildHost, route: Route, repo: Path, sha: str, bare: str, ref: str,
    credentials: Credentials = NO_CREDENTIALS,
) -> int:  # fmt: skip
    """Push commit `sha` of the local `repo` to `ref` of `bare` on the build host, with git's ssh on the route
    paramiko took (git_ssh_config) and the same credentials; bytes sent."""
    conn.run(f"test -d {shlex.quote(bare)} || git init -q --bare {shlex.quote(bare)}", hide=True, in_stream=False)
    with tempfile.TemporaryDirectory(prefix="vngtasks-ssh-") as temp:  # 0700: the files are this user's alone
        key, known = None, None
        if credentials.key:
            key = Path(temp) / "key"
            key.touch(mode=0o600)  # ssh ignores a private key others may read
            key.write_text(credentials.key.rstrip("\n") + "\n")
        if credentials.known_hosts:
            known = [known_hosts_file(), Path(temp) / "known_hosts"]
            known[1].write_text(credentials.known_hosts + "\n")
        config = Path(temp) / "config"
        config.write_text(git_ssh_config(route, known, key))
        argv = ["git", "-C", str(repo), "push", "--progress", "--no-verify", f"ssh://{GIT_HOST}{bare}", f"+{sha}:{ref}"]
        pushed = c.run(
            shlex.join(argv),
            env={"GIT_SSH_COMMAND": shlex.join(["ssh", "-F", str(config)]), "GIT_TERMINAL_PROMPT": "0"},
            hide=True,
            warn=True,
            in_stream=False,
        )
    if not pushed.ok:
        raise failure(route.target, "push", command_problem(pushed))
    written = _WRITTEN.search(pushed.stderr.replace("\r", "\n"))
    return round(float(written[1]) * _UNITS[written[2]]) if written else 0


def check_disk(conn: BuildHost, host: Hop, path: str) -> None:
    free = conn.run(f"df -Pk {shlex.quote(path)} | awk 'NR==2 {{print $4}}'", hide=True, warn=True, in_stream=False)
    kib = free.stdout.strip()
    if kib.isdigit() and int(kib) * 1024 < LOW_DISK_BYTES:
        log.warn(f"build-host: {host.label}: only {files.human_size(int(kib) * 1024)} free under {path}")


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
        channel.settimeout(DOWNLOAD_IDLE_SECONDS)  # a stream that stops, stops the download
        stream = _Counted(channel.makefile("rb"), time.monotonic() + DOWNLOAD_SECONDS)
        untar.unpack(stream, dest)
        status = channel.recv_exit_status()
        if status != 0:
            problem = channel.makefile_stderr("rb").read().decode(errors="replace").strip().splitlines()
            raise OSError(f"tar exited with status {status}: {(problem or ['?'])[-1]}")
        return stream.count
    finally:
        channel.close()


class _Counted(io.RawIOBase):
    """A binary reader that counts what passes through, and ends at `deadline` (time.monotonic)."""

    def __init__(self, inner: io.BufferedIOBase | paramiko.ChannelFile, deadline: float) -> None:
        self.inner, self.count, self.deadline = inner, 0, deadline

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"the kernel took over {DOWNLOAD_SECONDS} s to come home")
        data = self.inner.read(size)
        self.count += len(data)
        return data


def build_entry(
    c: Context, settings: Settings, kernels: cache.KernelCache, key: str, resolved: Resolved
) -> cache.Entry:
    """Build `resolved` on the first build host and store the result as cache entry `key` (a matrix gives each cell's
    settings the one host it builds on)."""
    try:
        route = resolve(settings.build_host[0], settings.build_host_proxy_command)
    except InputError as error:
        raise Failure(str(error), BAD_INPUT) from None
    started = time.monotonic()
    credentials = Credentials(settings.build_host_key, settings.build_host_known_hosts)
    conn = connect(route, settings.build_host_accept_new, credentials)
    try:
        with supervise.ended_when_stopped(lambda: _end(conn)):  # a matrix's build thread, when the matrix stops
            return _build_there(c, conn, route, settings, kernels, key, resolved, started)
    except BaseException:
        conn.stop_build()
        raise
    finally:
        conn.close()


def _end(conn: BuildHost) -> None:
    """The build stopped from another thread: its command there killed, the connection closed under it."""
    conn.stop_build()
    conn.close()


def _build_there(
    c: Context,
    conn: BuildHost,
    route: Route,
    s: Settings,
    kernels: cache.KernelCache,
    key: str,
    resolved: Resolved,
    started: float,
) -> cache.Entry:
    host = route.target
    with stage(conn, host, "survey"):
        machine = survey(conn, host)
    with stage(conn, host, "deps"):
        check_toolchain(conn, host, s, machine)
    work = f"{machine.home}/{ROOT}/remote-work/{key}"
    with stage(conn, host, "prepare"):
        conn.run(shlex.join(["mkdir", "-p", work]), hide=True, in_stream=False)
        check_disk(conn, host, work)
    with stage(conn, host, "lock"):  # builds of this key from other machines take turns
        hold_lock(conn, f"{work}.lock", key)
    conn.pidfile = f"{work}/command.pid"
    site = there(c, conn, route, s, machine)
    entry = build.build_entry(site, plan_on(s, resolved.sha, machine, work), kernels, key, resolved, started)
    conn.pidfile = ""
    with contextlib.suppress(Exception):  # the work tree was for this key only; ccache keeps the objects
        conn.run(shlex.join(["rm", "-rf", work]), hide=True, warn=True, in_stream=False)
    return entry


def there(c: Context, conn: BuildHost, route: Route, s: Settings, machine: Machine) -> build.Site:
    """The build host as a site: a local tree pushed (else kernel-url fetched there), the result streamed home."""
    host = route.target

    def bring_source(plan: Plan) -> int:
        repo = local_repo(s.kernel_url)
        if repo is None:
            with stage(conn, host, "fetch"):
                fetch(conn, s.kernel_url, s.tag, plan.sha, plan.tree)
            return 0
        bare = f"{machine.home}/{ROOT}/remote-git/{s.name}.git"
        with stage(conn, host, "push"):
            ref = f"refs/vngtasks/{s.name}-{s.arch.name}"
            pushed = push(
                c, conn, route, repo, plan.sha, bare, ref, Credentials(s.build_host_key, s.build_host_known_hosts)
            )
        log.info(f"push: {repo} to {host.label}: {files.human_size(pushed)} sent")
        with stage(conn, host, "fetch"):
            fetch(conn, bare, plan.sha, plan.sha, plan.tree)
        return pushed

    def bring_home(plan: Plan, paths: list[str], dest: Path) -> int:
        return download(conn, plan.tree, paths, dest)

    def named(name: str) -> contextlib.AbstractContextManager[None]:
        return stage(conn, host, name)

    return build.Site(
        conn, machine, host.label, f"on {host.label}", bring_source, bring_home, {"build_jobs": machine.jobs}, named
    )
