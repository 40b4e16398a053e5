"""The pytest plugin (hypervisor/pytest_plugin.py): its `pyhv_vm` fixture used here directly, and
a user's test file run by an inner pytest, with JUnit XML and pytest-xdist."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree

import pytest

from tests.guests.build import GUEST_BASE, with_parameters

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]

MiB = 1 << 20


def test_the_fixture_reports_what_the_hypervisor_saw(pyhv_vm, guest_binary, tmp_path) -> None:
    guest = tmp_path / "virtio_blk.bin"
    guest.write_bytes(with_parameters(guest_binary("virtio_blk").read_bytes(), mode=0, exit_code=5))
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    result = pyhv_vm.boot(raw=(guest, GUEST_BASE), memory_mib=16, disks=[f"{base},snapshot=on"], timeout=60)
    assert (result.outcome, result.exit_status) == ("debug-exit", 5)
    assert result.write_sets["vda"]["written"] == [[3, 8]] and result.flushed_before_poweroff
    assert result.exits["MMIO"] > 0 and result.exits["IO"] >= 1  # virtio-mmio registers, the debug-exit port
    assert result.total_exits >= sum(result.exits.values()) - 1
    assert result.unmapped_accesses == {"port": 0, "mmio": 0}
    assert result.report["disks"]["vda"]["overlay_kind"] == "temporary"
    assert list((tmp_path / "pyhv-overlays").iterdir()) == []  # the overlay went with the run
    assert pyhv_vm.last is result


# Real mode: an empty IDT, protected mode on, ud2: the #UD cannot be delivered, nor the #GP and
# #DF after it, a triple fault (SDM Vol. 3 §6.15); as tests/kvm/test_postmortem_cli.py.
TRIPLE_FAULT_CODE = bytes.fromhex("0f011e2010 0f20c0 0c01 0f22c0 0f0b f4")
TRIPLE_FAULT_GUEST = TRIPLE_FAULT_CODE + bytes(0x20 - len(TRIPLE_FAULT_CODE)) + bytes(6)


def test_a_crash_comes_with_its_post_mortem(pyhv_vm, tmp_path) -> None:
    from hypervisor.pytest_plugin import _failure_section

    guest = tmp_path / "triple.bin"
    guest.write_bytes(TRIPLE_FAULT_GUEST)
    result = pyhv_vm.boot(raw=(guest, 0x1000), timeout=30)
    assert (result.outcome, result.exit_status) == ("triple-fault", 120)
    assert result.post_mortem is not None and "vcpu0 (protected mode, CPL 0)" in result.post_mortem
    assert result.report["post_mortem"]["last_exits"][-1]["kind"] == "shutdown"
    assert "vcpu0 (protected mode, CPL 0)" in _failure_section([result])  # what a failed test shows


USER_TESTS = """
import pytest

GUEST = {guest!r}
CONSOLE_GUEST = {console_guest!r}
BASE = {base!r}


@pytest.mark.parametrize("run", range(4))
def test_disk_writes(pyhv_vm, run):
    result = pyhv_vm.boot(raw=(GUEST, 0x1000), memory_mib=16, disks=[BASE + ",snapshot=on"], timeout=60)
    assert result.exit_status == 0
    assert result.write_sets["vda"]["written"] == [[3, 8]]


def test_the_guest_disagrees(pyhv_vm):
    result = pyhv_vm.boot(raw=(CONSOLE_GUEST, 0x1000), memory_mib=16, timeout=60)
    assert result.exit_status == 0, "the guest said no"
"""


def write_user_tests(guest_binary, tmp_path) -> None:
    guest = tmp_path / "virtio_blk.bin"
    guest.write_bytes(with_parameters(guest_binary("virtio_blk").read_bytes(), mode=0))
    console_guest = tmp_path / "long_mode.bin"
    console_guest.write_bytes(with_parameters(guest_binary("long_mode").read_bytes(), exit_code=9))
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MiB))
    text = USER_TESTS.format(guest=str(guest), console_guest=str(console_guest), base=str(base))
    (tmp_path / "test_user.py").write_text(textwrap.dedent(text))


def inner_pytest(tmp_path, *arguments: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pytest", "-p", "hypervisor.pytest_plugin", "-p", "no:cacheprovider",
               "--rootdir", str(tmp_path), "-o", "junit_logging=system-out", str(tmp_path / "test_user.py"),
               *arguments]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=tmp_path)


def check_junit(path) -> None:
    tree = ElementTree.parse(path)
    cases = {case.get("name"): case for case in tree.iter("testcase")}
    assert len(cases) == 5
    failed = cases["test_the_guest_disagrees"]
    assert failed.find("failure") is not None
    system_out = failed.find("system-out")
    assert system_out is not None and system_out.text is not None
    assert "boot 1: debug-exit (exit status 9)" in system_out.text
    assert "hello from long mode" in system_out.text  # the console tail
    assert all(cases[name].find("failure") is None for name in cases if name.startswith("test_disk_writes"))


def test_a_users_test_file_with_junit(guest_binary, tmp_path) -> None:
    write_user_tests(guest_binary, tmp_path)
    result = inner_pytest(tmp_path, "--junitxml", str(tmp_path / "junit.xml"))
    assert result.returncode == 1, result.stdout + result.stderr  # one test fails, on purpose
    assert "1 failed, 4 passed" in result.stdout, result.stdout
    assert "Captured stdout pyhv (call)" in result.stdout and "hello from long mode" in result.stdout
    check_junit(tmp_path / "junit.xml")
    assert not (tmp_path / "pyhv-overlays").exists()


@pytest.mark.skipif(importlib.util.find_spec("xdist") is None, reason="pytest-xdist is not installed")
def test_the_same_file_under_xdist(guest_binary, tmp_path) -> None:
    write_user_tests(guest_binary, tmp_path)
    result = inner_pytest(tmp_path, "-n", "2", "--junitxml", str(tmp_path / "junit.xml"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 4 passed" in result.stdout, result.stdout
    check_junit(tmp_path / "junit.xml")
