"""The kernel's crashes in a run: each panic and splat of the kernel's own lines, kinded and titled the way syzbot
titles them ("WARNING in lkdtm_WARNING"), identical ones counted once, with their frames.

A report starts at a line of CRASHES and runs to the kernel's `---[ end trace` line, the next report's start or
REPORT_LINES. Its title holds no address, pid, CPU or time: the same crash has the same title on every run and
machine. The function it names is the header's own when it names one, else the faulting instruction's (x86's
`RIP:`, arm64's `pc :`, s390's `Krnl PSW`), else the first frame of its trace that is not the reporting
machinery. Frames are `function+offset/size` as the kernel printed them, until symbolize.py names their file and
line.

Everything here comes from the guest: lines are cleaned before any is kept, reports, frames and crashes are
bounded, and a title is built from names matched by tight patterns only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import log
from ..log import printable

REPORT_LINES = 200  # the most lines of one report kept
LINE_CHARS = 1000
MAX_FRAMES = 64
MAX_CRASHES = 100  # distinct titles kept; more are counted in `dropped`
SHOWN_CRASHES = 20  # lines on stderr, annotations and summary rows; crashes.json has all
SHOWN_FRAMES = 3  # the top frames the step summary shows
CRASHES_JSON, CRASH_REPORT = "crashes.json", "crash-report.txt"
_FUNCTION = r"[A-Za-z_][\w.]{0,200}"
_HEX_OR_NUMBER = re.compile(r"\S*(?:0x[0-9a-fA-F]+|\b[0-9]+\b)\S*")
_TIMESTAMP = re.compile(r"^\[\s*[0-9]+\.[0-9]+\](?:\[\s*[TC][0-9]+\])?\s?")  # and printk's caller id
# A frame as a stack trace prints it: `func+0x1d/0x30`, maybe `[module]`; a `? ` frame is a guess and skipped.
_OFFSET = r"(?P<offset>0x[0-9a-f]+/0x[0-9a-f]+)"
_FRAME = re.compile(rf"^(?:kmemleak:)?\s*(?:\[<[0-9a-f]+>\]\s*)?(?P<function>{_FUNCTION})\+{_OFFSET}")  # kmemleak's too
# The faulting instruction: x86's RIP, arm64's and riscv's pc, powerpc's NIP, s390's PSW.
_AT_FAULT = re.compile(
    rf"(?:^RIP: [0-9a-f]{{4}}:|^pc : |^epc : |^NIP \[[0-9a-f]+\] |^Krnl PSW .*\()(?P<function>{_FUNCTION})\+{_OFFSET}"
)
_END = re.compile(r"^---\[ end (?:trace|Kernel panic)|^kmemleak: [0-9]+ new suspected memory leaks")
# The reporting machinery's own frames: the function a crash is in is below them.
_MACHINERY = re.compile(
    r"^(?:dump_stack\w*|show_stack|__warn\w*|warn_slowpath\w*|report_bug|handle_bug|exc_\w+|asm_exc_\w+|do_trap\w*"
    r"|do_error_trap|die\w*|bug_handler|__report_bug|print_report|kasan_\w+|__kasan_\w+|__asan_\w+|ubsan_\w+"
    r"|__ubsan_\w+|kcsan_\w+|lock_acquire\w*|__lock_acquire|check_\w+|validate_chain|print_\w+|panic|vpanic"
    r"|schedule\w*|__schedule|io_schedule\w*|rcu_\w+|__rcu_\w+|kmemleak_(?:alloc|vmalloc)\w*|kmalloc\w*|__kmalloc\w*"
    r"|kmem_cache_alloc\w*|__kmem_cache_alloc\w*|slab_\w+|__slab_\w+|_?_?k?vmalloc\w*|pcpu_alloc\w*|__alloc_percpu\w*)$"
)


@dataclass(frozen=True)
class Kind:
    """One kind of crash: the line its report starts with, and how its title reads. `{function}` is the function
    the report points at; other fields are the header's named groups, or DETAILS found in the report."""

    name: str
    header: re.Pattern[str]
    title: str


