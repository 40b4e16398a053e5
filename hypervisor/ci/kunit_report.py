"""What `pyhv kunit` makes of a KtapResult: kunit.py's summary, JUnit XML, TAP and kunit.py's JSON.

The formats:
- the summary follows kunit.py's (tools/testing/kunit/kunit_parser.py print_test and
  print_summary_line): a divider per suite, `[PASSED] name` per test, the log of every failed or
  crashed one, and `Testing complete. Ran N tests: passed: P, ...`;
- JUnit XML as Jenkins, GitLab and GitHub's test reporters read it: one <testsuite> per KUnit
  suite, one <testcase> per test (parameterized cases as `case.param`), <failure>, <error> for
  a crash, <skipped>, the test's log in <system-out>;
- TAP: the results again as clean KTAP v1 (Documentation/dev-tools/ktap.rst), without the kernel
  messages around them; a test that crashed is `not ok` with the ERROR directive;
- JSON: kunit.py's `--json` layout (tools/testing/kunit/kunit_json.py, after KernelCI's test
  API): groups with `sub_groups`, `test_cases` (`PASS`, `FAIL`, `SKIP`, `ERROR`) and `misc` counts.

Everything a guest printed is untrusted text: characters XML 1.0 cannot carry are escaped, never
written raw, and every file is written whole or not at all (temp file and rename).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from hypervisor.ci.ktap import Counts, KtapResult, KtapTest, Status, walk_leaves

DIVIDER_WIDTH = 60
DIVIDER = "=" * DIVIDER_WIDTH
STATUS_LABEL = {
    Status.PASSED: "[PASSED]",
    Status.FAILED: "[FAILED]",
    Status.SKIPPED: "[SKIPPED]",
    Status.CRASHED: "[CRASHED]",
    Status.NO_TESTS: "[NO TESTS RUN]",
}
JSON_STATUS = {Status.PASSED: "PASS", Status.SKIPPED: "SKIP", Status.CRASHED: "ERROR"}  # else FAIL (kunit_json.py)
# XML 1.0 §2.2 Char: tab, newline, carriage return, and the ranges below; nothing else may appear.
XML_FORBIDDEN = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
KTAP_INDENT = "  "  # ktap.rst §Nested tests: one level is two spaces


# -- the summary ------------------------------------------------------------------------------


def _divider(message: str) -> str:
    padding = max(DIVIDER_WIDTH - len(message) - 2, 6)
    left = padding // 2
    return f"{'=' * left} {message} {'=' * (padding - left)}"


def summary_lines(result: KtapResult) -> list[str]:
    """kunit.py's report of `result`, line by line (the CLI prints it)."""
    lines = [DIVIDER]
    for test in result.tests:
        _summarize(test, lines)
    lines.append(DIVIDER)
    lines.append(f"Testing complete. {result.counts.describe()}")
    return lines


def _summarize(test: KtapTest, lines: list[str]) -> None:
    if not test.subtests:
        lines.append(f"{STATUS_LABEL[test.status]} {test.name}")
        if not test.ok:
            lines.extend(f"    {line}" for line in _trouble(test))
        return
    count = len(test.subtests)
    lines.append(_divider(f"{test.name} ({count} subtest{'s' if count != 1 else ''})"))
    for subtest in test.subtests:
        _summarize(subtest, lines)
    if not test.ok:
        # A crashed suite's log holds the kernel's crash report; a failed one's only its counts.
        lines.extend(f"    {line}" for line in _trouble(test, with_log=test.status is Status.CRASHED))
    lines.append(_divider(f"{STATUS_LABEL[test.status]} {test.name}"))


def _trouble(test: KtapTest, with_log: bool = True) -> list[str]:
    """What explains a failed or crashed test: its log, reason and parse errors."""
    found = list(test.log) if with_log else []
    if test.reason:
        found.append(f"# {test.directive or 'reason'}: {test.reason}")
    found.extend(f"[pyhv] {error}" for error in test.errors)
    return found


# -- JUnit XML ----------------------------------------------------------------------------------


def xml_safe(text: str) -> str:
    """`text` with every character XML 1.0 forbids shown as \\xNN (a console sends any byte)."""
    return XML_FORBIDDEN.sub(lambda match: f"\\x{ord(match.group(0)):02x}", text)


def _set_counts(element: ElementTree.Element, counts: Counts) -> None:
    element.set("tests", str(counts.total))
    element.set("failures", str(counts.failed))
    element.set("errors", str(counts.crashed))
    element.set("skipped", str(counts.skipped))


def junit_xml(result: KtapResult, name: str = "KUnit") -> str:
    root = ElementTree.Element("testsuites", name=xml_safe(name))
    _set_counts(root, result.counts)
    for suite in result.tests:
        element = ElementTree.SubElement(root, "testsuite", name=xml_safe(suite.name))
        _set_counts(element, suite.counts)
        leaves = list(walk_leaves(suite))
        for path, leaf in leaves:
            case_name = ".".join(path[1:]) if len(path) > 1 else leaf.name
            _testcase(element, suite.name, case_name, leaf)
        if suite.status is Status.FAILED and not any(leaf.status is Status.FAILED for _, leaf in leaves):
            # The suite said `not ok` by itself (its init, its exit checks): a case of its own.
            _testcase(element, suite.name, "(suite)", suite)
    if result.errors:
        out = ElementTree.SubElement(root, "system-err")
        out.text = xml_safe("\n".join(result.errors))
    ElementTree.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"


