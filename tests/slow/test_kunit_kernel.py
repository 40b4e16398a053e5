"""`pyhv kunit` on a real KUnit kernel: guest_images/kunit/bzImage (built by
`guest_images/build.sh --kunit` from kernel.config + kunit.config) runs its suites at boot, in
kernel mode before init (so also on kvm_pvm hosts), and pyhv turns the KTAP on its console into
a summary, JUnit XML, TAP and kunit.py's JSON.

One boot (slow: about 45 s on a kvm_pvm host); every assertion reads its files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.kvm]

ROOT = Path(__file__).resolve().parents[2]
KUNIT_KERNEL = ROOT / "guest_images" / "kunit" / "bzImage"
TIMEOUT = 900
# The suites kunit.config asks for by name (CONFIG_LIST_KUNIT_TEST, CONFIG_BITFIELD_KUNIT,
# CONFIG_MEMCPY_KUNIT_TEST), besides KUnit's own and the cmdline and ext4 ones.
NAMED_SUITES = ("list-kunit-test", "bitfields", "memcpy")


@pytest.fixture(scope="module")
def kunit_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    if not KUNIT_KERNEL.exists():
        pytest.skip("guest_images/kunit/bzImage is not built (guest_images/build.sh --kunit)")
    folder = tmp_path_factory.mktemp("kunit")
    command = [sys.executable, "-m", "hypervisor", "kunit", "--kernel", str(KUNIT_KERNEL), "--timeout", str(TIMEOUT),
               "--junit", str(folder / "junit.xml"), "--json", str(folder / "results.json"),
               "--tap", str(folder / "results.tap"), "--report", str(folder / "report.json")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT + 60, cwd=ROOT)
    return result, folder


@pytest.mark.timeout(TIMEOUT + 120)
def test_every_suite_passes_with_its_summary(kunit_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, folder = kunit_run
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-3000:]
    assert "pyhv: kunit passed" in result.stderr
    # kunit.py's summary shape: a line per suite, then the totals.
    for suite in NAMED_SUITES:
        assert f"[PASSED] {suite}" in result.stdout, result.stdout[-3000:]
    # kunit.py names only the non-zero counts: "Testing complete. Ran 103 tests: passed: 103".
    totals = [line for line in result.stdout.splitlines() if line.startswith("Testing complete.")]
    assert totals and "passed:" in totals[0], result.stdout[-1500:]
    assert not any(word in totals[0] for word in ("failed", "crashed", "errors")), totals[0]
    report = json.loads((folder / "report.json").read_text())
    assert report["outcome"] == "reset"  # kunit_shutdown=reboot, then reboot=k
    assert report["kunit"]["complete"] is True and report["kunit"]["counts"]["failed"] == 0


@pytest.mark.timeout(TIMEOUT + 120)
def test_junit_json_and_tap_name_every_suite(kunit_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, folder = kunit_run
    assert result.returncode == 0, result.stderr[-2000:]
    root = ElementTree.parse(folder / "junit.xml").getroot()
    suites = {element.get("name"): element for element in root.iter("testsuite")}
    for suite in NAMED_SUITES:
        assert suite in suites
        cases = list(suites[suite].iter("testcase"))
        assert cases and not any(case.find("failure") is not None for case in cases)
    assert root.get("failures") == "0" and int(root.get("tests") or 0) >= len(NAMED_SUITES)
    document = json.loads((folder / "results.json").read_text())
    groups = {group["name"]: group for group in document["sub_groups"]}
    for suite in NAMED_SUITES:
        assert groups[suite]["test_cases"] and all(case["status"] == "PASS" for case in groups[suite]["test_cases"])
    tap = (folder / "results.tap").read_text()
    assert tap.startswith("KTAP version 1") and "not ok" not in tap
    for suite in NAMED_SUITES:
        assert f" {suite}\n" in tap