def _kind(name: str, header: str, title: str) -> Kind:
    return Kind(name, re.compile(header), title)


# Most specific first: KASAN's and KCSAN's headers start as a BUG's does, lockdep's as a WARNING's.
CRASHES = (
    _kind(
        "kasan",
        rf"BUG: KASAN: (?P<what>[\w-]{{1,60}}) in (?P<function>{_FUNCTION})",
        "KASAN: {what} {access} in {function}",
    ),
    _kind(
        "kcsan",
        rf"BUG: KCSAN: (?P<what>[\w-]{{1,60}}) in (?P<function>{_FUNCTION}(?: / {_FUNCTION})?)",
        "KCSAN: {what} in {function}",
    ),
    _kind("ubsan", r"UBSAN: (?P<what>[\w-]{1,60}) in ", "UBSAN: {what} in {function}"),
    _kind(
        "lockdep",
        r"WARNING: possible (?:circular locking dependency|recursive locking|irq lock inversion dependency) detected",
        "possible deadlock in {function}",
    ),
    _kind("lockdep", r"WARNING: suspicious RCU usage", "suspicious RCU usage in {function}"),
    _kind("kmemleak", r"(?:kmemleak: )?unreferenced object 0x[0-9a-f]+ \(size [0-9]+\)", "memory leak in {function}"),
    _kind(
        "hung_task",
        r"INFO: task .{1,64}:[0-9]+ blocked for more than [0-9]+ seconds",
        "INFO: task hung in {function}",
    ),
    _kind(
        "rcu_stall",
        r"rcu: INFO: rcu_\w+ (?:self-)?detected stalls? on CPUs?",
        "INFO: rcu detected stall in {function}",
    ),
    _kind(
        "warning",
        rf"WARNING: CPU: [0-9]+ PID: [0-9]+ at (?:\S+:[0-9]+ )?(?P<function>{_FUNCTION})\+0x",
        "WARNING in {function}",
    ),
    _kind("bug", r"kernel BUG at [^:\s]{1,200}:[0-9]+!", "kernel BUG in {function}"),
    _kind(
        "oops",
        r"BUG: (?P<what>kernel NULL pointer dereference|unable to handle page fault"
        r"|unable to handle kernel paging request)",
        "BUG: {what} in {function}",
    ),
    _kind(
        "oops",
        r"Unable to handle kernel (?P<what>NULL pointer dereference|paging request) at virtual address",
        "BUG: {what} in {function}",
    ),
    _kind("oops", r"(?:Oops: )?(?P<what>general protection fault)", "{what} in {function}"),
    _kind(
        "bug",
        r"BUG: (?P<what>sleeping function called from invalid context|scheduling while atomic|soft lockup"
        r"|workqueue lockup|spinlock \w+ on CPU)",
        "BUG: {what} in {function}",
    ),
    _kind("panic", r"Kernel panic - not syncing: (?P<what>.{1,200})", "kernel panic: {what}"),
)
DETAILS = {"access": re.compile(r"\b(Read|Write) of size [0-9]+")}  # fields a title takes from the report's body


@dataclass(frozen=True)
class Frame:
    function: str
    offset: str  # `0x1d/0x30` as printed (for an inlined frame, its caller's)
    module: str = ""
    file: str | None = None  # tree-relative, once symbolized
    line: int | None = None
    inlined: bool = False  # a function inlined where the next frame is
    at_fault: bool = False  # the faulting instruction's (`RIP:`, `pc :`), not a return address

    @property
    def place(self) -> str:
        return f"{self.file}:{self.line}" if self.file else f"{self.function}+{self.offset}"

    def json(self) -> dict[str, object]:
        return {
            "function": self.function,
            "offset": self.offset,
            "module": self.module or None,
            "file": self.file,
            "line": self.line,
            "inlined": self.inlined,
        }


