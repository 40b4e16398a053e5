"""The KTAP parser on recorded KUnit consoles (tests/unit/data/ktap/) and on odd or hostile input."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hypervisor.ci.ktap import KtapParser, Status, parse_ktap_text, walk_leaves

DATA = Path(__file__).parent / "data" / "ktap"


def recorded(name: str) -> str:
    return (DATA / f"{name}.log").read_text()


def leaves(text: str) -> dict[str, Status]:
    result = parse_ktap_text(text)
    return {".".join(path): leaf.status for test in result.tests for path, leaf in walk_leaves(test)}


def test_all_pass_with_printk_timestamps() -> None:
    result = parse_ktap_text(recorded("all_pass"))
    assert result.found and result.version == "KTAP version 1" and result.plan == 3 and result.complete
    assert [test.name for test in result.tests] == ["kunit_executor_test", "list-kunit-test", "cmdline"]
    assert result.status is Status.PASSED and result.crash is None and not result.all_errors()
    assert result.counts.describe() == "Ran 9 tests: passed: 9"
    # The per-suite counts line KUnit prints after its cases is that suite's log.
    assert "# cmdline: pass:2 fail:0 skip:0 total:2" in result.tests[2].log


def test_failures_carry_their_expectation_messages() -> None:
    result = parse_ktap_text(recorded("failures"))
    assert result.complete and result.status is Status.FAILED
    assert result.counts.describe() == "Ran 5 tests: passed: 3, failed: 2"
    suite = result.tests[0]
    assert suite.status is Status.FAILED and suite.counts.failed == 1
    failed = suite.subtests[1]
    assert failed.name == "list_test_list_add" and failed.status is Status.FAILED
    assert failed.log == [
        "# list_test_list_add: EXPECTATION FAILED at lib/list-test.c:54",
        "Expected list.next == &b, but",
        "    list.next == ffff888003a1fe40",
        "    &b == ffff888003a1fe50",
    ]
    assert suite.subtests[2].log == []  # the next test starts with a clean log


def test_skips_ok_or_not_ok_with_their_reasons() -> None:
    result = parse_ktap_text(recorded("skips"))
    assert result.counts.describe() == "Ran 4 tests: passed: 1, skipped: 3"
    assert result.status is Status.PASSED  # skips fail nothing
    variables = result.tests[0].subtests[1]
    assert variables.directive == "SKIP" and variables.reason == "needs CONFIG_BITFIELD_KUNIT_EXTRA"
    assert result.tests[0].subtests[2].status is Status.SKIPPED  # `not ok ... # SKIP` is a skip too
    assert result.tests[1].status is Status.SKIPPED and result.tests[1].counts.skipped == 1


def test_nested_parameterized_cases() -> None:
    found = leaves(recorded("nested"))
    assert found["kunit-example-test.example_params_test.example value 0"] is Status.SKIPPED
    assert found["kunit-example-test.example_param_fail.case b"] is Status.FAILED
    assert found["qos-kunit-test.freq_qos_test_min"] is Status.PASSED
    result = parse_ktap_text(recorded("nested"))
    params = result.tests[0].subtests[1]
    assert params.plan is None and len(params.subtests) == 3  # KUnit prints no plan for parameters
    assert result.counts.describe() == "Ran 7 tests: passed: 5, failed: 1, skipped: 1" and result.complete


def test_the_specifications_example() -> None:
    result = parse_ktap_text(recorded("spec_example"))
    (main,) = result.tests
    assert main.name == "main_test" and main.status is Status.FAILED
    assert [test.name for test in main.subtests] == ["example_test_1", "example_test_2", "example_test_3"]
    assert [test.status for test in main.subtests] == [Status.PASSED, Status.PASSED, Status.FAILED]
    assert main.subtests[0].subtests[0].log == ["# test_1: initializing test_1"]
    assert main.subtests[2].subtests[1].log == ["# test_2: FAIL"]
    assert result.counts.describe() == "Ran 6 tests: passed: 3, failed: 1, skipped: 2"


def test_a_crash_mid_test_names_the_running_test_and_keeps_the_oops() -> None:
    result = parse_ktap_text(recorded("crashed"))
    assert not result.complete and result.status is Status.CRASHED
    assert result.crash == "BUG: kernel NULL pointer dereference, address: 0000000000000008"
    hlist = result.tests[1]
    assert hlist.name == "hlist" and hlist.status is Status.CRASHED
    running = hlist.subtests[1]
    assert running.status is Status.CRASHED and running.errors == ["the output ended while it ran"]
    assert running.log[0].startswith("BUG: kernel NULL pointer") and "Kernel panic" in running.log[-1]
    assert [test.status for test in hlist.subtests[2:]] == [Status.CRASHED, Status.CRASHED]
    assert result.tests[2].name == "suite 3" and result.tests[2].status is Status.CRASHED  # never began
    assert result.counts.passed == 3 and result.counts.crashed == 4


def test_truncated_output_and_a_line_cut_in_half() -> None:
    result = parse_ktap_text(recorded("truncated"))
    assert not result.complete and result.status is Status.CRASHED
    cmdline = result.tests[1]
    assert [test.name for test in cmdline.subtests][:2] == ["cmdline_test_noint", "cmdline_test_lead_int"]
    # "ok 3 - cmdline_te" had no newline: the console stopped in it, so it is no result.
    assert cmdline.subtests[2].status is Status.CRASHED and cmdline.subtests[2].log == ["ok 3 - cmdline_te"]
    assert result.counts.passed == 3


def test_a_missing_plan_is_reported() -> None:
    result = parse_ktap_text(recorded("missing_plan"))
    assert result.missing_plan and not result.complete and result.counts.passed == 1
    assert any("no test plan" in error for error in result.errors)


def test_interleaved_kernel_messages_and_crlf() -> None:
    result = parse_ktap_text(recorded("interleaved"))
    assert result.complete and result.status is Status.PASSED and not result.all_errors()
    assert result.counts.describe() == "Ran 3 tests: passed: 3"
    add = result.tests[0].subtests[1]
    assert add.log[1].startswith("WARNING: CPU: 0 PID: 15") and result.crash is None
    assert "Run /init as init process" not in str(result.tests[1].log)  # after the document ended


def test_no_ktap_at_all() -> None:
    result = parse_ktap_text(recorded("no_ktap"))
    assert not result.found and result.status is Status.NO_TESTS and result.tests == []


def test_streamed_in_odd_chunks_is_the_same_as_whole() -> None:
    text = recorded("nested")
    parser = KtapParser()
    for start in range(0, len(text), 13):
        parser.feed(text[start : start + 13])
    streamed = parser.finish()
    assert streamed == parse_ktap_text(text)
    assert parser.complete


def test_completion_is_known_as_the_last_result_arrives() -> None:
    parser = KtapParser()
    for line in ["KTAP version 1", "1..1", "    KTAP version 1", "    # Subtest: s", "    1..1", "    ok 1 - a"]:
        parser.feed_line(line)
        assert not parser.complete
    parser.feed_line("ok 1 - s")
    assert parser.complete


def test_old_tap14_output_with_tabs() -> None:
    text = "TAP version 14\n1..1\n\t# Subtest: example\n\t1..2\n\tok 1 - a\n\tnot ok 2 - b\nnot ok 1 - example\n"
    result = parse_ktap_text(text)
    assert result.version == "TAP version 14" and result.complete
    assert [(test.name, test.status) for test in result.tests[0].subtests] == [
        ("a", Status.PASSED),
        ("b", Status.FAILED),
    ]


def test_printk_caller_and_level_prefixes() -> None:
    text = "<6>[    1.000000][    T1] KTAP version 1\n<6>[    1.000001][    T1] 1..1\n[    1.2][  T1] ok 1 lone\n"
    result = parse_ktap_text(text)
    assert result.complete and [(t.name, t.status) for t in result.tests] == [("lone", Status.PASSED)]


@pytest.mark.parametrize(
    "line,status,directive,reason",
    [
        ("ok 1 t # SKIP", Status.SKIPPED, "SKIP", ""),
        ("ok 1 t # skipped: no hardware", Status.SKIPPED, "SKIP", "no hardware"),
        ("not ok 1 t # TODO not done", Status.SKIPPED, "TODO", "not done"),
        ("not ok 1 t # XFAIL known", Status.SKIPPED, "XFAIL", "known"),
        ("not ok 1 t # TIMEOUT 30 seconds", Status.FAILED, "TIMEOUT", "30 seconds"),
        ("not ok 1 t # ERROR no device", Status.CRASHED, "ERROR", "no device"),
        ("ok 1 t # rcode=0", Status.PASSED, None, "rcode=0"),
        ("ok 1 - t", Status.PASSED, None, ""),
    ],
)
def test_result_directives(line: str, status: Status, directive: str | None, reason: str) -> None:
    (test,) = parse_ktap_text(f"KTAP version 1\n1..1\n{line}\n").tests
    assert (test.name, test.status, test.directive, test.reason) == ("t", status, directive, reason)


def test_inconsistent_output_is_counted_as_errors() -> None:
    text = "\n".join([
        "KTAP version 1", "1..2",
        "  KTAP version 1", "  # Subtest: s", "  1..1", "  not ok 1 c",
        "ok 1 other",  # the header said s; and ok despite a failing case
        "ok 3 t",  # numbered 3, expected 2
        "",
    ])  # fmt: skip
    result = parse_ktap_text(text)
    errors = result.all_errors()
    assert any("result line names 'other', its header 's'" in error for error in errors)
    assert any("says ok, but 1 of its tests failed" in error for error in errors)
    assert any("numbered 3, expected 2" in error for error in errors)
    assert result.tests[0].status is Status.FAILED and result.status is Status.FAILED
    assert result.counts.errors == 3


def test_a_suite_that_fails_by_itself_counts_as_a_failure() -> None:
    result = parse_ktap_text("KTAP version 1\n1..1\n  KTAP version 1\n  1..1\n  ok 1 c\nnot ok 1 s\n")
    assert result.status is Status.FAILED and result.counts.failed == 1 and result.counts.passed == 1


def test_an_empty_plan_means_no_tests() -> None:
    result = parse_ktap_text("KTAP version 1\n1..0\n")
    assert result.complete and result.status is Status.NO_TESTS and result.counts.total == 0


def test_a_second_document_ends_the_first() -> None:
    result = parse_ktap_text("KTAP version 1\n1..2\nok 1 a\nKTAP version 1\n1..1\nok 1 b\nok 2 c\n")
    assert [test.name for test in result.tests] == ["a", "suite 2"] and not result.complete
    assert any("a second KTAP document" in error for error in result.errors)


def test_a_version_line_inside_a_message_starts_nothing() -> None:
    assert not parse_ktap_text("kunit: expected KTAP version 1\n").found


def test_logs_are_bounded() -> None:
    text = "KTAP version 1\n1..1\n" + "chatter\n" * 10_000 + "ok 1 t\n"
    (test,) = parse_ktap_text(text).tests
    assert len(test.log) == 501 and test.log[-1] == "[pyhv: further lines left out]"


def test_garbage_never_raises() -> None:
    generator = random.Random(9)
    pieces = ["KTAP version 1", "1..", "1..3", "ok", "not ok 1", "ok 2 - x # SKIP", "  ", "\t", "# Subtest: ", "#",
              "\x00", "\xff", "Kernel panic - not syncing", "TAP version 99", "ok 99999999999999999999 y"]  # fmt: skip
    for _ in range(300):
        text = "".join(generator.choice(pieces) + generator.choice(["", "\n", "\r\n", " "]) for _ in range(40))
        result = parse_ktap_text(text)
        assert result.counts.total >= 0
        result.all_errors()


def test_hostile_nesting_is_bounded() -> None:
    from hypervisor.ci.kunit_report import junit_xml, kunit_json, summary_lines, tap_text

    text = "KTAP version 1\n1..1\n" + "".join(" " * depth + "KTAP version 1\n" for depth in range(1, 3000))
    result = parse_ktap_text(text + "ok 1 deep\n")
    assert any("nested deeper than 16 levels" in error for error in result.errors)
    for writer in (junit_xml, kunit_json, summary_lines, tap_text):  # no RecursionError anywhere
        writer(result)


def test_an_endless_line_is_taken_in_bounded_pieces() -> None:
    parser = KtapParser()
    parser.feed("KTAP version 1\n1..1\n")
    for _ in range(100):
        parser.feed("x" * 1000)  # never a newline
    parser.feed("\nok 1 t\n")
    result = parser.finish()
    assert result.complete and result.tests[0].status is Status.PASSED
    assert all(len(line) <= 4096 for line in result.tests[0].log)
