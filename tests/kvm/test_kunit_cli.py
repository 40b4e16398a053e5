"""`pyhv kunit` end to end: a raw test guest prints recorded KUnit consoles (tests/unit/data/ktap/)
on its serial port and ends as a kernel would (reset, triple fault, hang), and the command gives
its summary, files and exit status."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from hypervisor.cli.kunit import KUNIT_CMDLINE, kunit_cmdline
from hypervisor.errors import ConfigError
from tests.guests.build import GUEST_BASE, with_parameters

PYHV = [sys.executable, "-m", "hypervisor"]
DATA = Path(__file__).resolve().parents[1] / "unit" / "data" / "ktap"
TEXT_OFFSET = 0x200  # where the image carries its text: after the guest's code (ktap_print.S)
MODE_DEBUG_EXIT, MODE_SPIN, MODE_TRIPLE_FAULT, MODE_RESET = 0, 1, 2, 3


def ktap_guest(guest_binary, tmp_path: Path, text: str, mode: int, exit_code: int = 0) -> Path:
    code = guest_binary("ktap_print").read_bytes()
    assert len(code) <= TEXT_OFFSET
    image = with_parameters(code, exit_code=exit_code, mode=mode, count=GUEST_BASE + TEXT_OFFSET)
    path = tmp_path / "ktap_guest.bin"
    path.write_bytes(image.ljust(TEXT_OFFSET, b"\0") + text.encode() + b"\0")
    return path


def pyhv_kunit(tmp_path: Path, image: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [*PYHV, "kunit", "--raw", f"{image}@{GUEST_BASE:#x}", "--junit", str(tmp_path / "junit.xml"),
               "--tap", str(tmp_path / "results.tap"), "--json", str(tmp_path / "results.json"),
               "--report", str(tmp_path / "report.json"), *extra]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr.strip().splitlines()[-1]


# -- no /dev/kvm needed -----------------------------------------------------------------------


def test_the_filter_goes_on_the_kernel_command_line() -> None:
    assert kunit_cmdline(None, None) == KUNIT_CMDLINE == "kunit_shutdown=reboot"
    assert kunit_cmdline("list*.*add*", "quiet") == "kunit_shutdown=reboot kunit.filter_glob=list*.*add* quiet"


@pytest.mark.parametrize("glob", ["", "a b", 'a"b', "tab\there", "x" * 257, "é*"])
def test_a_filter_that_is_not_one_word_is_refused(glob: str) -> None:
    with pytest.raises(ConfigError, match="--filter"):
        kunit_cmdline(glob, None)


@pytest.mark.parametrize(
    "arguments,message",
    [([], "needs --kernel PATH"), (["--kernel", "k", "--raw", "g@0x1000"], "needs --kernel PATH"),
     (["--kernel", "/nonexistent/vmlinux"], "does not exist"),
     (["--raw", "g.bin@0x1000", "--filter", "list*"], "--filter and --append go on a kernel's command line"),
     (["--kernel", "k", "--junit", "/nonexistent/dir/j.xml"], "--junit /nonexistent/dir/j.xml: the directory"),
     (["--kernel", "k", "--console-log", "/nonexistent/c.txt"], "--console-log /nonexistent/c.txt: the directory"),
     (["--kernel", "k", "--max-exits", "io=0"], "--max-exits")],
)  # fmt: skip
def test_bad_input_is_one_line_and_status_3(arguments: list[str], message: str) -> None:
    result = subprocess.run([*PYHV, "kunit", *arguments], capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 3 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in lines[0]


# -- on KVM, with the KTAP-printing guest -------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.timeout(120)
def test_all_passing_suites(guest_binary, tmp_path: Path) -> None:
    image = ktap_guest(guest_binary, tmp_path, (DATA / "all_pass.log").read_text(), MODE_RESET)
    result = pyhv_kunit(tmp_path, image, "--console-log", str(tmp_path / "console.txt"))
    assert result.returncode == 0, result.stderr
    assert "Testing complete. Ran 9 tests: passed: 9" in result.stdout
    assert "[PASSED] list_test_list_add_tail" in result.stdout
    assert last_line(result) == "pyhv: kunit passed (exit status 0, verdict)"
    junit = ElementTree.parse(tmp_path / "junit.xml").getroot()
    assert junit.get("tests") == "9" and junit.get("failures") == "0" and junit.get("errors") == "0"
    assert [suite.get("name") for suite in junit] == ["kunit_executor_test", "list-kunit-test", "cmdline"]
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["name"] == "KUnit Test Group" and document["misc"]["passed"] == 9
    assert [group["name"] for group in document["sub_groups"]][1] == "list-kunit-test"
    assert document["sub_groups"][1]["test_cases"][0] == {"name": "list_test_list_init", "status": "PASS"}
    assert document["pyhv"]["verdict"] == "passed"
    tap = (tmp_path / "results.tap").read_text()
    assert tap.startswith("KTAP version 1\n1..3\n") and "\nok 3 cmdline\n" in tap
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["outcome"] == "reset" and report["outcome_class"] == "verdict"
    assert report["kunit"]["verdict"] == "passed" and report["kunit"]["counts"]["tests"] == 9
    assert (tmp_path / "console.txt").read_text() == (DATA / "all_pass.log").read_text()


@pytest.mark.kvm
@pytest.mark.timeout(120)
def test_failures_are_status_100_and_named(guest_binary, tmp_path: Path) -> None:
    image = ktap_guest(guest_binary, tmp_path, (DATA / "failures.log").read_text(), MODE_RESET)
    result = pyhv_kunit(tmp_path, image)
    assert result.returncode == 100, result.stderr
    assert "    # list_test_list_add: EXPECTATION FAILED at lib/list-test.c:54" in result.stdout
    assert last_line(result) == ("pyhv: kunit failed: 2 of 5 failed: list-kunit-test.list_test_list_add, "
                                 "string-test.string_test_strchr (exit status 100, verdict)")  # fmt: skip
    junit = ElementTree.parse(tmp_path / "junit.xml").getroot()
    failure = junit.find("testsuite/testcase[@name='list_test_list_add']/failure")
    assert failure is not None and "EXPECTATION FAILED" in (failure.text or "")
    statuses = [
        case["status"] for case in json.loads((tmp_path / "results.json").read_text())["sub_groups"][0]["test_cases"]
    ]
    assert statuses == ["PASS", "FAIL", "PASS"]


@pytest.mark.kvm
@pytest.mark.timeout(120)
def test_a_crash_mid_test_is_status_101(guest_binary, tmp_path: Path) -> None:
    image = ktap_guest(guest_binary, tmp_path, (DATA / "crashed.log").read_text(), MODE_TRIPLE_FAULT)
    result = pyhv_kunit(tmp_path, image)
    assert result.returncode == 101, result.stderr
    line = last_line(result)
    assert line.startswith("pyhv: kunit crashed: hlist.test 2, hlist.test 3, hlist.test 4, suite 3 got no result "
                           "(BUG: kernel NULL pointer dereference")  # fmt: skip
    assert "the run ended with triple-fault" in line and line.endswith("(exit status 101, verdict)")
    junit = ElementTree.parse(tmp_path / "junit.xml").getroot()
    assert junit.get("errors") == "4"
    error = junit.find("testsuite[@name='hlist']/testcase[@name='test 2']/error")
    assert error is not None and "Kernel panic - not syncing: Fatal exception" in (error.text or "")
    assert "ERROR" in {case["status"] for group in json.loads((tmp_path / "results.json").read_text())["sub_groups"]
                       for case in group["test_cases"]}  # fmt: skip


@pytest.mark.kvm
@pytest.mark.timeout(120)
def test_a_hang_is_the_timeout_an_infrastructure_status(guest_binary, tmp_path: Path) -> None:
    image = ktap_guest(guest_binary, tmp_path, (DATA / "truncated.log").read_text(), MODE_SPIN)
    result = pyhv_kunit(tmp_path, image, "--timeout", "3", "--show-console")
    assert result.returncode == 124, result.stderr
    assert "the run ended with timeout" in last_line(result) and "after 5 results" in last_line(result)
    assert last_line(result).endswith("(exit status 124, infrastructure)")
    assert "[    1.400012]     ok 2 - cmdline_test_lead_int\n" in result.stderr  # --show-console
    # The files are written all the same, with what came before the hang.
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["outcome"] == "timeout" and report["outcome_class"] == "infrastructure"
    assert report["kunit"]["exit_status"] == 124 and report["kunit"]["counts"]["passed"] == 3
    assert ElementTree.parse(tmp_path / "junit.xml").getroot().get("tests") == "5"


@pytest.mark.kvm
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "text,status,verdict",
    [((DATA / "missing_plan.log").read_text(), 102, "missing-plan"),
     ((DATA / "no_ktap.log").read_text(), 103, "no-ktap"),
     ("KTAP version 1\n1..0\n", 104, "no-tests"),
     ((DATA / "skips.log").read_text(), 0, "passed")],
)  # fmt: skip
def test_the_other_verdicts(guest_binary, tmp_path: Path, text: str, status: int, verdict: str) -> None:
    result = pyhv_kunit(tmp_path, ktap_guest(guest_binary, tmp_path, text, MODE_DEBUG_EXIT, exit_code=0))
    assert result.returncode == status, result.stderr
    assert last_line(result).startswith(f"pyhv: kunit {verdict}")
    assert json.loads((tmp_path / "report.json").read_text())["kunit"]["verdict"] == verdict


@pytest.mark.kvm
@pytest.mark.timeout(120)
def test_hostile_console_bytes_still_make_valid_xml(guest_binary, tmp_path: Path) -> None:
    text = "KTAP version 1\n1..1\n# \x1b[31mred\x07 <&> \x01\nnot ok 1 bad\x02name # ERROR \x0b]]>\n"
    result = pyhv_kunit(tmp_path, ktap_guest(guest_binary, tmp_path, text, MODE_RESET))
    assert result.returncode == 101, result.stderr  # not ok with ERROR: the test could not finish
    case = ElementTree.parse(tmp_path / "junit.xml").getroot().find("testsuite/testcase")
    assert case is not None and case.get("name") == "bad\\x02name"
    failure = case.find("error")
    assert failure is not None and "\\x1b[31mred\\x07 <&> \\x01" in (failure.text or "")
