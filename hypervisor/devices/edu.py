"""QEMU's "edu" educational PCI device: registers, a DMA engine and an interrupt, over PCI.

Rebuilt from QEMU's docs/specs/edu.rst (PCI ID 1234:11e8, BAR 0 a 1 MiB MMIO window), which
kvm-unit-tests' intel_iommu test drives to check DMA remapping and interrupt remapping (lib/pci-
edu.c), and which driver writers use to practise on. Registers, 32-bit accesses below 0x80,
32 or 64 bits from 0x80 (other sizes read all-ones and are ignored, as QEMU does):

- 0x00 identification 0x010000ed (version 1.0); 0x04 liveness: reads the inverse of the last
  write; 0x08 factorial of the value written (computed at once: status bit 0 never reads 1);
- 0x20 status: bit 7 asks for interrupt 0x001 when a factorial is done;
- 0x24 interrupt status; 0x60 raise (ORs the value in), 0x64 acknowledge (clears the bits);
- 0x80 DMA source, 0x88 destination, 0x90 count, 0x98 command: bit 0 start, bit 1 direction
  (1: from the device's 4 KiB buffer at device address 0x40000 to memory), bit 2 raise
  interrupt 0x100 when done. The transfer happens during the write that starts it, so bit 0
  reads back 0 at once; memory addresses are masked to the device's 28-bit DMA mask, as QEMU's
  default `dma_mask` does.

Interrupts are MSI when the guest enabled the MSI capability, else INTA#, held high while any
interrupt-status bit is set (PCI 3.0 §6.8.1, §2.2.6). DMA goes through `DmaSpace` and MSI
through `PciInterrupts`, which the machine wires to guest memory or to the IOMMU in front of it
(hypervisor/devices/intel_iommu.py). The device has no lock of its own: its MMIO registers and
its configuration space are reached through its gate, and raising an interrupt is an effect.
"""

from __future__ import annotations

import logging
from typing import Protocol

from hypervisor.devices.gate import GatedDevice
from hypervisor.devices.pci import (
    BAR0,
    COMMAND,
    COMMAND_BUS_MASTER,
    COMMAND_INTX_DISABLE,
    COMMAND_MEMORY,
    STATUS,
    STATUS_INTERRUPT,
    ConfigSpace,
)

log = logging.getLogger(__name__)

VENDOR_QEMU = 0x1234
DEVICE_EDU = 0x11E8
CLASS_OTHER = 0x00FF00  # base class 0x00, subclass 0xff: what QEMU's edu reports
BAR_SIZE = 1 << 20
IDENTIFICATION = 0x010000ED
DMA_BUFFER_ADDRESS = 0x40000
DMA_BUFFER_SIZE = 4096
DMA_MASK = (1 << 28) - 1
REG_ID = 0x00
REG_LIVENESS = 0x04
REG_FACTORIAL = 0x08
REG_STATUS = 0x20
REG_INTERRUPT_STATUS = 0x24
REG_INTERRUPT_RAISE = 0x60
REG_INTERRUPT_ACK = 0x64
REG_DMA_SOURCE = 0x80
REG_DMA_DESTINATION = 0x88
REG_DMA_COUNT = 0x90
REG_DMA_COMMAND = 0x98
STATUS_FACTORIAL_INTERRUPT = 0x80
DMA_START = 0x1
DMA_FROM_DEVICE = 0x2
DMA_INTERRUPT = 0x4
INTERRUPT_FACTORIAL = 0x001
INTERRUPT_DMA = 0x100

# The MSI capability (PCI 3.0 §6.8.1.1, 64-bit address, one vector): message control, address,
# upper address, data, and two reserved bytes after the ID and next pointer.
MSI_CAPABILITY_ID = 0x05
MSI_CONTROL_ENABLE = 0x1
MSI_CONTROL_64BIT = 0x80
MSI_BODY = MSI_CONTROL_64BIT.to_bytes(2, "little") + bytes(12)
MSI_WRITE_MASK = (0x0071).to_bytes(2, "little") + (0xFFFF_FFFC).to_bytes(4, "little") + b"\xff" * 4 + b"\xff\xff\0\0"


