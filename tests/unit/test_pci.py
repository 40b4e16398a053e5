"""PCI configuration mechanism #1 (hypervisor/devices/pci.py) and the edu device behind it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hypervisor.devices import edu, pci
from hypervisor.devices.bus import Bus
from hypervisor.devices.pci_routing import GuestMemoryDma
from hypervisor.memory import GuestMemory

BAR = 0xFE00_0000


class RecordingInterrupts:
    def __init__(self) -> None:
        self.levels: list[bool] = []
        self.messages: list[tuple[int, int]] = []

    def set_intx(self, high: bool) -> None:
        self.levels.append(high)

    def send_msi(self, address: int, data: int) -> None:
        self.messages.append((address, data))


class Platform:
    """A PCI host on a port bus and one edu at 00:02.0 on an MMIO bus, over 1 MiB of RAM."""

    def __init__(self) -> None:
        self.resets: list[int] = []
        self.memory = GuestMemory.flat(1 << 20)
        self.interrupts = RecordingInterrupts()
        self.host = pci.PciHost(lambda: self.resets.append(1))
        self.ports = Bus("ports", 0x10000)
        self.ports.insert(self.host, pci.CONFIG_ADDRESS_PORT, pci.CONFIG_PORTS_SIZE)
        self.edu = edu.EduDevice(GuestMemoryDma(self.memory), self.interrupts, pci.devfn(2), BAR, 23)
        self.host.attach(2, self.edu)
        self.mmio = Bus("mmio", 1 << 32)
        self.mmio.insert(self.edu, BAR, edu.BAR_SIZE)

    def out(self, port: int, value: int, size: int) -> None:
        assert self.ports.write(port, value.to_bytes(size, "little"))

    def inp(self, port: int, size: int) -> int:
        data = bytearray(size)
        assert self.ports.read(port, memoryview(data))
        return int.from_bytes(data, "little")

    def config_read(self, slot: int, register: int, size: int) -> int:
        # As kvm-unit-tests' lib/x86/asm/pci.h: the register's low bits go into CONFIG_ADDRESS.
        self.out(0xCF8, 1 << 31 | pci.devfn(slot) << 8 | register, 4)
        return self.inp(0xCFC, size)

    def config_write(self, slot: int, register: int, size: int, value: int) -> None:
        self.out(0xCF8, 1 << 31 | pci.devfn(slot) << 8 | register, 4)
        self.out(0xCFC, value, size)

    def mmio_read(self, offset: int, size: int = 4) -> int:
        data = bytearray(size)
        assert self.mmio.read(BAR + offset, memoryview(data))
        return int.from_bytes(data, "little")

    def mmio_write(self, offset: int, value: int, size: int = 4) -> None:
        assert self.mmio.write(BAR + offset, value.to_bytes(size, "little"))


@pytest.fixture
def platform() -> Iterator[Platform]:
    machine = Platform()
    yield machine
    machine.memory.close()


def test_the_bus_has_a_host_bridge_and_the_edu_and_nothing_else(platform: Platform) -> None:
    assert platform.config_read(0, pci.VENDOR_ID, 2) == 0x8086
    assert platform.config_read(0, 0x0A, 2) == 0x0600  # host bridge class
    assert platform.config_read(2, pci.VENDOR_ID, 4) == 0x11E8_1234
    assert platform.config_read(2, pci.CLASS_PROG, 1) == 0 and platform.config_read(2, 0x0A, 1) == 0xFF
    assert platform.config_read(1, pci.VENDOR_ID, 2) == 0xFFFF  # empty slot
    platform.out(0xCF8, 1 << 31 | 1 << 16, 4)  # bus 1
    assert platform.inp(0xCFC, 4) == 0xFFFF_FFFF
    platform.out(0xCF8, pci.devfn(2) << 8, 4)  # enable bit clear
    assert platform.inp(0xCFC, 2) == 0xFFFF


def test_config_address_reads_back_and_data_ports_take_every_width(platform: Platform) -> None:
    platform.out(0xCF8, 0x8000_1000, 4)
    assert platform.inp(0xCF8, 4) == 0x8000_1000
    assert platform.inp(0xCFE, 2) == 0x11E8  # device ID through the data port's upper half
    assert platform.inp(0xCFD, 1) == 0x12
    assert platform.inp(0xCF8, 2) == 0xFFFF  # not a dword access: no register there


def test_a_byte_at_0xcf9_stays_the_reset_register(platform: Platform) -> None:
    platform.out(0xCF9, 0x02, 1)
    assert platform.inp(0xCF9, 1) == 0x02 and not platform.resets
    platform.out(0xCF9, 0x06, 1)
    assert platform.resets == [1]
    assert platform.inp(0xCF8, 4) == 0  # CONFIG_ADDRESS untouched by the reset register


def test_bar_sizing_reads_the_size_and_read_only_fields_stay(platform: Platform) -> None:
    assert platform.config_read(2, pci.BAR0, 4) == BAR
    platform.config_write(2, pci.BAR0, 4, 0xFFFF_FFFF)
    assert platform.config_read(2, pci.BAR0, 4) == ~(edu.BAR_SIZE - 1) & 0xFFFF_FFFF
    platform.config_write(2, pci.BAR0, 4, BAR)
    assert platform.config_read(2, pci.BAR0, 4) == BAR
    platform.config_write(2, pci.VENDOR_ID, 4, 0)
    assert platform.config_read(2, pci.VENDOR_ID, 2) == 0x1234
    assert platform.config_read(2, pci.INTERRUPT_LINE, 1) == 23 and platform.config_read(2, pci.INTERRUPT_PIN, 1) == 1


def test_the_msi_capability_is_listed_and_64_bit(platform: Platform) -> None:
    assert platform.config_read(2, pci.STATUS, 2) & pci.STATUS_CAPABILITIES
    offset = platform.config_read(2, pci.CAPABILITIES_POINTER, 1)
    assert platform.config_read(2, offset, 1) == edu.MSI_CAPABILITY_ID
    assert platform.config_read(2, offset + 1, 1) == 0  # the last one
    assert platform.config_read(2, offset + 2, 2) & edu.MSI_CONTROL_64BIT


def test_edu_identification_liveness_and_factorial(platform: Platform) -> None:
    assert platform.mmio_read(edu.REG_ID) == edu.IDENTIFICATION
    platform.mmio_write(edu.REG_LIVENESS, 0x1234)
    assert platform.mmio_read(edu.REG_LIVENESS) == ~0x1234 & 0xFFFF_FFFF
    platform.mmio_write(edu.REG_FACTORIAL, 5)
    assert platform.mmio_read(edu.REG_FACTORIAL) == 120
    assert platform.mmio_read(edu.REG_ID, size=2) == 0xFFFF  # only 32-bit below 0x80
    assert platform.mmio_read(edu.REG_LIVENESS, size=8) == (1 << 64) - 1


def test_edu_registers_are_off_while_memory_decoding_is(platform: Platform) -> None:
    platform.config_write(2, pci.COMMAND, 2, 0)
    assert platform.mmio_read(edu.REG_ID) == 0xFFFF_FFFF
    platform.config_write(2, pci.COMMAND, 2, pci.COMMAND_MEMORY)
    assert platform.mmio_read(edu.REG_ID) == edu.IDENTIFICATION


def _dma(platform: Platform, source: int, destination: int, count: int, command: int) -> None:
    platform.mmio_write(edu.REG_DMA_SOURCE, source, 8)
    platform.mmio_write(edu.REG_DMA_DESTINATION, destination, 8)
    platform.mmio_write(edu.REG_DMA_COUNT, count, 8)
    platform.mmio_write(edu.REG_DMA_COMMAND, command | edu.DMA_START)


def test_edu_dma_round_trip_needs_bus_mastering(platform: Platform) -> None:
    platform.memory.write(0x1000, b"\x78\x56\x34\x12")
    _dma(platform, 0x1000, edu.DMA_BUFFER_ADDRESS, 4, 0)  # bus mastering still off: refused
    _dma(platform, edu.DMA_BUFFER_ADDRESS, 0x1004, 4, edu.DMA_FROM_DEVICE)
    assert platform.memory.read(0x1004, 4) == bytes(4)
    platform.config_write(2, pci.COMMAND, 2, pci.COMMAND_MEMORY | pci.COMMAND_BUS_MASTER)
    _dma(platform, 0x1000, edu.DMA_BUFFER_ADDRESS, 4, 0)
    _dma(platform, edu.DMA_BUFFER_ADDRESS, 0x1004, 4, edu.DMA_FROM_DEVICE | edu.DMA_INTERRUPT)
    assert platform.memory.read(0x1004, 4) == b"\x78\x56\x34\x12"
    assert platform.mmio_read(edu.REG_DMA_COMMAND) & edu.DMA_START == 0
    assert platform.mmio_read(edu.REG_INTERRUPT_STATUS) == edu.INTERRUPT_DMA
    assert platform.interrupts.levels == [True]


@pytest.mark.parametrize(("local", "count"), [(edu.DMA_BUFFER_ADDRESS + 4090, 16), (0, 4), (0x40000, 1 << 40)])
def test_edu_dma_outside_its_buffer_moves_nothing(platform: Platform, local: int, count: int) -> None:
    platform.config_write(2, pci.COMMAND, 2, pci.COMMAND_MEMORY | pci.COMMAND_BUS_MASTER)
    platform.memory.write(0x2000, b"\xaa" * 16)
    _dma(platform, local, 0x2000, count, edu.DMA_FROM_DEVICE)
    assert platform.memory.read(0x2000, 16) == b"\xaa" * 16
    assert platform.mmio_read(edu.REG_DMA_COMMAND) & edu.DMA_START == 0


def test_edu_dma_outside_ram_is_refused(platform: Platform) -> None:
    platform.config_write(2, pci.COMMAND, 2, pci.COMMAND_MEMORY | pci.COMMAND_BUS_MASTER)
    _dma(platform, 0x0FFF_F000, edu.DMA_BUFFER_ADDRESS, 16, 0)  # beyond the 1 MiB of RAM
    _dma(platform, edu.DMA_BUFFER_ADDRESS, 0x3000, 16, edu.DMA_FROM_DEVICE)
    assert platform.memory.read(0x3000, 16) == bytes(16)


def test_edu_intx_follows_the_interrupt_status(platform: Platform) -> None:
    platform.mmio_write(edu.REG_INTERRUPT_RAISE, 0x3)
    platform.mmio_write(edu.REG_INTERRUPT_RAISE, 0x4)  # already high: no new edge
    assert platform.config_read(2, pci.STATUS, 2) & pci.STATUS_INTERRUPT
    platform.mmio_write(edu.REG_INTERRUPT_ACK, 0x3)
    assert platform.interrupts.levels == [True]
    platform.mmio_write(edu.REG_INTERRUPT_ACK, 0x4)
    assert platform.interrupts.levels == [True, False]
    platform.config_write(2, pci.COMMAND, 2, pci.COMMAND_MEMORY | pci.COMMAND_INTX_DISABLE)
    platform.mmio_write(edu.REG_INTERRUPT_RAISE, 0x1)
    assert platform.interrupts.levels == [True, False]  # INTx disabled
    assert platform.config_read(2, pci.STATUS, 2) & pci.STATUS_INTERRUPT  # but the status shows it


def test_edu_sends_an_msi_once_enabled(platform: Platform) -> None:
    offset = platform.config_read(2, pci.CAPABILITIES_POINTER, 1)
    platform.config_write(2, offset + 4, 4, 0xFEE0_0050)
    platform.config_write(2, offset + 8, 4, 0)
    platform.config_write(2, offset + 12, 2, 0x0041)
    platform.config_write(2, offset + 2, 2, edu.MSI_CONTROL_ENABLE)
    platform.config_write(2, pci.COMMAND, 2, pci.COMMAND_MEMORY | pci.COMMAND_BUS_MASTER)
    platform.mmio_write(edu.REG_INTERRUPT_RAISE, 1)
    platform.mmio_write(edu.REG_INTERRUPT_RAISE, 1)  # every raise is a message
    assert platform.interrupts.messages == [(0xFEE0_0050, 0x41)] * 2
    assert platform.interrupts.levels == []


def test_attach_refuses_a_taken_slot(platform: Platform) -> None:
    with pytest.raises(ValueError, match="not free"):
        platform.host.attach(2, pci.HostBridge())
    with pytest.raises(ValueError, match="not free"):
        platform.host.attach(0, pci.HostBridge())
