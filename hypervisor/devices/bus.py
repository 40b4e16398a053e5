"""Buses of address ranges (port I/O and MMIO) and the protocol every device implements.

A device sees only offsets inside its own range, never its base address or KVM (DESIGN.md,
after Firecracker's BusDevice). The vCPU loop in C holds a frozen copy of the same ranges so
exits for devices that need no Python never leave C; `Bus.ranges()` is what it is built from.

The bus is where a device is serialised: `insert` gives each device state machine its one
lock (hypervisor.devices.gate), under which every thread's access to it runs, with the device's
side effects performed after the lock is released.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from hypervisor.devices.gate import DeviceGate, attach_gate
from hypervisor.errors import BusError

log = logging.getLogger(__name__)


@runtime_checkable
class Device(Protocol):
    """What a bus calls. `data` for a read is a writable buffer of the access size to fill."""

    def read(self, offset: int, data: memoryview) -> None: ...

    def write(self, offset: int, data: bytes) -> None: ...


class InterruptLine(Protocol):
    """How a device raises its interrupt; the machine wires it to KVM (IRQ line or irqfd)."""

    def set_level(self, high: bool) -> None: ...

    def pulse(self) -> None: ...


class NullInterruptLine:
    """An interrupt line that goes nowhere but remembers, for tests and unwired devices."""

    def __init__(self) -> None:
        self.level = False
        self.pulses = 0

    def set_level(self, high: bool) -> None:
        self.level = high

    def pulse(self) -> None:
        self.pulses += 1


@dataclass(frozen=True)
class BusRange:
    base: int
    size: int
    device: Device
    device_id: int
    name: str
    gate: DeviceGate | None = None  # the device's lock (None: a device that serialises itself)

    @property
    def end(self) -> int:
        return self.base + self.size

    def __repr__(self) -> str:
        return f"BusRange({self.name} {self.base:#x}+{self.size:#x})"


class Bus:
    """Sorted, non-overlapping address ranges, each owned by one device."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit  # one past the highest address (0x10000 for ports)
        self._ranges: list[BusRange] = []
        self._bases: list[int] = []
        self._next_id = 0

    def insert(self, device: Device, base: int, size: int, name: str | None = None) -> BusRange:
        """Add `device` at [base, base+size); overlapping or out-of-space ranges are refused."""
        label = name or type(device).__name__
        if size <= 0 or base < 0 or base + size > self.limit:
            raise BusError(f"{self.name}: range {base:#x}+{size:#x} for {label} is not inside the bus")
        index = bisect.bisect_right(self._bases, base)
        before = self._ranges[index - 1] if index else None
        after = self._ranges[index] if index < len(self._ranges) else None
        for other in (before, after):
            if other is not None and base < other.end and other.base < base + size:
                raise BusError(
                    f"{self.name}: {label} at {base:#x}+{size:#x} overlaps {other.name} "
                    f"at {other.base:#x}+{other.size:#x}"
                )
        entry = BusRange(base, size, device, self._next_id, label, attach_gate(device, label))
        self._next_id += 1
        self._ranges.insert(index, entry)
        self._bases.insert(index, base)
        return entry

    def find(self, address: int) -> BusRange | None:
        index = bisect.bisect_right(self._bases, address) - 1
        if index >= 0:
            entry = self._ranges[index]
            if address < entry.end:
                return entry
        return None

    def ranges(self) -> list[BusRange]:
        return list(self._ranges)

    def by_id(self) -> dict[int, BusRange]:
        return {entry.device_id: entry for entry in self._ranges}

    # A GatedDevice's read/write take its gate themselves, so the vCPU runner, which calls the
    # device of a range directly, and these two serialise in the same place.

    def read(self, address: int, data: memoryview) -> bool:
        """Let the owning device fill `data`; False (and `data` untouched) when unmapped, or
        when the access runs past the end of the range it starts in (the C loop decides the
        same: csrc/vcpu_loop.c find_range)."""
        entry = self.find(address)
        if entry is None or address + len(data) > entry.end:
            return False
        entry.device.read(address - entry.base, data)
        return True

    def write(self, address: int, data: bytes) -> bool:
        entry = self.find(address)
        if entry is None or address + len(data) > entry.end:
            return False
        entry.device.write(address - entry.base, data)
        return True
