"""Speed goals, measured and printed (never asserted): `nox -s bench`."""

from __future__ import annotations

import statistics
import subprocess
import sys
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


def main() -> None:
    host = arches.host()
    seconds = timed(lambda: accel.choose("auto", host, host))
    verdict = accel.choose("auto", host, host)
    print(f"accel auto decision: {seconds:.3f} s -> {verdict.accel} (goal <= 15 s: ratio {seconds / 15:.3f})")
    seconds = timed(lambda: invoke("deps"))
    print(f"invoke deps, all present: {seconds:.3f} s (goal <= 1 s: ratio {seconds:.3f})")


if __name__ == "__main__":
    main()
