"""The table .ci/run prints at its end: each nox session's wall time, then the ten slowest tests of them all."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

SLOWEST = 10


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def main(results: Path) -> None:
    print("| session | wall | status |\n|---|---|---|")
    sessions = results / "sessions.tsv"
    for line in sessions.read_text().splitlines() if sessions.exists() else []:
        name, seconds, status = line.split("\t")
        print(f"| {name} | {minutes(float(seconds))} | {'passed' if status == '0' else 'exit ' + status} |")
    tests = []
    for junit in sorted(results.glob("*.xml")):
        for case in ET.parse(junit).iter("testcase"):
            tests.append((float(case.get("time", 0)), junit.stem, f"{case.get('classname')}::{case.get('name')}"))
    print(f"\n| the {SLOWEST} slowest tests | session | seconds |\n|---|---|---|")
    for seconds, session, name in sorted(tests, reverse=True)[:SLOWEST]:
        print(f"| {name} | {session} | {seconds:.0f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
