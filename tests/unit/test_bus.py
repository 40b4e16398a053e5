import pytest

from hypervisor.devices.bus import Bus
from hypervisor.errors import BusError


class Recorder:
    def __init__(self, fill: int = 0xAB) -> None:
        self.fill = fill
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, data: memoryview) -> None:
        self.reads.append((offset, len(data)))
        data[:] = bytes([self.fill]) * len(data)

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def test_insert_find_and_route_by_offset() -> None:
    bus = Bus("ports", 0x10000)
    uart, other = Recorder(), Recorder(0x11)
    bus.insert(uart, 0x3F8, 8, "COM1")
    bus.insert(other, 0x2F8, 8, "COM2")
    assert bus.find(0x3F8).name == "COM1"
    assert bus.find(0x3FF).name == "COM1"
    assert bus.find(0x400) is None
    assert bus.find(0x2F7) is None
    assert bus.write(0x3FB, b"\x80")
    assert uart.writes == [(3, b"\x80")]
    buffer = bytearray(1)
    assert bus.read(0x2F9, memoryview(buffer))
    assert buffer == b"\x11" and other.reads == [(1, 1)]


@pytest.mark.parametrize("base,size", [(0x3F0, 9), (0x3FF, 1), (0x3F8, 8), (0x3F9, 2), (0x3E0, 0x40)])
def test_overlapping_ranges_are_refused(base: int, size: int) -> None:
    bus = Bus("ports", 0x10000)
    bus.insert(Recorder(), 0x3F8, 8, "COM1")
    with pytest.raises(BusError, match="overlaps COM1"):
        bus.insert(Recorder(), base, size, "intruder")


def test_adjacent_ranges_are_fine_and_sorted() -> None:
    bus = Bus("ports", 0x10000)
    bus.insert(Recorder(), 0x64, 1, "b")
    bus.insert(Recorder(), 0x60, 1, "a")
    bus.insert(Recorder(), 0x61, 3, "c")
    assert [r.name for r in bus.ranges()] == ["a", "c", "b"]
    assert len({r.device_id for r in bus.ranges()}) == 3


@pytest.mark.parametrize("base,size", [(-1, 1), (0xFFFF, 2), (0x10, 0)])
def test_ranges_outside_the_bus_are_refused(base: int, size: int) -> None:
    with pytest.raises(BusError):
        Bus("ports", 0x10000).insert(Recorder(), base, size)


def test_unmapped_and_straddling_accesses_are_not_routed() -> None:
    bus = Bus("mmio", 1 << 48)
    device = Recorder()
    bus.insert(device, 0x1000, 0x10)
    assert not bus.write(0x2000, b"\x00")
    assert not bus.write(0x100E, b"\x00" * 4)  # runs past the end of the range
    buffer = bytearray(b"\x55")
    assert not bus.read(0x0FFF, memoryview(buffer))
    assert buffer == b"\x55" and device.writes == []
