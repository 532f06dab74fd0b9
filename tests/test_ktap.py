"""KTAP and TAP as kselftest and KUnit print them, parsed into the cases a report counts."""

from __future__ import annotations

from vngtasks.report import ktap

KUNIT = """\
[    1.000000] KTAP version 1
[    1.000001] 1..2
[    1.100000]     KTAP version 1
[    1.100001]     # Subtest: list-kunit-test
[    1.100002]     # module: list_test
[    1.100003]     1..3
[    1.200000]     ok 1 list_test_list_init
[    1.200001]     # list_test_list_add: EXPECTATION FAILED at lib/list-test.c:32
[    1.200002]     not ok 2 list_test_list_add
[    1.200003]     ok 3 list_test_x # SKIP not on this arch
[    1.300000] # list-kunit-test: pass:1 fail:1 skip:1 total:3
[    1.300001] not ok 1 list-kunit-test
[    1.400000]     # Subtest: bitfield
[    1.400001]     1..1
[    1.400002]     ok 1 test_bitfields_constants
[    1.500000] ok 2 bitfield
"""

KSELFTEST = """\
TAP version 13
1..3
# timeout set to 45
# selftests: size: get_size
# TAP version 13
# 1..1
# # System runtime memory report (units in Kilobytes):
# ok 1 get runtime memory use
# # Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:0
ok 1 selftests: size: get_size
# selftests: timers: posix_timers
# TAP version 13
# 1..3
# ok 1 Check itimer virtual
# not ok 2 Check itimer prof
# not ok 3 Check timer_create # TODO flaky under emulation
not ok 2 selftests: timers: posix_timers # exit=1
ok 3 selftests: breakpoints: breakpoint_test # SKIP no hardware breakpoints
"""


def cases(text: str) -> dict[str, tuple[str, str]]:
    return {case.id: (case.test.status, case.test.reason) for case in ktap.leaves(ktap.parse(text))}


def test_kunit_on_the_console_nested_by_indentation() -> None:
    found = ktap.leaves(ktap.parse(KUNIT))
    assert [(c.id, c.suite, c.test.status) for c in found] == [
        ("list-kunit-test/list_test_list_init", "list-kunit-test", "pass"),
        ("list-kunit-test/list_test_list_add", "list-kunit-test", "fail"),
        ("list-kunit-test/list_test_x", "list-kunit-test", "skip"),
        ("bitfield/test_bitfields_constants", "bitfield", "pass"),
    ]
    assert found[1].test.diagnostics == ["list_test_list_add: EXPECTATION FAILED at lib/list-test.c:32"]
    assert found[2].test.reason == "not on this arch"


def test_kselftest_nests_a_programs_tap_under_hashes() -> None:
    assert cases(KSELFTEST) == {
        "selftests: size: get_size/get runtime memory use": ("pass", ""),
        "selftests: timers: posix_timers/Check itimer virtual": ("pass", ""),
        "selftests: timers: posix_timers/Check itimer prof": ("fail", ""),
        "selftests: timers: posix_timers/Check timer_create": ("xfail", "flaky under emulation"),
        "selftests: breakpoints: breakpoint_test": ("skip", "no hardware breakpoints"),
    }
    (size,) = ktap.parse(KSELFTEST)[:1]
    assert size.subtests[0].diagnostics == ["System runtime memory report (units in Kilobytes):"]
    assert size.diagnostics == ["timeout set to 45", "selftests: size: get_size"]


def test_several_documents_one_after_another() -> None:
    text = "TAP version 13\n1..1\nok 1 first\nKTAP version 1\n1..2\nok 1 second\nnot ok 2 third\n"
    assert cases(text) == {"first": ("pass", ""), "second": ("pass", ""), "third": ("fail", "")}


def test_a_missing_result_is_an_error_never_a_pass() -> None:
    cut = "KTAP version 1\n1..3\nok 1 a\n    # Subtest: b\n    1..2\n    ok 1 b1\n"
    assert cases(cut) == {
        "a": ("pass", ""),
        "b/b1": ("pass", ""),
        "b/test 2": ("error", "no result: crashed or cut off"),
        "b": ("error", "no result: crashed or cut off while running"),
        "test 3": ("error", "no result: crashed or cut off"),
    }


def test_bail_out_ends_the_document_with_errors_for_what_is_left() -> None:
    text = "TAP version 14\n1..3\nok 1 a\nBail out! no device\n"
    assert cases(text) == {
        "a": ("pass", ""),
        "test 2": ("error", "no result: bail out: no device"),
        "test 3": ("error", "no result: bail out: no device"),
    }


def test_garbage_between_lines_and_a_crash_in_the_middle() -> None:
    text = (
        "random noise before\nKTAP version 1\n1..2\nsome program output\n    # Subtest: s\n    1..2\n"
        "    ok 1 s1\n[   12.5] BUG: kernel NULL pointer dereference, address: 0000000000000000\n"
        "[   12.6] Kernel panic - not syncing: Fatal exception\n"
    )
    found = {case.id: case.test for case in ktap.leaves(ktap.parse(text))}
    assert found["s/s1"].status == "pass" and found["s/test 2"].status == "error"
    assert found["s"].status == "error" and found["test 2"].status == "error"
    assert "BUG: kernel NULL pointer dereference, address: 0000000000000000" in found["s/test 2"].diagnostics
    assert found["s"].diagnostics == ["some program output"]


def test_durations_and_ids_that_are_one_path_part_each() -> None:
    text = "TAP version 13\n1..1\n# time=1500ms\nok 1 a/b \x1b[31mred\n"
    (case,) = ktap.leaves(ktap.parse(text))
    assert case.id == "a_b red" and case.test.seconds == 1.5


def test_what_a_parse_keeps_is_bounded() -> None:
    """A stream is what a guest printed: nesting deeper than MAX_DEPTH is diagnostics, a test keeps its last
    DIAGNOSTIC_LINES lines, a line is cut, a plan announces at most MAX_PLANNED tests."""
    deep = "".join(f"{'    ' * depth}# Subtest: s{depth}\n" for depth in range(40)) + "    " * 40 + "ok 1 bottom\n"
    parsed = ktap.parse("KTAP version 1\n1..1\n" + deep)
    depth, test = 0, parsed[0]
    while test.subtests:
        depth, test = depth + 1, test.subtests[0]
    assert depth <= ktap.MAX_DEPTH
    noise = "".join(f"line {n} {'x' * 5000}\n" for n in range(1000))
    (case,) = ktap.leaves(ktap.parse(f"TAP version 13\n1..1\n{noise}not ok 1 t\n"))
    assert len(case.test.diagnostics) == ktap.DIAGNOSTIC_LINES and case.test.diagnostics[-1].startswith("line 999 ")
    assert max(map(len, case.test.diagnostics)) <= ktap.LINE_CHARS
    assert len(ktap.parse("TAP version 13\n1..999999999999\n")) == ktap.MAX_PLANNED
