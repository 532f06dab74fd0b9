"""Speed goals, measured and printed (never asserted): `nox -s bench [-- --build]`."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vngtasks import accel, arches

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
    """`invoke resolve` in a later job of a run: the SHA file answers, the network is never used."""
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as listener:
        workspace = Path(tmp)
        (workspace / ".vng-sha-bench").mkdir()
        (workspace / ".vng-sha-bench" / "sha").write_text("0123456789abcdef0123456789abcdef01234567\n")
        (workspace / ".vng-sha-bench" / "tag").write_text("v6.12\n")
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
        argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), "resolve", "--tag", "v6.12", "--name", "bench"]
        argv += ["--kernel-url", url, "--cache-dir", str(workspace / "cache")]
        seconds = timed(lambda: subprocess.run(argv, cwd=workspace, check=True, capture_output=True))
    print(
        f"invoke resolve, propagated SHA: {seconds:.3f} s, {len(connections)} network calls "
        f"(goal <= 0.3 s and 0 calls: ratio {seconds / 0.3:.3f})"
    )


def build_ratios() -> None:
    """Kernel builds of v6.12 from the test remote: cold ccache, then warm in a fresh tree (~20 min)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from linux_remote import TAG, linux_remote

    url = f"file://{linux_remote()}"
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        env = {**os.environ, "CCACHE_DIR": f"{tmp}/ccache"}
        runs = {}
        for run in ("cold", "warm"):
            argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), "build", "--tag", TAG, "--kernel-url", url]
            argv += ["--name", "bench", "--cache-dir", f"{tmp}/{run}"]
            subprocess.run(argv, cwd=tmp, env=env, check=True, capture_output=True)
            (entry,) = Path(tmp, run, "kernels").glob("vng-kernel-bench-*")
            runs[run] = json.loads((entry / "metadata.json").read_text())
        tree = sum(p.stat().st_size for p in Path(tmp, "warm", "work").rglob("*") if p.is_file() and not p.is_symlink())
        entry_bytes = runs["warm"]["size_bytes"]
        cold, warm = runs["cold"]["compile_seconds"], runs["warm"]["compile_seconds"]
    ratio = entry_bytes / tree
    sizes = f"cache entry {entry_bytes / 2**20:.1f} MiB / build tree {tree / 2**20:.0f} MiB"
    print(f"{sizes}: ratio {ratio:.4f} (goal <= 0.02)")
    print(f"ccache-warm compile {warm:.0f} s / cold compile {cold:.0f} s: ratio {warm / cold:.3f} (goal <= 0.20)")
    print(f"  warm ccache {runs['warm']['ccache']}, whole build with fetch {runs['warm']['build_seconds']} s")


def main() -> None:
    host = arches.host()
    seconds = timed(lambda: accel.choose("auto", host, host))
    verdict = accel.choose("auto", host, host)
    print(f"accel auto decision: {seconds:.3f} s -> {verdict.accel} (goal <= 15 s: ratio {seconds / 15:.3f})")
    seconds = timed(lambda: invoke("deps"))
    print(f"invoke deps, all present: {seconds:.3f} s (goal <= 1 s: ratio {seconds:.3f})")
    resolve_propagated()
    if "--build" in sys.argv[1:]:
        build_ratios()
    else:
        print("kernel build ratios: skipped (about 20 min): run `nox -s bench -- --build`")


if __name__ == "__main__":
    main()
