"""Results as JUnit XML (the de-facto schema CI systems read: testsuite/testcase with
failure, skipped and system-out elements), one testsuite per engine."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path

from hypervisor.conformance.runner import Status, TestResult
from hypervisor.errors import ConfigError

MAX_LOG_CHARS = 64 * 1024  # the tail of a console log kept in <system-out>


def junit_xml(results: Sequence[TestResult], suite_name: str) -> bytes:
    suite = ElementTree.Element("testsuite", name=suite_name, tests=str(len(results)),
                                failures=str(sum(r.status is Status.FAIL for r in results)),
                                errors=str(sum(r.status is Status.TIMEOUT for r in results)),
                                skipped=str(sum(r.status is Status.SKIP for r in results)),
                                time=f"{sum(r.seconds for r in results):.3f}")  # fmt: skip
    for result in results:
        case = ElementTree.SubElement(suite, "testcase", classname=f"kvm-unit-tests.{result.engine.value}",
                                      name=result.name, time=f"{result.seconds:.3f}")  # fmt: skip
        if result.status is Status.FAIL:
            ElementTree.SubElement(case, "failure", message=result.reason or "failed")
        elif result.status is Status.TIMEOUT:
            ElementTree.SubElement(case, "error", message=result.reason or "timeout", type="timeout")
        elif result.status is Status.SKIP:
            ElementTree.SubElement(case, "skipped", message=result.reason)
        if result.log is not None and result.log.exists():
            text = result.log.read_text(errors="replace")[-MAX_LOG_CHARS:]
            # XML 1.0 cannot carry most control characters; a guest's console may hold any.
            text = "".join(ch if ch in "\t\n\r" or ord(ch) >= 0x20 else "\ufffd" for ch in text)
            ElementTree.SubElement(case, "system-out").text = text
    return ElementTree.tostring(suite, encoding="utf-8", xml_declaration=True)


def write_junit(path: Path, results: Sequence[TestResult], suite_name: str) -> None:
    try:
        path.write_bytes(junit_xml(results, suite_name))
    except OSError as error:
        raise ConfigError(f"cannot write the JUnit report {path}: {error.strerror}") from error