def _testcase(parent: ElementTree.Element, suite: str, name: str, test: KtapTest) -> None:
    case = ElementTree.SubElement(parent, "testcase", classname=xml_safe(suite), name=xml_safe(name), time="0")
    message = test.reason or "; ".join(test.errors)
    if test.status is Status.FAILED:
        failure = ElementTree.SubElement(case, "failure", message=xml_safe(message or "not ok"), type="failed")
        failure.text = xml_safe("\n".join(_trouble(test)))
    elif test.status is Status.CRASHED:
        error = ElementTree.SubElement(case, "error", message=xml_safe(message or "crashed"), type="crashed")
        error.text = xml_safe("\n".join(_trouble(test)))
    elif test.status is Status.SKIPPED:
        ElementTree.SubElement(case, "skipped", message=xml_safe(test.reason or test.directive or "skipped"))
    if test.log and test.status not in (Status.FAILED, Status.CRASHED):  # those have it in the element above
        out = ElementTree.SubElement(case, "system-out")
        out.text = xml_safe("\n".join(test.log))


# -- TAP -----------------------------------------------------------------------------------------


def tap_text(result: KtapResult) -> str:
    """The results as KTAP v1; without a plan when the console had none (so nothing is claimed)."""
    lines = ["KTAP version 1"]
    if result.plan is not None:
        lines.append(f"1..{result.plan}")
    for test in result.tests:
        _tap_test(test, 0, lines)
    lines.extend(f"# {line}" for line in result.errors)
    lines.append(f"# {result.counts.describe()}")
    return "\n".join(lines) + "\n"


def _tap_line(text: str) -> str:
    return text.replace("#", "%23") if text else text  # a description cannot contain '#' (ktap.rst)


def _tap_test(test: KtapTest, depth: int, lines: list[str]) -> None:
    indent = KTAP_INDENT * depth
    if test.subtests:
        inner = KTAP_INDENT * (depth + 1)
        lines.append(f"{inner}KTAP version 1")
        lines.append(f"{inner}# Subtest: {_tap_line(test.name)}")
        lines.append(f"{inner}1..{test.plan if test.plan is not None else len(test.subtests)}")
        for subtest in test.subtests:
            _tap_test(subtest, depth + 1, lines)
    lines.extend(f"{indent}{line}" if line.startswith("#") else f"{indent}# {line}" for line in test.log)
    lines.extend(f"{indent}# pyhv: {error}" for error in test.errors)
    word = "ok" if test.status in (Status.PASSED, Status.SKIPPED) else "not ok"
    directive = ""
    if test.status is Status.SKIPPED:
        directive = f" # {test.directive or 'SKIP'}" + (f" {test.reason}" if test.reason else "")
    elif test.status is Status.CRASHED:
        directive = " # ERROR crashed: " + (test.errors[0] if test.errors else "no result line")
    elif test.directive is not None or test.reason:
        directive = " # " + " ".join(part for part in (test.directive, test.reason) if part)
    lines.append(f"{indent}{word} {test.number} {_tap_line(test.name)}{directive}")


# -- kunit.py's JSON ------------------------------------------------------------------------


def kunit_json(result: KtapResult, *, arch: str = "x86_64", kernel: str | None = None,
               extra: dict[str, object] | None = None) -> str:  # fmt: skip
    """kunit.py's `--json` document; `extra` goes under a "pyhv" key kunit.py's readers ignore."""
    common: dict[str, object] = {
        "arch": arch, "defconfig": "", "build_environment": "", "lab_name": None, "kernel": kernel,
        "job": None, "git_branch": "kselftest",
    }  # fmt: skip
    main = KtapTest("KUnit Test Group", 0, result.status, subtests=result.tests, counts=result.counts)
    document = _group(main, common)
    if extra:
        document["pyhv"] = extra
    return json.dumps(document, indent=4) + "\n"


def _group(test: KtapTest, common: dict[str, object]) -> dict[str, object]:
    sub_groups = []
    test_cases = []
    for subtest in test.subtests:
        if subtest.subtests:
            sub_groups.append(_group(subtest, common))
        else:
            test_cases.append({"name": subtest.name, "status": JSON_STATUS.get(subtest.status, "FAIL")})
    counts = test.counts
    group: dict[str, object] = {
        "name": test.name,
        "sub_groups": sub_groups,
        "test_cases": test_cases,
        "misc": {"tests": counts.total, "passed": counts.passed, "failed": counts.failed,
                 "crashed": counts.crashed, "skipped": counts.skipped, "errors": counts.errors},
    }  # fmt: skip
    group.update(common)
    return group


# -- files ----------------------------------------------------------------------------------------


def write_text_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename: a reader never sees half."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, target)
    except BaseException:
        os.unlink(temporary)
        raise
