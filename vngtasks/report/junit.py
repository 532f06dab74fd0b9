"""results.xml: a run's results as JUnit XML, the format CI dashboards read.

One `testsuite` per top-level suite the stream printed, one `testcase` per leaf test (its classname the suite,
its name the rest of its id); a failed test has a `failure` (an `error` when its result never came) whose text
is its diagnostic lines; a skipped test (and an expected failure) a `skipped` with its reason. A known failure
is still a failure here: its `type` says it is known, and by what. Text is what a guest printed: made printable,
and without the characters XML 1.0 cannot hold.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from .. import log
from . import ktap
from .results import Results, Verdict

_NOT_XML = re.compile("[\ufffe\uffff\ud800-\udfff]")


def render(results: Results) -> bytes:
    totals = results.totals
    root = ET.Element("testsuites", name="vngtasks", tests=str(len(results.verdicts)),
                      failures=str(totals["failed"] - totals["errors"]), errors=str(totals["errors"]))  # fmt: skip
    for suite, verdicts in results.suites().items():
        failures = sum(v.status == ktap.FAIL for v in verdicts)
        errors = sum(v.status == ktap.ERROR for v in verdicts)
        skipped = sum(v.status in (ktap.SKIP, ktap.XFAIL) for v in verdicts)
        element = ET.SubElement(root, "testsuite", _counts(len(verdicts), failures, errors, skipped), name=_text(suite))
        seconds = [v.seconds for v in verdicts if v.seconds is not None]
        if seconds:
            element.set("time", f"{sum(seconds):.3f}")
        properties = ET.SubElement(element, "properties")
        ET.SubElement(properties, "property", name="kernel", value=_text(results.release))
        for verdict in verdicts:
            _testcase(element, verdict)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def _counts(tests: int, failures: int, errors: int, skipped: int) -> dict[str, str]:
    return {"tests": str(tests), "failures": str(failures), "errors": str(errors), "skipped": str(skipped)}


def _testcase(suite: ET.Element, verdict: Verdict) -> None:
    case = ET.SubElement(suite, "testcase", classname=_text(verdict.suite), name=_text(verdict.name))
    if verdict.seconds is not None:
        case.set("time", f"{verdict.seconds:.3f}")
    if verdict.failed:
        tag = "error" if verdict.status == ktap.ERROR else "failure"
        kind = f"known: {verdict.known}" if verdict.known else "new"
        child = ET.SubElement(case, tag, message=_text(verdict.message()), type=_text(kind))
        child.text = _text("\n".join(verdict.diagnostics))
    elif verdict.status in (ktap.SKIP, ktap.XFAIL):
        said = verdict.reason if verdict.status == ktap.SKIP else f"expected failure: {verdict.reason}".rstrip(": ")
        ET.SubElement(case, "skipped", message=_text(said))


def _text(text: str) -> str:
    return _NOT_XML.sub("?", "\n".join(log.printable(line) for line in text.split("\n")))