class DmaSpace(Protocol):
    """Where a bus-mastering device's reads and writes go, for requester `source_id`. None or
    False: the access was refused (outside memory, or a translation fault)."""

    def dma_read(self, source_id: int, address: int, length: int) -> bytes | None: ...

    def dma_write(self, source_id: int, address: int, data: bytes) -> bool: ...


class PciInterrupts(Protocol):
    """How a PCI function's interrupts leave it: its INTx line's level, or an MSI write."""

    def set_intx(self, high: bool) -> None: ...

    def send_msi(self, address: int, data: int) -> None: ...


def _factorial(value: int) -> int:
    result = 1
    for factor in range(2, value + 1):
        result = (result * factor) & 0xFFFF_FFFF  # a 32-bit register; past 12! it wraps as in C
        if result == 0:
            break
    return result


class EduDevice(GatedDevice):
    """One edu function: its configuration space and BAR 0's registers."""

    def __init__(self, dma: DmaSpace, interrupts: PciInterrupts, source_id: int, bar_address: int,
                 interrupt_line: int) -> None:  # fmt: skip
        self._dma = dma
        self._interrupts = interrupts
        self.source_id = source_id  # bus << 8 | devfn, the requester ID of its DMA and MSI
        self.config = ConfigSpace(VENDOR_QEMU, DEVICE_EDU, CLASS_OTHER, revision=0x10)
        self.config.set_memory_bar(0, bar_address, BAR_SIZE)
        self.bar_address = bar_address
        self.config.set_interrupt(pin=1, line=interrupt_line)
        # Firmware enables memory decoding for a device whose BAR it assigned (SeaBIOS does);
        # bus mastering is the driver's to enable.
        self.config.put(COMMAND, 2, COMMAND_MEMORY)
        self.msi_offset = self.config.add_capability(MSI_CAPABILITY_ID, MSI_BODY, MSI_WRITE_MASK)
        self._liveness = 0
        self._factorial = 0
        self._status = 0
        self._interrupt_status = 0
        self._dma_source = 0
        self._dma_destination = 0
        self._dma_count = 0
        self._dma_command = 0
        self._buffer = bytearray(DMA_BUFFER_SIZE)
        self._intx_level = False

    # -- configuration space (through the PCI host) -------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        return self._access(self.config.get, offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self._access(self._config_write, offset, size, value)

    def _config_write(self, offset: int, size: int, value: int) -> None:
        before = self.config.get(BAR0, 4)
        self.config.guest_write(offset, size, value)
        bar = self.config.get(BAR0, 4)
        if bar != before and bar != self.bar_address and bar != (~(BAR_SIZE - 1) & 0xFFFF_FFFF):
            log.warning("edu: the guest moved BAR 0 to %#x; pyhv's PCI does not relocate BARs, its "
                        "registers stay at %#x", bar, self.bar_address)  # fmt: skip
        self._update_intx()

    # -- BAR 0 ---------------------------------------------------------------------------------

    def read(self, offset: int, data: memoryview) -> None:
        self._access(self._read, offset, data)

    def write(self, offset: int, data: bytes) -> None:
        self._access(self._write, offset, data)

    def _decodes(self, offset: int, size: int) -> bool:
        if not self.config.command() & COMMAND_MEMORY:
            return False
        return size == 4 or (size == 8 and offset >= REG_DMA_SOURCE)

    def _read(self, offset: int, data: memoryview) -> None:
        value = self._register(offset) if self._decodes(offset, len(data)) else ~0
        data[:] = (value & ((1 << (8 * len(data))) - 1)).to_bytes(len(data), "little")

    def _register(self, offset: int) -> int:
        registers = {
            REG_ID: IDENTIFICATION, REG_LIVENESS: self._liveness, REG_FACTORIAL: self._factorial,
            REG_STATUS: self._status, REG_INTERRUPT_STATUS: self._interrupt_status,
            REG_DMA_SOURCE: self._dma_source, REG_DMA_DESTINATION: self._dma_destination,
            REG_DMA_COUNT: self._dma_count, REG_DMA_COMMAND: self._dma_command,
        }  # fmt: skip
        return registers.get(offset, ~0)

    def _write(self, offset: int, data: bytes) -> None:
        if not self._decodes(offset, len(data)):
            return
        value = int.from_bytes(data, "little")
        if offset == REG_LIVENESS:
            self._liveness = ~value & 0xFFFF_FFFF
        elif offset == REG_FACTORIAL:
            self._factorial = _factorial(value)
            if self._status & STATUS_FACTORIAL_INTERRUPT:
                self._raise(INTERRUPT_FACTORIAL)
        elif offset == REG_STATUS:
            self._status = value & STATUS_FACTORIAL_INTERRUPT
        elif offset == REG_INTERRUPT_RAISE:
            self._raise(value & 0xFFFF_FFFF)
        elif offset == REG_INTERRUPT_ACK:
            self._interrupt_status &= ~value
            self._update_intx()
        elif offset == REG_DMA_SOURCE:
            self._dma_source = value
        elif offset == REG_DMA_DESTINATION:
            self._dma_destination = value
        elif offset == REG_DMA_COUNT:
            self._dma_count = value
        elif offset == REG_DMA_COMMAND:
            self._dma_command = value & (DMA_START | DMA_FROM_DEVICE | DMA_INTERRUPT)
            if self._dma_command & DMA_START:
                self._run_dma()

    def _run_dma(self) -> None:
        """The transfer the command asks for; refused transfers move nothing (QEMU's edu
        reports an out-of-buffer request and does nothing either)."""
        from_device = bool(self._dma_command & DMA_FROM_DEVICE)
        local, memory = (self._dma_source, self._dma_destination) if from_device else (
            self._dma_destination, self._dma_source)  # fmt: skip
        start = local - DMA_BUFFER_ADDRESS
        count = self._dma_count
        if not 0 <= start <= start + count <= DMA_BUFFER_SIZE:
            log.warning("edu: DMA of %d bytes at device address %#x is outside its buffer", count, local)
        elif not self.config.command() & COMMAND_BUS_MASTER:
            log.warning("edu: DMA started with bus mastering disabled in its PCI command register")
        else:
            address = memory & DMA_MASK
            if from_device:
                if not self._dma.dma_write(self.source_id, address, bytes(self._buffer[start : start + count])):
                    log.warning("edu: DMA write of %d bytes to %#x was refused", count, address)
            else:
                data = self._dma.dma_read(self.source_id, address, count)
                if data is None:
                    log.warning("edu: DMA read of %d bytes from %#x was refused", count, address)
                else:
                    self._buffer[start : start + count] = data
        self._dma_command &= ~DMA_START
        if self._dma_command & DMA_INTERRUPT:
            self._raise(INTERRUPT_DMA)

    # -- interrupts ----------------------------------------------------------------------------

    def _msi(self) -> tuple[int, int] | None:
        base = self.msi_offset
        if not self.config.get(base + 2, 2) & MSI_CONTROL_ENABLE:
            return None
        address = self.config.get(base + 4, 4) | self.config.get(base + 8, 4) << 32
        return address, self.config.get(base + 12, 2)

    def _raise(self, bits: int) -> None:
        self._interrupt_status |= bits
        if not self._interrupt_status:
            return
        message = self._msi()
        if message is not None:
            if self.config.command() & COMMAND_BUS_MASTER:  # an MSI is a memory write (§6.8)
                self._post(self._interrupts.send_msi, *message)
        else:
            self._update_intx()

    def _update_intx(self) -> None:
        """INTA# follows the interrupt status unless MSI is on or INTx is disabled (§6.2.2)."""
        asserted = bool(self._interrupt_status) and self._msi() is None
        status = self.config.get(STATUS, 2)
        self.config.put(STATUS, 2, status | STATUS_INTERRUPT if asserted else status & ~STATUS_INTERRUPT)
        level = asserted and not self.config.command() & COMMAND_INTX_DISABLE
        if level != self._intx_level:
            self._intx_level = level
            self._post(self._interrupts.set_intx, level)
