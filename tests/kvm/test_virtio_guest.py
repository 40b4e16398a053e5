"""The freestanding virtio-blk test guest (tests/guests/virtio_blk.c) against raw and qcow2
disks on KVM, through the same Machine.attach_disks path `pyhv run --disk` uses."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from hypervisor.console import MemoryConsole
from hypervisor.disk_spec import DiskSpec
from hypervisor.machine import Machine
from hypervisor.virtio.blk import VirtioBlock
from tests.guests.build import GUEST_BASE, with_parameters

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

MODE_FUNCTIONAL, MODE_SEQUENTIAL, MODE_RANDOM, MODE_READ_ONLY = 0, 1, 2, 3
PATTERN_OFFSET, PATTERN_LENGTH = 3 * 512, 8 * 512
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) is not installed")


def pattern() -> bytes:
    """pattern_byte() of virtio_blk.c."""
    return bytes((i * 7 + (i >> 9) + 0x5A) & 0xFF for i in range(PATTERN_LENGTH))


def run_guest(guest_binary, disk: DiskSpec, mode: int, count: int = 0, depth: int = 1) -> int:
    return run_guest_counting(guest_binary, disk, mode, count, depth)[0]


def run_guest_counting(
    guest_binary, disk: DiskSpec, mode: int, count: int = 0, depth: int = 1, c_path: bool = True
) -> tuple[int, int]:
    """(exit status, requests virtio-blk's C path completed)."""
    VirtioBlock.use_c_path = c_path
    try:
        with Machine(16, console=MemoryConsole()) as machine:
            machine.attach_disks([disk])
            image = with_parameters(guest_binary("virtio_blk").read_bytes(), mode=mode, port=depth, count=count)
            machine.load_raw_bytes(image, GUEST_BASE, "virtio_blk")
            status = machine.run(timeout=60).exit_status
            device = machine.disks[0].transport.device
            assert isinstance(device, VirtioBlock)
            return status, device.fast_requests
    finally:
        VirtioBlock.use_c_path = True


@pytest.mark.parametrize("c_path", [True, False], ids=["c-path", "python-path"])
def test_functional_raw(guest_binary, tmp_path, c_path: bool) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    status, in_c = run_guest_counting(guest_binary, DiskSpec(str(disk)), MODE_FUNCTIONAL, c_path=c_path)
    assert status == 0
    assert disk.read_bytes()[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_LENGTH] == pattern()
    # The guest's plain reads and writes go through C; its bad requests (past the end, GET_ID,
    # flush...) through Python, which the guest checks the statuses of.
    assert (in_c > 0) == c_path


@needs_qemu_img
def test_functional_qcow2(guest_binary, tmp_path) -> None:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    assert run_guest(guest_binary, DiskSpec(str(disk)), MODE_FUNCTIONAL) == 0
    subprocess.run(["qemu-img", "check", "-q", str(disk)], check=True)
    raw = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    assert raw.read_bytes()[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_LENGTH] == pattern()


def test_read_only_disk_refuses_the_guest_write(guest_binary, tmp_path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x42" * (1 << 20))
    assert run_guest(guest_binary, DiskSpec(str(disk), read_only=True), MODE_READ_ONLY) == 0
    assert disk.read_bytes() == b"\x42" * (1 << 20)


@pytest.mark.parametrize("mode", [MODE_SEQUENTIAL, MODE_RANDOM])
def test_benchmark_loops_complete(guest_binary, tmp_path, mode: int) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(4 << 20))
    status, in_c = run_guest_counting(guest_binary, DiskSpec(str(disk)), mode, count=50, depth=4)
    assert status == 0
    assert in_c >= 50  # every benchmark read was done in C


def pyhv(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypervisor", "run", "--console", "none", *arguments],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_cli_disk_with_the_test_guest(guest_binary, tmp_path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    result = pyhv("--raw", f"{guest_binary('virtio_blk')}@0x1000", "--disk", f"{disk},format=raw,serial=abc")
    assert result.returncode == 0, result.stderr
    assert disk.read_bytes()[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_LENGTH] == pattern()


@pytest.mark.parametrize(
    "spec,message",
    [
        ("{tmp}/missing.img", "no such file"),
        ("{tmp}", "is a directory"),
        ("{tmp}/disk.img,format=vmdk", "format must be raw or qcow2"),
        ("{tmp}/disk.img,readonly=maybe", "readonly must be on or off"),
        ("{tmp}/disk.img,cache=none", "unknown option"),
        ("{tmp}/disk.img,serial=this-serial-is-longer-than-twenty", "serial"),
        ("{tmp}/disk.img,format=qcow2", "qcow2"),
    ],
)
def test_bad_disks_are_one_line_errors(guest_binary, tmp_path, spec: str, message: str) -> None:
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    before = (tmp_path / "disk.img").read_bytes()
    result = pyhv("--raw", f"{guest_binary('virtio_blk')}@0x1000", "--disk", spec.format(tmp=tmp_path))
    assert result.returncode == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pyhv: error: ") and message in lines[0], result.stderr
    assert (tmp_path / "disk.img").read_bytes() == before


def test_a_locked_image_is_refused(guest_binary, tmp_path) -> None:
    from hypervisor.block.open import open_disk

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    holder = open_disk(str(disk))  # another writer, as a second pyhv would be
    try:
        result = pyhv("--raw", f"{guest_binary('virtio_blk')}@0x1000", "--disk", str(disk))
    finally:
        holder.close()
    assert result.returncode == 3
    assert "in use by another process" in result.stderr


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root reads any file; permission errors cannot be provoked")
def test_an_unreadable_image_is_refused(guest_binary, tmp_path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    disk.chmod(0)
    result = pyhv("--raw", f"{guest_binary('virtio_blk')}@0x1000", "--disk", str(disk))
    assert result.returncode == 3 and "permission" in result.stderr.lower()
