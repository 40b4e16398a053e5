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


@pytest.mark.timeout(200)
def test_intel_iommu_guest_remaps_edu_dma_and_interrupts(tmp_path: Path) -> None:
    """kvm-unit-tests' intel_iommu: VT-d set-up, a DMA through its page tables, and the edu's
    interrupt remapped both as an IOAPIC entry and as an MSI."""
    log = tmp_path / "console.log"
    result = pyhv("run", "--kernel", str(flat("intel-iommu")), "--machine", "qemu-test", "--cpus", "4",
                  "--mem", "128", "--device", "intel-iommu", "--device", "edu", "--timeout", "150",
                  "--console", f"file:{log}")  # fmt: skip
    console = log.read_text()
    for check in ("vtd_init: DMAR enablement", "vtd_dmar: DMAR 4B memcpy test", "vtd_ir: IR IOAPIC", "vtd_ir: IR MSI"):
        assert f"PASS: {check}" in console, console
    assert "FAIL" not in console and "SKIP" not in console
    assert result.returncode == 1, result.stderr


def test_intel_iommu_guest_without_edu_skips_what_needs_it(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    result = pyhv("run", "--kernel", str(flat("intel-iommu")), "--machine", "qemu-test", "--device", "intel-iommu",
                  "--timeout", "150", "--console", f"file:{log}")  # fmt: skip
    console = log.read_text()
    assert "PASS: vtd_init: IR enablement" in console and "SKIP: DMAR 4B memcpy test" in console, console
    assert result.returncode == 1, result.stderr


def test_pci_device_bad_input_is_one_line() -> None:
    result = pyhv("run", "--device", "e1000", "--console", "none", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # click's usage error
    result = pyhv("run", "--kernel", str(flat("smptest")), "--device", "intel-iommu", "--device", "intel-iommu",
                  "--console", "none", "--timeout", "30", timeout=60)  # fmt: skip
    assert result.returncode == 3 and "at most one intel-iommu" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_machine_with_pci_devices_refuses_to_be_saved(tmp_path: Path) -> None:
    from hypervisor.errors import ConfigError
    from hypervisor.machine import Machine
    from hypervisor.snapshot.machine_state import save_machine

    machine = Machine(16, pci_devices=["edu"])
    try:
        with pytest.raises(ConfigError, match="PCI devices"):
            save_machine(machine, tmp_path / "snap")
        assert not (tmp_path / "snap").exists()
        with pytest.raises(ConfigError, match="unknown device"):
            Machine(16, pci_devices=["e1000"])
    finally:
        machine.close()


@pytest.mark.timeout(200)
def test_s3_suspends_and_the_rtc_alarm_resumes_at_the_facs_waking_vector(tmp_path: Path) -> None:
    """kvm-unit-tests' s3: the guest sets the FACS waking vector and an RTC alarm, writes S3 to
    PM1a_CNT; the resume code at the vector reports 0 (nothing ran after the sleep request)."""
    log = tmp_path / "console.log"
    result = pyhv("run", "--kernel", str(flat("s3")), "--machine", "qemu-test", "--timeout", "60",
                  "--console", f"file:{log}")  # fmt: skip
    assert "PM1a event registers at 600" in log.read_text()
    assert result.returncode == 1, result.stderr  # (0 << 1) | 1 from the resume code
