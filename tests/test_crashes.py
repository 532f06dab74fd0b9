"""Crash reports from a kernel's lines (vngtasks/report/crashes.py): kinds, titles, counts, frames, bounds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vngtasks import arches
from vngtasks.report import crashes, symbolize

DATA = Path(__file__).parent / "data" / "crashes"


def found(text: str, allow: tuple[str, ...] = ()) -> crashes.Crashes:
    return crashes.find(text.splitlines(), allow)


def test_two_identical_warnings_are_one_crash_counted_twice_titled_without_pids_or_addresses():
    (crash,) = found((DATA / "warning-twice-x86_64.txt").read_text()).found
    assert (crash.title, crash.kind, crash.count) == ("WARNING in lkdtm_WARNING", "warning", 2)
    # The faulting instruction's frame, then the trace's but the guessed (`? `) ones; the report is the first
    # one's, ending at the kernel's end line.
    assert [f.function for f in crash.frames][:3] == ["lkdtm_WARNING", "lkdtm_do_action", "direct_entry"]
    assert crash.report[0].startswith("WARNING: CPU: 1 PID: 83 at drivers/misc/lkdtm/bugs.c:111")
    assert crash.report[-1] == "---[ end trace 0000000000000000 ]---"


def test_an_oops_is_titled_by_the_faulting_function_and_the_panic_after_it_is_a_crash_of_its_own():
    oops, panic = found((DATA / "null-deref-then-panic-x86_64.txt").read_text()).found
    assert (oops.title, oops.kind, oops.count) == ("BUG: kernel NULL pointer dereference in lkdtm_EXCEPTION", "oops", 1)
    assert "Oops: Oops: 0002 [#1] PREEMPT SMP NOPTI" in oops.report  # one report, not two
    assert (panic.title, panic.kind) == ("kernel panic: Fatal exception", "panic")
    assert panic.report[-1].startswith("---[ end Kernel panic")


@pytest.mark.parametrize(
    ("lines", "title", "kind"),
    [
        (
            [
                "kernel BUG at drivers/misc/lkdtm/bugs.c:104!",
                "Oops: invalid opcode: 0000 [#1] PREEMPT SMP NOPTI",
                "RIP: 0010:lkdtm_BUG+0x5/0x10",
            ],
            "kernel BUG in lkdtm_BUG",
            "bug",
        ),
        (
            [
                "BUG: KASAN: slab-use-after-free in lkdtm_READ_AFTER_FREE+0x1e5/0x230",
                "Read of size 4 at addr ffff888003f2c5a0 by task sh/85",
            ],
            "KASAN: slab-use-after-free Read in lkdtm_READ_AFTER_FREE",
            "kasan",
        ),
        (
            [
                "UBSAN: array-index-out-of-bounds in drivers/misc/lkdtm/bugs.c:422:16",
                "index 8 is out of range for type 'char [8]'",
                "Call Trace:",
                " dump_stack_lvl+0x5d/0x80",
                " __ubsan_handle_out_of_bounds+0xa6/0xe0",
                " lkdtm_ARRAY_BOUNDS+0x1b4/0x1c0",
            ],
            "UBSAN: array-index-out-of-bounds in lkdtm_ARRAY_BOUNDS",
            "ubsan",
        ),
        (
            [
                "Unable to handle kernel NULL pointer dereference at virtual address 0000000000000000",
                "pc : lkdtm_EXCEPTION+0x14/0x28",
            ],
            "BUG: NULL pointer dereference in lkdtm_EXCEPTION",
            "oops",
        ),
        (
            [
                "INFO: task sh:83 blocked for more than 122 seconds.",
                " __schedule+0x2f1/0x8a0",
                " schedule+0x27/0x90",
                " lkdtm_HUNG_TASK+0x17/0x20",
            ],
            "INFO: task hung in lkdtm_HUNG_TASK",
            "hung_task",
        ),
        (
            ["Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009"],
            "kernel panic: Attempted to kill init!",
            "panic",
        ),
        (
            ["WARNING: CPU: 0 PID: 1 at kernel/foo.c:3 helper.isra.0+0x1/0x2 [somemod]"],
            "WARNING in helper",
            "warning",
        ),
    ],
)  # fmt: skip
def test_each_kind_is_titled_as_syzbot_titles_it(lines: list[str], title: str, kind: str):
    (crash,) = crashes.find([f"[  12.345678] {line}" for line in lines]).found
    assert (crash.title, crash.kind) == (title, kind)


def test_an_allowed_crash_is_left_out_and_lines_a_program_wrote_are_not_read_here():
    text = (DATA / "warning-twice-x86_64.txt").read_text()
    assert found(text, (r" lkdtm_WARNING\+",)).found == []
    assert found("lkdtm: WARNING: CPU: 0 PID: 1 at x.c:1 f+0x1/0x2\n").found == []  # not at a line's start


def test_what_the_guest_prints_is_bounded_and_cleaned():
    many = [f"WARNING: CPU: 0 PID: 1 at a.c:1 f{n}+0x1/0x2" for n in range(crashes.MAX_CRASHES + 5)]
    result = crashes.find(many)
    assert (len(result.found), result.dropped) == (crashes.MAX_CRASHES, 5)
    long = ["WARNING: CPU: 0 PID: 1 at a.c:1 f+0x1/0x2", *(["\x1b[2J x" * 500] * (crashes.REPORT_LINES + 10))]
    (crash,) = crashes.find(long).found
    assert len(crash.report) == crashes.REPORT_LINES and "\x1b" not in "".join(crash.report)
    assert max(map(len, crash.report)) <= crashes.LINE_CHARS


def test_crashes_json_and_the_report_text():
    result = found((DATA / "null-deref-then-panic-x86_64.txt").read_text())
    record = json.loads(json.dumps(result.json()))
    assert record["crashes"][0]["title"] == "BUG: kernel NULL pointer dereference in lkdtm_EXCEPTION"
    assert record["crashes"][0]["frames"][0] == {
        "function": "lkdtm_EXCEPTION",
        "offset": "0xd/0x20",
        "module": None,
        "file": None,
        "line": None,
        "inlined": False,
    }
    assert record["symbolized"] is False and record["why"]
    text = result.text()
    assert text.startswith("== BUG: kernel NULL pointer dereference in lkdtm_EXCEPTION (oops, 1 time)\n")
    assert "RIP: 0010:lkdtm_EXCEPTION+0xd/0x20" in text


def test_told_on_stderr_as_annotations_and_in_the_summary(capsys):
    result = found((DATA / "warning-twice-x86_64.txt").read_text())
    crashes.tell(result, in_actions=True)
    out, err = capsys.readouterr()
    assert "vngtasks: crash: WARNING in lkdtm_WARNING (lkdtm_WARNING+0x1d/0x30), 2 times" in err
    assert out.startswith("::error title=kernel warning::WARNING in lkdtm_WARNING")
    summary = crashes.summary_markdown(result)
    assert "| `WARNING in lkdtm_WARNING` | warning | 2 | `lkdtm_WARNING+0x1d/0x30`<br>" in summary


PROGRAM = """\
static volatile int sink;

