"""The C loop's range lookup refuses an access that runs past the end of its range.

csrc/vcpu_loop.c find_range: an access belongs to a range only when base <= addr and
addr + size <= base + len. One that starts inside a 2-byte range but is 4 bytes wide belongs to
no device (as Bus.read/Bus.write decide in hypervisor/devices/bus.py), so the C loop completes it
as an access to no device -- port reads all-ones, MMIO reads zeros, writes dropped -- and counts
it; the device never sees it.
"""

from __future__ import annotations

import pytest

from hypervisor.console import MemoryConsole
from hypervisor.machine import Machine
from tests.guests.build import GUEST_BASE, MODE_MMIO_COUNT, MODE_PIO_WIDE_COUNT, with_parameters

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]

PORT = 0x1234
MMIO_BASE = 0xD000_0000  # where the test guests' MMIO modes write (common.S)
BAD_READ_EXIT = 0x7E  # the guest's exit status when a wide in did not read all-ones


class Recorder:
    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        self.reads.append((offset, len(data)))
        data[:] = b"\xff" * len(data)

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


def run_guest(guest_binary, mode: int, count: int, port: int = 0, *, pio=None, mmio=None):
    machine = Machine(16, console=MemoryConsole())
    with machine:
        if pio is not None:
            machine.add_port_device(pio[0], pio[1], pio[2], "narrow")
        if mmio is not None:
            machine.add_mmio_device(mmio[0], mmio[1], mmio[2], "narrow")
        image = with_parameters(guest_binary("user_mode").read_bytes(), mode=mode, port=port, count=count)
        machine.load_raw_bytes(image, GUEST_BASE, "user_mode")
        return machine.run(timeout=30)


@pytest.mark.parametrize("base", [PORT, PORT - 1], ids=["at-the-base", "at-the-last-byte"])
def test_a_wide_port_access_past_a_two_byte_range_is_unmapped_and_counted(guest_binary, base: int) -> None:
    device = Recorder()
    result = run_guest(guest_binary, MODE_PIO_WIDE_COUNT, 10, PORT, pio=(device, base, 2))
    assert result.exit_status == 0, "a 4-byte in past the range did not read all-ones"
    assert result.statistics["pio_unmapped_reads"] == 10
    assert result.statistics["pio_unmapped_writes"] == 10
    assert result.statistics["first_unmapped_port"] == PORT
    assert device.reads == [] and device.writes == []


def test_the_same_access_inside_a_wide_enough_range_reaches_the_device(guest_binary) -> None:
    device = Recorder()
    result = run_guest(guest_binary, MODE_PIO_WIDE_COUNT, 10, PORT, pio=(device, PORT, 4))
    assert result.exit_status == 0
    assert device.reads == [(0, 4)] * 10 and device.writes == [(0, b"\xff" * 4)] * 10
    assert result.statistics["pio_unmapped_reads"] == 0 and result.statistics["pio_unmapped_writes"] == 0


def test_a_wide_mmio_write_past_a_two_byte_range_is_unmapped_and_counted(guest_binary) -> None:
    device = Recorder()
    result = run_guest(guest_binary, MODE_MMIO_COUNT, 5, mmio=(device, MMIO_BASE, 2))
    assert result.exit_status == 0
    assert result.statistics["mmio_unmapped_writes"] == 5
    assert result.statistics["first_unmapped_mmio"] == MMIO_BASE
    assert device.writes == []
