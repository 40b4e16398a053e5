"""InterruptLine implementations that reach KVM: an IRQ line, and an irqfd for I/O threads.

They implement hypervisor.devices.bus.InterruptLine (set_level, pulse) structurally, so devices
drive them without knowing about KVM; the machine wires them in.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hypervisor.kvm.vm import Vm


class KvmIrqLine:
    """A GSI of the in-kernel PIC/IOAPIC driven with KVM_IRQ_LINE (ISA devices: the UART)."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self.vm = vm
        self.gsi = gsi

    def set_level(self, high: bool) -> None:
        self.vm.set_irq_line(self.gsi, high)

    def pulse(self) -> None:
        self.vm.set_irq_line(self.gsi, True)
        self.vm.set_irq_line(self.gsi, False)


class IrqFdLine:
    """An eventfd registered with KVM_IRQFD: a write injects an edge on the GSI from any thread
    without a KVM ioctl (api.rst KVM_IRQFD). Used by virtio devices on their I/O threads."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self.vm = vm
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vm.register_irqfd(self.fd, gsi)

    def set_level(self, high: bool) -> None:
        if high:
            self.pulse()

    def pulse(self) -> None:
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