static inline __attribute__((always_inline)) void inner(void)
{
\tsink = 1;  /* line 5 */
}

__attribute__((noinline)) void outer(void)
{
\tinner();
\tsink = 2;
}

int main(void)
{
\touter();  /* line 16 */
\treturn 0;
}
"""


@pytest.mark.integration
def test_frames_are_symbolized_with_the_entrys_debug_info_inlined_frames_included(tmp_path: Path):
    """An entry as a build keeps it (vmlinux.zst, System.map, metadata's tree), here of a small program built with
    -g: the fault's frame names the inlined function's line, then its caller's; a return address names the line
    of the call. What is not in System.map stays as printed."""
    tree = tmp_path / "tree"
    (tree / "drivers" / "x").mkdir(parents=True)
    (tree / "drivers" / "x" / "p.c").write_text(PROGRAM)
    entry = tmp_path / "entry"
    entry.mkdir()
    subprocess.run(["gcc", "-g", "-O2", "-o", entry / "vmlinux", "drivers/x/p.c"], cwd=tree, check=True)
    nm = subprocess.run(["nm", entry / "vmlinux"], capture_output=True, text=True, check=True).stdout
    (entry / "System.map").write_text(nm)
    subprocess.run(["zstd", "-q", "--rm", entry / "vmlinux", "-o", entry / "vmlinux.zst"], check=True)
    (entry / "metadata.json").write_text(json.dumps({"tree": str(tree)}))
    outer = _offset_of_store(entry, "outer", value=1)
    main_call = _offset_after_call(entry, "main")
    report = [
        "WARNING: CPU: 0 PID: 1 at drivers/x/p.c:5 outer+0x0/0x20",
        f"RIP: 0010:outer+{outer:#x}/0x20",
        "Call Trace:",
        f" main+{main_call:#x}/0x20",
        " unknown_function+0x1/0x2",
    ]
    found = crashes.find(report)
    symbolize.symbolize(found, entry, arches.host(), arches.host())
    assert found.symbolized and found.why == "", found.why
    places = [(f.function, f.file, f.line, f.inlined) for f in found.found[0].frames]
    assert places == [
        ("inner", "drivers/x/p.c", 5, True),
        ("outer", "drivers/x/p.c", 10, False),
        ("main", "drivers/x/p.c", 16, False),
        ("unknown_function", None, None, False),
    ]
    assert found.found[0].where == "drivers/x/p.c:5"


MODULE = """\
static volatile int sink;

__attribute__((noinline)) void helper(int n)
{
\tsink = n;  /* line 5 */
}

__attribute__((section(".init.text"), noinline)) int m_init(void)
{
\thelper(4);  /* line 10 */
\treturn sink;
}
"""


@pytest.mark.integration
def test_a_modules_frames_are_symbolized_with_its_ko_in_the_entry(tmp_path: Path):
    """A module as an entry keeps it (its .ko where modules.order names it; `-` in a file name is `_` in a trace),
    here an object built with -g whose init function is in .init.text as a module's is: each frame at its line of
    its own section. A module the entry has not, or whose .ko is a link, stays as printed."""
    tree = tmp_path / "tree"
    (tree / "drivers" / "x").mkdir(parents=True)
    (tree / "drivers" / "x" / "p.c").write_text(PROGRAM)
    (tree / "drivers" / "x" / "m.c").write_text(MODULE)
    entry = tmp_path / "entry"
    (entry / "drivers" / "x").mkdir(parents=True)
    subprocess.run(["gcc", "-g", "-O2", "-o", entry / "vmlinux", "drivers/x/p.c"], cwd=tree, check=True)
    subprocess.run(["zstd", "-q", "--rm", entry / "vmlinux", "-o", entry / "vmlinux.zst"], check=True)
    module = "drivers/x/m-mod.ko"
    subprocess.run(["gcc", "-g", "-O2", "-c", "-o", entry / module, "drivers/x/m.c"], cwd=tree, check=True)
    (entry / "drivers" / "x" / "linked.ko").symlink_to(entry / module)
    (entry / "modules.order").write_text("drivers/x/m-mod.o\ndrivers/x/linked.o\n")
    (entry / "System.map").write_text("")
    (entry / "metadata.json").write_text(json.dumps({"tree": str(tree)}))
    store = _offset_of_store(entry, "helper", module)
    call = _offset_after_call(entry, "m_init", module)
    report = [
        "WARNING: CPU: 0 PID: 1 at drivers/x/m.c:5 helper+0x0/0x10 [m_mod]",
        f"RIP: 0010:helper+{store:#x}/0x10 [m_mod]",
        "Call Trace:",
        f" m_init+{call:#x}/0x20 [m_mod]",
        f" m_init+{call:#x}/0x20 [linked]",
        f" m_init+{call:#x}/0x20 [absent]",
    ]
    found = crashes.find(report)
    symbolize.symbolize(found, entry, arches.host(), arches.host())
    places = [(f.function, f.module, f.file, f.line) for f in found.found[0].frames]
    assert places == [
        ("helper", "m_mod", "drivers/x/m.c", 5),
        ("m_init", "m_mod", "drivers/x/m.c", 10),
        ("m_init", "linked", None, None),
        ("m_init", "absent", None, None),
    ]


def test_without_debug_info_frames_stay_as_printed_and_the_report_says_why(tmp_path: Path):
    found = crashes.find(["WARNING: CPU: 0 PID: 1 at a.c:1 f+0x1/0x2", "RIP: 0010:f+0x1/0x2"])
    symbolize.symbolize(found, tmp_path / "vmlinuz-6.1.0-57-amd64", arches.host(), arches.host())
    assert not found.symbolized and "no debug info" in found.why
    assert found.json()["crashes"][0]["frames"][0]["file"] is None


def _function_lines(entry: Path, function: str, module: str = "") -> list[tuple[int, str]]:
    """(offset, instruction) of `function` in the program (or in the entry's `module`), from objdump."""
    binary = entry / "unpacked" if not module else entry / module
    if not module:
        subprocess.run(["zstd", "-q", "-d", "-f", entry / "vmlinux.zst", "-o", binary], check=True)
    dump = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", f"--disassemble={function}", binary],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = [line.split(":", 1) for line in dump.splitlines() if line.startswith("  ") and ":" in line]
    start = int(rows[0][0], 16)
    return [(int(address, 16) - start, text.strip()) for address, text in rows]


def _offset_of_store(entry: Path, function: str, module: str = "", value: int | None = None) -> int:
    """The offset of the instruction storing to `sink` (a static: %rip-relative) in `function` (`value`, when
    given)."""
    lines = _function_lines(entry, function, module)
    stored = f"${value:#x}," if value is not None else ""
    return next(offset for offset, text in lines if text.startswith("mov") and stored in text and "(%rip)" in text)


def _offset_after_call(entry: Path, function: str, module: str = "") -> int:
    """The return address of `function`'s call: the offset just after it."""
    lines = _function_lines(entry, function, module)
    index = next(i for i, (_, text) in enumerate(lines) if text.startswith("call"))
    return lines[index + 1][0]


@pytest.mark.parametrize(
    ("file", "tree", "expected"),
    [
        ("/w/ci/linux/drivers/misc/lkdtm/bugs.c", "/w/ci/linux", "drivers/misc/lkdtm/bugs.c"),
        # ccache's object, first compiled in another work tree (under /var/lib: `lib` is no tree's start here)
        (
            "/var/lib/t/cache/work/act-x86_64/linux/drivers/misc/lkdtm/bugs.c",
            "/w/ci/linux",
            "drivers/misc/lkdtm/bugs.c",
        ),
        ("/var/lib/t/work/linux/include/linux/list.h", "", "include/linux/list.h"),
        ("/elsewhere/kernel/fork.c", "/w/ci/linux", "/elsewhere/kernel/fork.c"),
        ("./include/linux/slab.h", "/w/ci/linux", "include/linux/slab.h"),  # a module's
    ],
)
def test_a_symbolized_file_is_named_as_the_kernel_tree_names_it(file: str, tree: str, expected: str):
    assert symbolize._in_tree(file, tree) == expected


def test_an_annotation_points_at_the_line_when_the_workspace_is_a_kernel_tree_holding_the_file(tmp_path, capsys):
    found = crashes.find(["WARNING: CPU: 0 PID: 1 at a.c:1 f+0x1/0x2", "RIP: 0010:f+0x1/0x2"])
    found.found[0].frames = (crashes.Frame("f", "0x1/0x2", file="drivers/x/p.c", line=7),)
    for name in ("Kbuild", "Kconfig", "MAINTAINERS", "drivers/x/p.c"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    crashes.tell(found, in_actions=True, workspace=tmp_path)
    crashes.tell(found, in_actions=True, workspace=tmp_path / "drivers")  # not a kernel tree
    at_line, plain = capsys.readouterr().out.splitlines()
    assert at_line.startswith("::error file=drivers/x/p.c,line=7,title=kernel warning::WARNING in f (drivers/x/p.c:7)")
    assert plain.startswith("::error title=kernel warning::")


def test_kasans_report_and_kmemleaks_leaks_start_their_traces_below_the_machinery():
    """A real KASAN report and two of kmemleak's leaks (a debug kernel's console: LKDTM's READ_AFTER_FREE, then
    kmemleak's sample module loaded; its lines each start `kmemleak: `): frames from the crash's own function
    (not dump_stack_lvl, print_report, kasan_report; not the allocator), the leaks one crash counted twice, its
    report ended by kmemleak's count of new leaks."""
    text = (DATA / "kasan-then-kmemleak-x86_64.txt").read_text() + "[   39.6] after_the_scan+0x1/0x2\n"
    kasan, leak = found(text).found
    assert (kasan.title, kasan.kind, kasan.count) == ("KASAN: slab-use-after-free Read in lkdtm_READ_AFTER_FREE",
                                                      "kasan", 1)  # fmt: skip
    assert [frame.function for frame in kasan.frames[:2]] == ["lkdtm_READ_AFTER_FREE", "lkdtm_do_action"]
    assert (leak.title, leak.kind, leak.count) == ("memory leak in kmemleak_test_init", "kmemleak", 2)
    top = leak.frames[0]
    assert (top.function, top.offset, top.module) == ("kmemleak_test_init", "0x57/0x569", "kmemleak_test")
    assert leak.frames[-1].function == "entry_SYSCALL_64_after_hwframe"
    (last,) = found(text[text.index("[   39.166473]") :]).found  # the last leak: its report ends at the count
    assert last.report[-1].startswith("kmemleak: 14 new suspected memory leaks")
    assert "after_the_scan" not in [frame.function for frame in last.frames]


def test_binutils_programs_are_the_kernel_arch_s_this_machine_s_the_cross_one_or_llvm_s(tmp_path: Path, monkeypatch):
    """The host's own objdump for its arch; a cross build's from its cross binutils, else LLVM's (which reads
    every arch); none when neither is there."""
    for name in ("objdump", "aarch64-linux-gnu-addr2line", "llvm-objdump"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    host, arm64, s390x = arches.lookup("x86_64"), arches.lookup("arm64"), arches.lookup("s390x")
    assert symbolize.binutils_program("objdump", host, host) == str(tmp_path / "objdump")
    assert symbolize.binutils_program("addr2line", arm64, host) == str(tmp_path / "aarch64-linux-gnu-addr2line")
    assert symbolize.binutils_program("objdump", s390x, host) == str(tmp_path / "llvm-objdump")
    assert symbolize.binutils_program("addr2line", s390x, host) is None
