"""Speed goals, measured and printed (never asserted).

`nox -s bench [-- [--no-boot] [--build] [--bisect] [--remote | --remote-push]]`: by default the quick figures,
the boot ratios, what symbolizing adds to a failed run, and each arch's boot time here (about 14 min);
`--build` adds the kernel-build ratios of the tiny and vng bases (about 60 min on 2 cores), `--bisect` a bisect
against its steps' builds and boots, `--remote` a remote build against a local one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from invoke import Context
from linux_remote import (
    CCACHE_DIR,
    FOREIGN_CACHE,
    KCONFIG,
    LINUX_REMOTE_HOME,
    MOUNT_DEBUGFS,
    PROVOKE_THREE,
    TAG,
    git,
    kernel_history,
    linux_remote,
    tagged_commit,
    without_rustup,
)

from vngtasks import accel, arches, guestroot, kernels, resolve, vm
from vngtasks.report import crashes, symbolize

ROOT = Path(__file__).resolve().parent.parent


def timed(action: Callable[[], object], runs: int = 5) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def invoke(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "invoke", "-r", str(ROOT), *args], check=True, capture_output=True)


def resolve_propagated() -> None:
    """`invoke resolve` in a later job of a run: the SHA record answers, the network is never used (median of 10)."""
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as listener:
        workspace = Path(tmp)
        run = {"GITHUB_RUN_ID": "1"}  # a later job of one workflow run
        # kernel-url points here: every connection git makes is accepted, counted and dropped.
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        connections: list[object] = []

        def count() -> None:
            while True:
                try:
                    peer, _ = listener.accept()
                except OSError:
                    return
                connections.append(peer)
                peer.close()

        threading.Thread(target=count, daemon=True).start()
        url = f"git://127.0.0.1:{listener.getsockname()[1]}/linux.git"
        sha = "0123456789abcdef0123456789abcdef01234567"
        resolve.propagate(workspace, "bench", resolve.Question("v6.12", url, run["GITHUB_RUN_ID"], False), sha, run)
        argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), "resolve", "--tag", "v6.12", "--name", "bench"]
        argv += ["--kernel-url", url, "--cache-dir", str(workspace / "cache")]
        env = {**os.environ, **run}
        seconds = timed(lambda: subprocess.run(argv, cwd=workspace, env=env, check=True, capture_output=True), runs=10)
    print(
        f"invoke resolve, propagated SHA: {seconds:.3f} s, {len(connections)} network calls "
        f"(goal <= 0.2 s and 0 calls: ratio {seconds / 0.2:.3f})"
    )


def build_argv(tag: str, url: str, cache_dir: Path, workspace: Path, *extra: str) -> list[str]:
    """`invoke build` of the tests' kernel: their kconfig fragment (copied into `workspace`), so the
    ccache the slow tests keep warm serves these builds too."""
    (workspace / "kernel.config").write_text(KCONFIG.read_text())
    argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), "build", "--tag", tag, "--kernel-url", url]
    return [*argv, "--name", "bench", "--kconfig", "kernel.config", "--cache-dir", str(cache_dir), *extra]


def make_env(**extra: str) -> dict[str, str]:
    """This environment with `extra`, without a rustup toolchain on PATH, as in the tests."""
    return {**os.environ, "PATH": without_rustup(os.environ["PATH"]), **extra}


def build_ratios() -> None:
    """v6.12 from the test remote with each kconfig base, BTF on: a cold ccache of its own, then warm
    in a fresh tree (about 60 min on 2 cores, most of it the vng base's cold build); the vng base's kernel
    booted (CI's tests configure that base but do not build it)."""
    url = f"file://{linux_remote()}"
    runs: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        for base in ("tiny", "vng"):
            env = make_env(CCACHE_DIR=f"{tmp}/ccache-{base}")
            for run in ("cold", "warm"):
                argv = build_argv(TAG, url, Path(tmp, base, run), Path(tmp), "--kconfig-base", base)
                subprocess.run(argv, cwd=tmp, env=env, check=True, capture_output=True)
                (entry,) = Path(tmp, base, run, "kernels").glob("vng-kernel-bench-*")
                runs[base, run] = json.loads((entry / "metadata.json").read_text())
        (vng_entry,) = Path(tmp, "vng", "warm", "kernels").glob("vng-kernel-bench-*")
        booted = subprocess.run(
            [sys.executable, "-m", "invoke", "-r", str(ROOT), "boot", "--kernel", str(vng_entry), "--verbose", "false",
             "--cache-dir", f"{tmp}/boot-cache", "--", "uname -r"],
            cwd=tmp, env=make_env(), check=True, capture_output=True, text=True,
        )  # fmt: skip
        print(f"vng base booted: uname -r {booted.stdout.strip().splitlines()[-1]}")
        tree = Path(tmp, "vng", "warm", "work")
        tree_bytes = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    entry_bytes = runs["vng", "warm"]["size_bytes"]
    print(f"cache entry {entry_bytes / 2**20:.1f} MiB / build tree {tree_bytes / 2**20:.0f} MiB (vng base):")
    print(f"  ratio {entry_bytes / tree_bytes:.4f} (goal <= 0.02)")
    for run in ("cold", "warm"):
        tiny, vng = runs["tiny", run]["build_seconds"], runs["vng", run]["build_seconds"]
        goal = " (goal <= 0.30)" if run == "cold" else ""
        print(f"{run} build, tiny base {tiny:.0f} s / vng base {vng:.0f} s: ratio {tiny / vng:.3f}{goal}")
    for base in ("tiny", "vng"):
        cold, warm = runs[base, "cold"]["compile_seconds"], runs[base, "warm"]["compile_seconds"]
        print(f"{base} base: ccache-warm compile {warm:.0f} s / cold {cold:.0f} s: ratio {warm / cold:.3f}")
        print(f"  (goal <= 0.20; warm ccache {runs[base, 'warm']['ccache']})")


def boot_ratio(
    kernel: Path, label: str, pairs: int = 5, arch: arches.Arch | None = None, root: Path | None = None
) -> float:
    """`invoke boot` against raw `vng --disable-kvm` on the same kernel, cpus and memory, under TCG, in
    alternating pairs: the median of the pairs' ratios, and where our runs' time went (vng-run.json).
    A foreign `arch` boots in its guest `root`, raw vng too (`--arch A --root R`, with vng's shell init: its
    own init is the host's arch). Returns the median `invoke boot` seconds."""
    vng = str(Path(sys.executable).parent / "vng")
    size = ["--cpus", "2", "--memory", "2G"]
    with tempfile.TemporaryDirectory() as tmp:
        ours = [sys.executable, "-m", "invoke", "-r", str(ROOT), "boot", "--kernel", str(kernel), *size]
        ours += ["--verbose", "false", "--cache-dir", f"{tmp}/cache", "--", "true"]
        raw = [vng, "--disable-kvm", "--run", str(kernel), *size, "--exec", "true"]
        if arch is not None and root is not None:
            ours[ours.index("--cache-dir") + 1] = str(FOREIGN_CACHE)
            ours[-2:-2] = ["--arch", arch.name]
            raw[1:1] = ["--arch", arch.vng_name, "--root", str(root), "--no-virtme-ng-init"]
        seconds: dict[str, list[float]] = {"ours": [], "raw": []}
        phases: list[dict[str, float]] = []
        for _ in range(pairs):
            for name, argv in (("ours", ours), ("raw", raw)):
                start = time.perf_counter()
                subprocess.run(argv, cwd=tmp, env=vm.child_environment(make_env()), check=True, capture_output=True)
                seconds[name].append(time.perf_counter() - start)
            phases.append(json.loads(Path(tmp, "vng-run.json").read_text())["phases"])
    ratio = statistics.median(o / r for o, r in zip(seconds["ours"], seconds["raw"], strict=True))
    ours_s, raw_s = statistics.median(seconds["ours"]), statistics.median(seconds["raw"])
    print(f"boot of {label}, TCG, 2 cpus, 2G: invoke boot {ours_s:.1f} s / raw vng {raw_s:.1f} s:")
    print(f"  median of {pairs} pairs' ratios {ratio:.3f}" + (" (goal <= 0.60)" if arch is None else ""))
    spent = {name: statistics.median(p.get(name, 0.0) for p in phases) for name in phases[0]}
    print("  where invoke boot's time goes (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in spent.items()))
    return ours_s


def symbolize_share(kernel: Path, runs: int = 3) -> None:
    """What symbolizing adds to a failed run: a tiny v6.12 run whose workload provokes LKDTM's WARNING, BUG and
    EXCEPTION, end to end (median of `runs`), against symbolize() on that run's own crashes (what the run does
    once its console is read, median of 5)."""
    workload = f"{MOUNT_DEBUGFS}; {PROVOKE_THREE}"  # as a slow test's (test_boot.py), which counts them
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), "boot", "--kernel", str(kernel), "--verbose", "false"]
        argv += ["--cache-dir", f"{tmp}/cache", "--", workload]
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(argv, cwd=tmp, env=vm.child_environment(make_env()), capture_output=True)
            samples.append(time.perf_counter() - start)
        console = Path(tmp, "vng-console.log").read_text(errors="replace").splitlines()
        count = len(crashes.find(console).found)
        seconds = timed(lambda: symbolize.symbolize(crashes.find(console), kernel, arches.host(), arches.host()))
    run = statistics.median(samples)
    print(f"symbolizing a failed run's {count} crashes: {seconds:.2f} s of the run's {run:.1f} s")
    if count != 3:
        print(f"  no ratio: the workload provokes 3 crashes, {count} found in the run's console")
        return
    print(f"  ratio {seconds / run:.3f} (goal <= 0.10)")


def arch_boots(host_seconds: float) -> None:
    """Each arch's boot here under TCG (Debian's kernel of it, `true` as the workload), as a table."""
    seconds = {arches.host().name: host_seconds}
    for arch in arches.ARCHES:
        if arch != arches.host() and arch.debian_userland:
            if shutil.which(arch.qemu_binary) is None:
                print(f"{arch.name}: not booted: {arch.qemu_binary} is not installed (invoke deps --arch {arch.name})")
                continue
            root, kernel = guestroot.ensure_root_and_kernel(FOREIGN_CACHE, arch)
            seconds[arch.name] = boot_ratio(kernel, f"Debian's {arch.name} kernel", pairs=2, arch=arch, root=root)
    print("boot under TCG here, Debian's kernel, `invoke boot -- true` (median s):")
    print("| arch | seconds |\n|------|---------|")
    for name, median in seconds.items():
        print(f"| {name} | {median:.1f} |")


def tiny_kernel() -> Path:
    """The tests' tiny v6.12 (kconfig-base tiny, their fragment), built or found in a bench cache: the fragment's
    hash is its cache version (a cache key holds no fragment), so a changed fragment is built again."""
    cache_dir = LINUX_REMOTE_HOME / "bench-cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    version = "k" + hashlib.sha256(KCONFIG.read_bytes()).hexdigest()[:12]
    argv = build_argv(
        TAG, f"file://{linux_remote()}", cache_dir, cache_dir, "--kconfig-base", "tiny", "--version", version
    )
    done = subprocess.run(
        argv, cwd=cache_dir, env=make_env(CCACHE_DIR=str(CCACHE_DIR)), check=True, capture_output=True, text=True
    )
    return Path(done.stdout.strip().splitlines()[-1])


def _loopback_sshd(tmp: Path, home: Path) -> int:
    """A real sshd on 127.0.0.1 for `home`'s user key, its host key in `home`'s known_hosts; the port."""
    (home / ".ssh").mkdir(mode=0o700, parents=True)
    for key in (home / ".ssh" / "id_ed25519", tmp / "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(key)], check=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    remote_home = tmp / "remote-home"
    remote_home.mkdir()
    path = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    (tmp / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {tmp / 'host_key'}\nPidFile {tmp / 'sshd.pid'}\n"
        f"PermitRootLogin prohibit-password\nAuthorizedKeysFile {home / '.ssh' / 'id_ed25519.pub'}\n"
        f"StrictModes no\nUsePAM no\nSetEnv HOME={remote_home} PATH={path} CCACHE_DIR={os.environ['CCACHE_DIR']}\n"
    )
    host_key = (tmp / "host_key.pub").read_text().split()
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    subprocess.run(["/usr/sbin/sshd", "-f", str(tmp / "sshd_config")], check=True)  # daemonises; pid file
    return port


def remote_build_ratios(builds: bool) -> None:
    """Over SSH on loopback (needs root and openssh-server): with `builds`, a remote build against a local
    build of the same commit, both on the tests' ccache (warm once the slow tests have run: the hit
    counts are printed); always, the bytes a one-line change of a local tree pushes once the build host
    has the original."""
    repo = linux_remote()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as name:
        tmp = Path(name)
        home = tmp / "home"
        os.environ.setdefault("CCACHE_DIR", str(CCACHE_DIR))
        port = _loopback_sshd(tmp, home)
        env = make_env(HOME=str(home))
        try:
            if builds:
                seconds = {}
                target = f"root@127.0.0.1:{port}"
                for run, extra in (("local", []), ("remote", ["--build-host", target])):
                    # file:// names a local repository: the remote build first pushes the commit there
                    # (~250 MiB), and the ratio includes that push.
                    argv = build_argv(TAG, f"file://{repo}", tmp / run, tmp, *extra)
                    start = time.perf_counter()
                    subprocess.run(argv, cwd=tmp, env=env, check=True, capture_output=True)
                    seconds[run] = time.perf_counter() - start
                    (entry,) = (tmp / run / "kernels").glob("vng-kernel-bench-*")
                    print(f"  {run} build: ccache {json.loads((entry / 'metadata.json').read_text())['ccache']}")
                ratio = seconds["remote"] / seconds["local"]
                print(f"remote build over loopback {seconds['remote']:.0f} s / local build {seconds['local']:.0f} s:")
                print(f"  ratio {ratio:.3f} (goal <= 1.10)")
            _one_line_push(repo, tmp, home, port)
        finally:
            subprocess.run(["kill", (tmp / "sshd.pid").read_text().strip()], check=False)


def _one_line_push(repo: Path, tmp: Path, home: Path, port: int) -> None:
    from vngtasks import buildhost, buildhost_ssh, sshconfig

    clone = tmp / "changed"
    subprocess.run(["git", "clone", "-q", "--shared", str(repo), str(clone)], check=True)
    makefile = clone / "Makefile"
    makefile.write_text(makefile.read_text() + "# one more line\n")
    git(clone, "commit", "-q", "-a", "-m", "one line")
    os.environ["HOME"] = str(home)
    route = sshconfig.Route(f"root@127.0.0.1:{port}", sshconfig.Hop("root", "127.0.0.1", port))
    conn = buildhost_ssh.connect(route, accept_new=False)
    bare = f"{tmp}/remote-home/.cache/vngtasks/remote-git/bench.git"
    ref = "refs/vngtasks/bench-x86_64"  # what a build of name bench pushes to
    first = buildhost.push(Context(), conn, route, repo, git(repo, "rev-parse", f"{TAG}^{{commit}}").strip(), bare, ref)
    start = time.perf_counter()
    pushed = buildhost.push(Context(), conn, route, clone, git(clone, "rev-parse", "HEAD").strip(), bare, ref)
    seconds = time.perf_counter() - start
    conn.close()
    print(f"push of {TAG} to an empty build host: {first / 2**20:.1f} MiB (0 if a build pushed it already)")
    print(f"push of a one-line change: {pushed} bytes in {seconds:.2f} s (goal <= 1 MB: ratio {pushed / 1e6:.5f})")


def bisect_ratio() -> None:
    """`invoke bisect` over the slow test's eight commits (tiny, the tests' ccache, the work tree primed by a
    build of the good commit) against its steps x one warm incremental build and boot of another commit of
    that history (the bad one, which the bisect never builds)."""
    remote, sha = tagged_commit()
    with tempfile.TemporaryDirectory() as tmp:
        shas = kernel_history(remote, sha, Path(tmp, "linux"), changes_at=4)
        workspace = Path(tmp, "workspace")
        (workspace / "ci").mkdir(parents=True)
        (workspace / "ci" / "kernel.config").write_text(KCONFIG.read_text())
        kernel = ["--kernel-url", f"{tmp}/linux", "--name", "bench", "--kconfig-base", "tiny"]
        kernel += ["--kconfig", "ci/kernel.config", "--cache-dir", f"{tmp}/cache"]
        check = "if grep -q bisect-mark /proc/version; then exit 1; fi"

        def run(*args: str) -> float:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "invoke", "-r", str(ROOT), *args], cwd=workspace, check=True,
                           env=make_env(CCACHE_DIR=str(CCACHE_DIR)), capture_output=True)  # fmt: skip
            return time.perf_counter() - start

        run("build", "--tag", shas[0], *kernel)  # the work tree, as a first bisect step would leave it
        wall = run("bisect", "--good", "bisect-good", "--bad", "bisect-bad", *kernel, "--verbose", "false", "--", check)
        steps = len(json.loads((workspace / "bisect.json").read_text())["steps"])
        one = run("boot", "--tag", shas[-1], *kernel, "--verbose", "false", "--", "true")
    print(
        f"bisect of 8 commits: {steps} steps in {wall:.0f} s / ({steps} x one incremental build and boot {one:.0f} s):"
    )
    print(f"  ratio {wall / (steps * one):.3f} (goal <= 1.2)")


