"""Where a PCI function's DMA and interrupts go: guest memory, KVM's IOAPIC input or an MSI,
through the IOMMU when the machine has one.

A function raises INTx (a level on the IOAPIC input firmware routed it to, PCI 3.0 §2.2.6) or
sends an MSI (a memory write to 0xfeeXXXXX, §6.8). Without an IOMMU these are KVM_IRQ_LINE and
KVM_SIGNAL_MSI. With VT-d interrupt remapping on (hypervisor/devices/intel_iommu.py), an MSI is
looked up in the guest's remapping table first; an INTx whose IOAPIC entry is in remappable
format is what the IOAPIC would send the remapping unit: pyhv reads the entry from KVM's IOAPIC
(KVM_GET_IRQCHIP), has it remapped and sends the result as an MSI on the rising edge, leaving
KVM's input low (the in-kernel IOAPIC knows only compatibility format). A level-triggered
remapped entry is therefore delivered once per assertion, not again after an EOI while the line
stays high.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from hypervisor.devices.intel_iommu import IOAPIC_REMAPPABLE

if TYPE_CHECKING:
    from hypervisor.devices.intel_iommu import IntelIommu

log = logging.getLogger(__name__)

IOAPIC_MASKED = 1 << 16  # redirection entry bit 16 (82093AA datasheet §3.2.4)


class InterruptController(Protocol):
    """What of the VM this needs (hypervisor.kvm.vm.Vm has it)."""

    def set_irq_line(self, irq: int, level: bool) -> None: ...

    def signal_msi(self, address: int, data: int) -> bool: ...

    def ioapic_redirection_entry(self, pin: int) -> int: ...


class GuestMemoryLike(Protocol):
    def contains(self, gpa: int, length: int = 1) -> bool: ...

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


class RoutedPciInterrupts:
    """hypervisor.devices.edu.PciInterrupts for one function, wired by the machine."""

    def __init__(self, vm: InterruptController, gsi: int, source_id: int, iommu: IntelIommu | None) -> None:
        self._vm = vm
        self._gsi = gsi
        self._source_id = source_id
        self._iommu = iommu

    def set_intx(self, high: bool) -> None:
        iommu = self._iommu
        if iommu is not None and iommu.remaps_interrupts():
            entry = self._vm.ioapic_redirection_entry(self._gsi)
            if entry & IOAPIC_REMAPPABLE or not iommu.passes_compatibility_format():
                if high and not entry & IOAPIC_MASKED:
                    self._deliver(iommu.remap_ioapic_entry(entry))
                return
        self._vm.set_irq_line(self._gsi, high)

    def send_msi(self, address: int, data: int) -> None:
        if self._iommu is not None:
            self._deliver(self._iommu.remap_msi(self._source_id, address, data))
        else:
            self._deliver((address, data))

    def _deliver(self, message: tuple[int, int] | None) -> None:
        if message is not None and not self._vm.signal_msi(*message):
            log.debug("MSI %#x/%#x of %04x reached no vCPU", message[0], message[1], self._source_id)


class GuestMemoryDma:
    """hypervisor.devices.edu.DmaSpace without an IOMMU: bus addresses are guest physical."""

    def __init__(self, memory: GuestMemoryLike) -> None:
        self._memory = memory

    def dma_read(self, source_id: int, address: int, length: int) -> bytes | None:
        return self._memory.read(address, length) if self._memory.contains(address, length) else None

    def dma_write(self, source_id: int, address: int, data: bytes) -> bool:
        if not self._memory.contains(address, len(data)):
            return False
        self._memory.write(address, data)
        return True