@dataclass
class Crash:
    """One distinct crash: its first report, and how many times it happened (symbolize.py fills its frames'
    places)."""

    title: str
    kind: str
    frames: tuple[Frame, ...]
    report: tuple[str, ...]
    count: int = 1

    @property
    def where(self) -> str:
        """The top frame: its file:line once symbolized, else as printed (`function+offset/size`)."""
        return self.frames[0].place if self.frames else ""

    def json(self) -> dict[str, object]:
        return {
            "title": self.title,
            "kind": self.kind,
            "count": self.count,
            "frames": [frame.json() for frame in self.frames],
            "report": "\n".join(self.report),
        }


@dataclass
class Crashes:
    found: list[Crash] = field(default_factory=list)
    dropped: int = 0  # reports of titles past MAX_CRASHES
    symbolized: bool = False
    why: str = "not symbolized"  # when not

    def add(self, crash: Crash) -> None:
        same = next((seen for seen in self.found if seen.title == crash.title), None)
        if same is not None:
            same.count += 1
        elif len(self.found) < MAX_CRASHES:
            self.found.append(crash)
        else:
            self.dropped += 1

    def json(self) -> dict[str, object]:
        return {
            "crashes": [crash.json() for crash in self.found],
            "dropped": self.dropped,
            "symbolized": self.symbolized,
            "why": self.why or None,
        }

    def text(self) -> str:
        """crash-report.txt: each distinct crash as a person reads it."""
        parts = [
            f"== {c.title} ({c.kind}, {c.count} time{'s' * (c.count > 1)})\n" + "\n".join(c.report) for c in self.found
        ]
        return "\n\n".join(parts) + ("\n" if parts else "")


def find(lines: list[str], allow: tuple[str, ...] = ()) -> Crashes:
    """The crashes in the kernel's lines (console or dmesg, time stamps and all), but those whose first line an
    `allow` regex (splat-allow) matches."""
    allowed = [re.compile(pattern) for pattern in allow]
    crashes = Crashes()
    report: list[str] = []
    current: tuple[Kind, re.Match[str]] | None = None
    for raw in lines:
        line = _TIMESTAMP.sub("", printable(raw))[:LINE_CHARS]
        ends = _END.match(line) is not None
        starts = None if ends else _starting(line)
        if current is not None and (ends or (starts is not None and _new(current[0], starts[0]))):
            if ends and len(report) < REPORT_LINES:
                report.append(line)
            _add(crashes, _crash(*current, report), allowed)
            current, report = None, []
            if ends:
                continue
        if current is None:
            if starts is None:
                continue
            current = starts
        if len(report) < REPORT_LINES:
            report.append(line)
    if current is not None:
        _add(crashes, _crash(*current, report), allowed)
    return crashes


def _add(crashes: Crashes, crash: Crash, allowed: list[re.Pattern[str]]) -> None:
    if not any(pattern.search(crash.report[0]) for pattern in allowed):
        crashes.add(crash)


def _starting(line: str) -> tuple[Kind, re.Match[str]] | None:
    for kind in CRASHES:
        found = kind.header.match(line)
        if found:
            return kind, found
    return None


def _new(current: Kind, starting: Kind) -> bool:
    """Whether a header inside a report starts another: an oops's own `Oops:` line, a BUG's and a NULL
    dereference's, belongs to the report it is in; a panic after a crash is a crash of its own (it is titled
    by what it says, "Fatal exception" after an oops)."""
    return not (current.name in ("bug", "oops", "kasan") and starting.name == "oops")


def _crash(kind: Kind, match: re.Match[str], report: list[str]) -> Crash:
    frames = below_the_machinery(_frames(report))
    fields = {name: value for name, value in match.groupdict().items() if value}
    for name, pattern in DETAILS.items():
        found = next((hit for hit in map(pattern.search, report) if hit), None)
        fields.setdefault(name, found[1] if found else "Access")
    function = fields.pop("function", "") or _pointed_at(frames)
    title = kind.title.format(
        function=_bare(function) if function else "?", **{k: _scrub(v) for k, v in fields.items()}
    )
    return Crash(title=" ".join(title.split()), kind=kind.name, frames=tuple(frames), report=tuple(report))


