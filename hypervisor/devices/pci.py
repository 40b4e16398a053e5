"""A conventional PCI bus 0 behind configuration mechanism #1, for the PCI devices pyhv emulates.

PCI Local Bus Specification 3.0 §3.2.2.3.2: a 32-bit write to CONFIG_ADDRESS (port 0xcf8)
selects bus, device, function and register (bit 31 enables the mapping); CONFIG_DATA (ports
0xcfc-0xcff) then reads or writes that register of the selected function, at any width that
stays inside its dword. §6.1 gives the type 0 header a function answers with.

Only machines that have a PCI device get this host (`PciHost` replaces the empty-bus answer of
hypervisor/devices/pm.py at 0xcf8-0xcff); the byte at 0xcf9 stays the ACPI reset register,
which a PIIX decodes ahead of its host bridge. pyhv is the firmware here: it gives each BAR its
address and each function its interrupt line before the guest starts, as SeaBIOS does for QEMU,
and the guest finds them already set (kvm-unit-tests' lib/pci.c reads BARs and
INTERRUPT_LINE and only sizes them). A guest that writes a BAR can size it (the write-mask
semantics of §6.2.5.1 below) but cannot move the device: its registers stay where pyhv put them
(a warning says so), since the buses pyhv's C loop dispatches from are fixed when it starts.

As QEMU's pci_host does, the two low bits of CONFIG_ADDRESS are kept and added to the register
number (real chipsets hard-wire them to 0): kvm-unit-tests' pci_config_readb() writes the byte's
offset there and reads CONFIG_DATA's first byte.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from hypervisor.devices.gate import GatedDevice
from hypervisor.devices.pm import (
    PCI_CONFIG_ADDRESS_PORT,
    PCI_CONFIG_DATA_PORT,
    PCI_CONFIG_DATA_SIZE,
    ResetControl,
    is_reset_register_access,
)

log = logging.getLogger(__name__)

# The same ports as the empty-bus window of devices/pm.py, which this host replaces.
CONFIG_ADDRESS_PORT = PCI_CONFIG_ADDRESS_PORT
CONFIG_DATA_OFFSET = PCI_CONFIG_DATA_PORT - PCI_CONFIG_ADDRESS_PORT
CONFIG_PORTS_SIZE = CONFIG_DATA_OFFSET + PCI_CONFIG_DATA_SIZE  # CONFIG_ADDRESS (with RESET_REG), CONFIG_DATA
CONFIG_ENABLE = 1 << 31
CONFIG_SPACE_SIZE = 256  # conventional PCI: a function's configuration space
DEVFN_COUNT = 256  # 32 devices of 8 functions on bus 0

# Type 0 header registers (§6.1, figure 6-1) and the bits pyhv's functions use.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
STATUS_INTERRUPT = 1 << 3
STATUS_CAPABILITIES = 1 << 4
FIRST_CAPABILITY = 0x40  # capabilities live after the 64-byte header (§6.7)
BAR_MEMORY_64 = 0x4  # memory BAR type bits (§6.2.5.1)


def devfn(device: int, function: int = 0) -> int:
    return (device << 3) | function


class PciFunction(Protocol):
    """What the host calls for one function's configuration space; `offset` + `size` stays
    inside one dword of the 256 bytes."""

    def config_read(self, offset: int, size: int) -> int: ...

    def config_write(self, offset: int, size: int, value: int) -> None: ...


class ConfigSpace:
    """The 256 bytes of one function and which bits of them the guest may change.

    Read-only fields (IDs, class, header type, capability links) are simply bits outside the
    write mask; a BAR's low address bits below its size are outside it too, so writing all-ones
    and reading back gives the size, as §6.2.5.1 describes. Not a device by itself: the
    function that owns it serialises access to it.
    """

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0) -> None:
        self.bytes = bytearray(CONFIG_SPACE_SIZE)
        self.write_mask = bytearray(CONFIG_SPACE_SIZE)
        self._next_capability = FIRST_CAPABILITY
        self._last_capability_link = CAPABILITIES_POINTER
        self.put(VENDOR_ID, 2, vendor)
        self.put(DEVICE_ID, 2, device)
        self.put(REVISION_ID, 1, revision)
        self.put(CLASS_PROG, 3, class_code)  # programming interface, subclass, base class
        self.put(SUBSYSTEM_VENDOR_ID, 2, vendor)
        self.put(SUBSYSTEM_ID, 2, device)
        self.allow(COMMAND, 2, COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE)
        self.allow(INTERRUPT_LINE, 1, 0xFF)

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.bytes[offset : offset + size], "little")

    def put(self, offset: int, size: int, value: int) -> None:
        """Sets a field as the device (not the guest) does, ignoring the write mask."""
        self.bytes[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def allow(self, offset: int, size: int, mask: int) -> None:
        self.write_mask[offset : offset + size] = mask.to_bytes(size, "little")

    def guest_write(self, offset: int, size: int, value: int) -> None:
        """A guest write: only the bits of the write mask change."""
        for index in range(size):
            mask = self.write_mask[offset + index]
            byte = (value >> (8 * index)) & 0xFF
            self.bytes[offset + index] = (self.bytes[offset + index] & ~mask) | (byte & mask)

    def set_memory_bar(self, index: int, address: int, size: int) -> None:
        """A 32-bit, non-prefetchable memory BAR of `size` (a power of two, at least 16 bytes)
        at `address`, as firmware leaves it."""
        if size < 16 or size & (size - 1) or address & (size - 1) or address + size > 1 << 32:
            raise ValueError(f"BAR of {size:#x} bytes at {address:#x} is not naturally aligned below 4 GiB")
        offset = BAR0 + 4 * index
        self.put(offset, 4, address)
        self.allow(offset, 4, ~(size - 1) & 0xFFFF_FFF0)

    def set_interrupt(self, pin: int, line: int) -> None:
        """INTx pin (1 = INTA#) and the line firmware routed it to (the IOAPIC input)."""
        self.put(INTERRUPT_PIN, 1, pin)
        self.put(INTERRUPT_LINE, 1, line)

    def add_capability(self, capability_id: int, body: bytes, write_mask: bytes) -> int:
        """Appends a capability (§6.7: ID, next pointer, then `body`); returns its offset."""
        offset = self._next_capability
        length = 2 + len(body)
        if offset + length > CONFIG_SPACE_SIZE or len(write_mask) != len(body):
            raise ValueError("capability does not fit the configuration space")
        self.put(offset, 1, capability_id)
        self.bytes[offset + 2 : offset + length] = body
        self.write_mask[offset + 2 : offset + length] = write_mask
        self.put(self._last_capability_link, 1, offset)
        self.put(STATUS, 2, self.get(STATUS, 2) | STATUS_CAPABILITIES)
        self._last_capability_link = offset + 1
        self._next_capability = (offset + length + 3) & ~3
        return offset

    def command(self) -> int:
        return self.get(COMMAND, 2)


class HostBridge:
    """00:00.0, the host bridge a PCI bus starts with: IDs only (Intel's Q35 MCH, as QEMU's q35
    machine has, so guests written against QEMU recognise it); nothing of it is programmable."""

    def __init__(self) -> None:
        self.config = ConfigSpace(vendor=0x8086, device=0x29C0, class_code=0x060000)  # bridge, host
        self.config.allow(COMMAND, 2, 0)

    def config_read(self, offset: int, size: int) -> int:
        return self.config.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.guest_write(offset, size, value)


class PciHost(GatedDevice):
    """Ports 0xcf8-0xcff: CONFIG_ADDRESS, the reset register byte inside it, and CONFIG_DATA."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._reset = ResetControl(on_reset)
        self._address = 0
        self._functions: dict[int, PciFunction] = {devfn(0): HostBridge()}

    def attach(self, slot: int, function: PciFunction) -> None:
        """Puts `function` at 00:slot.0 (pyhv's devices are single-function)."""
        number = devfn(slot)
        if not 0 < slot < 32 or number in self._functions:
            raise ValueError(f"PCI slot {slot} is not free")
        self._functions[number] = function

    def read(self, offset: int, data: memoryview) -> None:
        self._access(self._read, offset, data)

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write, offset, data)

    def _read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if is_reset_register_access(offset, size):
            value = self._reset.value
        elif offset == 0 and size == 4:
            value = self._address
        elif offset >= CONFIG_DATA_OFFSET:
            target = self._selected(offset, size)
            value = target[0].config_read(target[1], size) if target else 0xFFFF_FFFF
        else:  # a byte or word access to 0xcf8-0xcfb that is not RESET_REG: no device there
            value = 0xFFFF_FFFF
        data[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _write(self, offset: int, data: bytes) -> None:
        size = len(data)
        value = int.from_bytes(data, "little")
        if is_reset_register_access(offset, size):
            if self._reset.write(value & 0xFF):
                self._post(self._reset.on_reset)
        elif offset == 0 and size == 4:
            self._address = value
        elif offset >= CONFIG_DATA_OFFSET:
            target = self._selected(offset, size)
            if target:
                target[0].config_write(target[1], size, value)

    def _selected(self, offset: int, size: int) -> tuple[PciFunction, int] | None:
        """The function and register CONFIG_ADDRESS selects for an access at `offset`, or None
        (mapping disabled, another bus, an empty slot, or an access crossing its dword)."""
        address = self._address
        if not address & CONFIG_ENABLE or (address >> 16) & 0xFF:
            return None
        register = (address & 0xFF) | (offset & 3)
        if (register & 3) + size > 4:
            return None
        function = self._functions.get((address >> 8) & 0xFF)
        return (function, register) if function is not None else None
