"""KUnit writers (summary, JUnit XML, TAP, kunit.py JSON) and the verdict, on recorded consoles."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from hypervisor.ci import kunit_report
from hypervisor.ci.ktap import Status, parse_ktap_text, walk_leaves
from hypervisor.ci.kunit_verdict import kunit_verdict
from hypervisor.outcome import Outcome, OutcomeKind

DATA = Path(__file__).parent / "data" / "ktap"
RECORDED = sorted(path.stem for path in DATA.glob("*.log"))
# kunit.py's kunit_json.py: the keys of every group, and of its "misc" counts.
GROUP_KEYS = {"name", "sub_groups", "test_cases", "misc", "arch", "defconfig", "build_environment", "lab_name",
              "kernel", "job", "git_branch"}  # fmt: skip
MISC_KEYS = {"tests", "passed", "failed", "crashed", "skipped", "errors"}
RESET = Outcome(OutcomeKind.RESET, "the guest reset the machine through the i8042")


def parsed(name: str):
    return parse_ktap_text((DATA / f"{name}.log").read_text())


def leaf_statuses(result) -> list[tuple[str, Status]]:
    return [(".".join(path), leaf.status) for test in result.tests for path, leaf in walk_leaves(test)]


def test_summary_like_kunit_py() -> None:
    lines = kunit_report.summary_lines(parsed("failures"))
    assert lines[0] == "=" * 60 and lines[-2] == "=" * 60
    assert lines[1] == "=============== list-kunit-test (3 subtests) ==============="
    assert "[FAILED] list_test_list_add" in lines and "[PASSED] list_test_list_init" in lines
    assert lines[lines.index("[FAILED] list_test_list_add") + 1] == (
        "    # list_test_list_add: EXPECTATION FAILED at lib/list-test.c:54"
    )
    assert "================= [FAILED] list-kunit-test =================" in lines
    assert lines[-1] == "Testing complete. Ran 5 tests: passed: 3, failed: 2"
    assert all(len(line) == 60 for line in lines if line.startswith("=") and "]" not in line[-3:])


@pytest.mark.parametrize("name", RECORDED)
def test_junit_counts_match_the_results(name: str) -> None:
    result = parsed(name)
    root = ElementTree.fromstring(kunit_report.junit_xml(result))
    assert root.tag == "testsuites" and root.get("tests") == str(result.counts.total)
    assert root.get("failures") == str(result.counts.failed) and root.get("errors") == str(result.counts.crashed)
    cases = root.findall("testsuite/testcase")
    assert len(cases) == result.counts.total
    assert len(root.findall("testsuite/testcase/skipped")) == result.counts.skipped


def test_junit_names_parameterized_cases_by_their_path() -> None:
    root = ElementTree.fromstring(kunit_report.junit_xml(parsed("nested")))
    names = [case.get("name") for case in root.findall("testsuite[@name='kunit-example-test']/testcase")]
    assert names[:2] == ["example_simple_test", "example_params_test.example value 2"]
    skipped = root.find("testsuite/testcase[@name='example_params_test.example value 0']/skipped")
    assert skipped is not None and skipped.get("message") == "unsupported param value"


def test_junit_shows_a_suite_that_failed_by_itself() -> None:
    result = parse_ktap_text("KTAP version 1\n1..1\n  KTAP version 1\n  1..1\n  ok 1 c\nnot ok 1 s\n")
    root = ElementTree.fromstring(kunit_report.junit_xml(result))
    assert root.find("testsuite/testcase[@name='(suite)']/failure") is not None


def test_xml_safe_escapes_what_xml_cannot_carry() -> None:
    assert kunit_report.xml_safe("a\x00b\x1bc\td\ufffe") == "a\\x00b\\x1bc\td\\xfffe"
    text = "KTAP version 1\n1..1\n# \x00\x1b[0m\nnot ok 1 t\x07 # \x0c\n"
    ElementTree.fromstring(kunit_report.junit_xml(parse_ktap_text(text)))  # parses: nothing raw left


@pytest.mark.parametrize("name", RECORDED)
def test_tap_reads_back_to_the_same_results(name: str) -> None:
    result = parsed(name)
    again = parse_ktap_text(kunit_report.tap_text(result))
    if not result.found:
        assert again.counts.total == 0
        return
    assert leaf_statuses(again) == leaf_statuses(result)
    assert again.plan == result.plan


def test_tap_marks_crashes_with_the_error_directive() -> None:
    tap = kunit_report.tap_text(parsed("crashed"))
    assert "\n  not ok 2 test 2 # ERROR crashed: the output ended while it ran\n" in tap
    assert "\n  ok 1 hlist_test_init\n" in tap


@pytest.mark.parametrize("name", RECORDED)
def test_json_has_kunit_pys_layout(name: str) -> None:
    document = json.loads(kunit_report.kunit_json(parsed(name), kernel="vmlinux", extra={"verdict": "x"}))
    assert document["name"] == "KUnit Test Group" and document["pyhv"] == {"verdict": "x"}

    def check(group: dict) -> None:
        assert set(group) - {"pyhv"} == GROUP_KEYS and set(group["misc"]) == MISC_KEYS
        assert group["arch"] == "x86_64" and group["kernel"] == "vmlinux" and group["git_branch"] == "kselftest"
        assert all(set(case) == {"name", "status"} for case in group["test_cases"])
        assert {case["status"] for case in group["test_cases"]} <= {"PASS", "FAIL", "SKIP", "ERROR"}
        for sub in group["sub_groups"]:
            check(sub)

    check(document)


def test_json_statuses() -> None:
    document = json.loads(kunit_report.kunit_json(parsed("crashed")))
    hlist = document["sub_groups"][1]
    assert [case["status"] for case in hlist["test_cases"]] == ["PASS", "ERROR", "ERROR", "ERROR"]
    assert hlist["misc"] == {"tests": 4, "passed": 1, "failed": 0, "crashed": 3, "skipped": 0, "errors": 5}


def test_files_are_written_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "junit.xml"
    kunit_report.write_text_atomically(target, "first\n")
    with pytest.raises(TypeError):
        kunit_report.write_text_atomically(target, None)  # type: ignore[arg-type]
    assert target.read_text() == "first\n" and sorted(p.name for p in tmp_path.iterdir()) == ["junit.xml"]


@pytest.mark.parametrize(
    "name,outcome,verdict,status",
    [
        ("all_pass", RESET, "passed", 0),
        ("skips", RESET, "passed", 0),
        ("failures", RESET, "failed", 100),
        ("nested", RESET, "failed", 100),
        ("crashed", Outcome(OutcomeKind.PANIC, "guest kernel panic: Fatal exception"), "crashed", 101),
        ("truncated", Outcome(OutcomeKind.TRIPLE_FAULT), "crashed", 101),
        ("truncated", Outcome(OutcomeKind.TIMEOUT, "no outcome within 3 s"), "timeout", 124),
        ("truncated", Outcome(OutcomeKind.EMULATION_FAILURE, "xsave"), "emulation-failure", 122),
        ("truncated", Outcome(OutcomeKind.QUIT), "quit", 130),
        ("missing_plan", RESET, "missing-plan", 102),
        ("no_ktap", RESET, "no-ktap", 103),
        ("no_ktap", Outcome(OutcomeKind.HYPERVISOR_ERROR, "EIO"), "hypervisor-error", 1),
        ("all_pass", Outcome(OutcomeKind.TIMEOUT), "passed", 0),  # every result came before the timeout
        ("crashed", Outcome(OutcomeKind.EXIT_BUDGET, "storm"), "crashed", 101),  # the guest's doing
    ],
)
def test_verdicts(name: str, outcome: Outcome, verdict: str, status: int) -> None:
    result = kunit_verdict(parsed(name), outcome)
    assert (result.name, result.exit_status) == (verdict, status)
    infrastructure = verdict in ("timeout", "emulation-failure", "quit", "hypervisor-error")
    assert result.outcome_class.value == ("infrastructure" if infrastructure else "verdict")


def test_no_tests_and_the_failure_detail() -> None:
    empty = kunit_verdict(parse_ktap_text("KTAP version 1\n1..0\n"), RESET)
    assert (empty.name, empty.exit_status) == ("no-tests", 104) and "--filter" in empty.detail
    failed = kunit_verdict(parsed("failures"), RESET)
    assert failed.detail == "2 of 5 failed: list-kunit-test.list_test_list_add, string-test.string_test_strchr"
    crashed = kunit_verdict(parsed("crashed"), Outcome(OutcomeKind.PANIC, "guest kernel panic: Fatal exception"))
    assert crashed.detail.startswith("hlist.test 2, hlist.test 3, hlist.test 4, suite 3 got no result (BUG: ")
    assert crashed.detail.endswith("the run ended with panic: guest kernel panic: Fatal exception")