def remote_cache_ratio() -> None:
    """ccache-remote: the tiny v6.12 built cold (an empty ccache of its own) with an nginx remote on loopback, which
    it fills; then "another machine" (another tree, HOME and an empty CCACHE_DIR) builds the same commit from the
    remote. Its wall time / the first's (about 16 min on 2 cores)."""
    from servers import start_nginx

    url = f"file://{linux_remote()}"
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir="/var/lib") as tmp:
        nginx = start_nginx(Path(tmp, "nginx"))
        try:
            for machine in ("first", "second"):
                Path(tmp, machine).mkdir()
                argv = build_argv(TAG, url, Path(tmp, machine, "cache"), Path(tmp, machine), "--kconfig-base", "tiny",
                                  "--ccache-remote", nginx.url)  # fmt: skip
                env = make_env(CCACHE_DIR=f"{tmp}/{machine}/ccache", HOME=f"{tmp}/{machine}")
                started = time.monotonic()
                subprocess.run(argv, cwd=Path(tmp, machine), env=env, check=True, capture_output=True)
                seconds[machine] = time.monotonic() - started
                (entry,) = Path(tmp, machine, "cache", "kernels").glob("vng-kernel-bench-*")
                counts = json.loads((entry / "metadata.json").read_text())["ccache"]
                print(f"ccache-remote, {machine} machine: {seconds[machine]:.0f} s, ccache {counts}")
        finally:
            nginx.stop()
    ratio = seconds["second"] / seconds["first"]
    print(f"ccache-remote: second machine {seconds['second']:.0f} s / cold first {seconds['first']:.0f} s: "
          f"ratio {ratio:.3f} (goal <= 0.35)")  # fmt: skip


