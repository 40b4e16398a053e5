"""The qemu-test machine with a real kvm-unit-tests guest: fw_cfg's CPU count, isa-debug-exit's
status rule, the ACPI PM timer, and the runner's and CLI's handling of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT.parent / "shared" / "kvm-unit-tests" / "x86"


def pyhv(*arguments: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypervisor", *arguments], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def flat(name: str) -> Path:
    path = SUITE / f"{name}.flat"
    if not path.is_file():
        pytest.skip(f"kvm-unit-tests are not built at {SUITE}")
    return path


@pytest.mark.timeout(200)
def test_smp_guest_learns_its_cpus_from_fw_cfg_and_exits_through_0xf4(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    result = pyhv("run", "--kernel", str(flat("smptest")), "--machine", "qemu-test", "--cpus", "2", "--mem", "128",
                  "--timeout", "150", "--console", f"file:{log}")  # fmt: skip
    console = log.read_text()
    assert "smp: waiting for 1 APs" in console, console  # fw_cfg said 2 CPUs (not 0xffff)
    assert result.returncode == 1, result.stderr  # (0 << 1) | 1: every test passed
    assert "SUMMARY:" in console


@pytest.mark.timeout(200)
def test_pm_timer_port_from_the_fadt(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    result = pyhv("run", "--kernel", str(flat("vmexit")), "--machine", "qemu-test", "--append", "inl_from_pmtimer",
                  "--timeout", "150", "--console", f"file:{log}")  # fmt: skip
    console = log.read_text()
    assert "PM timer port is 608" in console, console
    assert result.returncode == 1, result.stderr


def test_unknown_machine_and_taken_port_are_one_line_errors() -> None:
    result = pyhv("run", "--machine", "isapc", "--console", "none", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # click's usage error
    result = pyhv("run", "--kernel", str(flat("smptest")), "--machine", "qemu-test", "--debug-exit-port", "0xf6",
                  "--console", "none", "--timeout", "30", timeout=60)  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "taken by isa-debug-exit" in result.stderr and "Traceback" not in result.stderr


def test_runner_bad_input(tmp_path: Path) -> None:
    result = pyhv("kvm-unit-tests", str(tmp_path / "nowhere"), timeout=60)
    assert result.returncode == 3 and "is not a directory" in result.stderr
    (tmp_path / "unittests.cfg").write_text("[a]\nsmp = 2\n")
    result = pyhv("kvm-unit-tests", str(tmp_path), timeout=60)
    assert result.returncode == 3 and "has no file" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "unittests.cfg").write_text("[a]\nfile = a.flat\n")
    result = pyhv("kvm-unit-tests", str(tmp_path), "--filter", "zzz", timeout=60)
    assert result.returncode == 3 and "no test" in result.stderr
    result = pyhv("kvm-unit-tests", str(tmp_path), "--junit", str(tmp_path / "r.xml"), timeout=60)
    assert result.returncode == 0, result.stderr  # a.flat is missing: SKIP, as run_tests.sh says
    assert "SKIP a (Test file" in result.stdout
    assert (tmp_path / "r.xml").read_text().count("<skipped") == 1