def _frames(report: list[str]) -> list[Frame]:
    """The faulting instruction's frame (`RIP:`, `pc :`), then the trace's, as printed."""
    frames: list[Frame] = []
    for line in report:
        fault = None if frames else _AT_FAULT.search(line)
        found = fault or _FRAME.match(line)
        if found and len(frames) < MAX_FRAMES:
            module = re.search(r"\[(\w{1,64})\]\s*$", line)
            frames.append(Frame(found["function"], found["offset"], module[1] if module else "", at_fault=bool(fault)))
    return frames


def below_the_machinery(frames: list[Frame]) -> list[Frame]:
    """The trace from the first frame that is not the reporting machinery's (KASAN's report starts with
    dump_stack_lvl, print_report, kasan_report; kmemleak's with the allocator, and once symbolized with the
    allocator's functions inlined in the caller): the top frame is the crash's."""
    return frames[next((i for i, frame in enumerate(frames) if _crashing(frame)), 0) :]


def _crashing(frame: Frame) -> bool:
    """The frame is the faulting instruction's, or of no function of the reporting machinery."""
    return frame.at_fault or not _MACHINERY.match(_bare(frame.function))


def _pointed_at(frames: list[Frame]) -> str:
    """The function at the top of a trace below the machinery; "" when the trace is the machinery's only."""
    return frames[0].function if frames and _crashing(frames[0]) else ""


def _bare(function: str) -> str:
    """A function's name without the compiler's clone suffixes (`.isra.0`, `.constprop.0`, `.part.0`, `.cold`)."""
    return function.split(".", 1)[0]


def _scrub(text: str) -> str:
    """A title field without addresses and numbers (they differ between runs of the same crash)."""
    return " ".join(_HEX_OR_NUMBER.sub("", text).split())


def tell(crashes: Crashes, in_actions: bool, workspace: Path | None = None) -> None:
    """One line per distinct crash on stderr (`vngtasks: crash: TITLE (where)`); in GitHub Actions, an error
    annotation each, at the top frame's line when the workspace is a kernel tree that has its file."""
    for crash in crashes.found[:SHOWN_CRASHES]:
        said = f"{crash.title} ({crash.where or 'no frames'})" + (f", {crash.count} times" if crash.count > 1 else "")
        log.info(f"crash: {said}")
        if in_actions:
            top = crash.frames[0] if crash.frames else None
            file, line = (
                (top.file, top.line) if top and top.file and _in_kernel_tree(workspace, top.file) else ("", None)
            )
            log.annotate("error", f"kernel {crash.kind.replace('_', ' ')}", said, file, line)
    more = len(crashes.found) - SHOWN_CRASHES + crashes.dropped
    if more > 0:
        log.info(f"crash: {more} more: see {CRASHES_JSON}")


def _in_kernel_tree(workspace: Path | None, file: str) -> bool:
    if workspace is None or file.startswith("/") or ".." in file.split("/"):
        return False
    return all((workspace / name).is_file() for name in ("Kbuild", "Kconfig", "MAINTAINERS", file))


def summary_markdown(crashes: Crashes) -> str:
    """The step summary's part: each distinct crash, its count and top frames."""
    if not crashes.found:
        return ""
    rows = ["\n#### Kernel crashes\n", "| crash | kind | count | top frames |", "|---|---|---|---|"]
    for crash in crashes.found[:SHOWN_CRASHES]:
        top = "<br>".join(_summary_frame(frame) for frame in crash.frames[:SHOWN_FRAMES])
        rows.append(f"| `{log.table_cell(crash.title)}` | {crash.kind} | {crash.count} | {top} |")
    rows.append(f"\nEvery report: {CRASHES_JSON} and {CRASH_REPORT} in log-dir.")  # ends the table
    return "\n".join(rows) + "\n"


def _summary_frame(frame: Frame) -> str:
    code = f"`{log.table_cell(frame.function if frame.file else frame.place)}`"
    return f"{code} {log.table_cell(frame.place)}" if frame.file else code