def main() -> None:
    host = arches.host()
    seconds = timed(lambda: accel.choose("auto", host, host))
    verdict = accel.choose("auto", host, host)
    print(f"accel auto decision: {seconds:.3f} s -> {verdict.accel} (goal <= 15 s: ratio {seconds / 15:.3f})")
    seconds = timed(lambda: invoke("deps"))
    print(f"invoke deps, all present: {seconds:.3f} s (goal <= 1 s: ratio {seconds:.3f})")
    resolve_propagated()
    if "--no-boot" not in sys.argv[1:]:
        distro = boot_ratio(kernels.host_kernel(), "the distro kernel")
        tiny = tiny_kernel()
        boot_ratio(tiny, "a cached tiny v6.12")
        symbolize_share(tiny)
        arch_boots(distro)
    if "--build" in sys.argv[1:]:
        build_ratios()
    else:
        print("kernel build ratios: skipped (about 60 min on 2 cores): run `nox -s bench -- --build`")
    if "--bisect" in sys.argv[1:]:
        bisect_ratio()
    else:
        print("bisect ratio: skipped (about 8 min): run `nox -s bench -- --bisect`")
    if "--ccache-remote" in sys.argv[1:]:
        remote_cache_ratio()
    else:
        print("ccache-remote ratio: skipped (about 16 min): run `nox -s bench -- --ccache-remote`")
    if "--remote" in sys.argv[1:] or "--remote-push" in sys.argv[1:]:
        remote_build_ratios(builds="--remote" in sys.argv[1:])
    else:
        print("remote build ratios: skipped: `-- --remote` (2 builds) or `-- --remote-push` (push bytes only)")


if __name__ == "__main__":
    main()
