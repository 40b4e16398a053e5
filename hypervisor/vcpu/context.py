"""What an exit hook or a breakpoint's callback may look at and change at an exit.

It runs on the vCPU thread after the device handled the access and before the vCPU re-enters the
guest, so the vCPU's registers are stable (no KVM_RUN is in progress on it) and a read's data may
still be changed: it sits in kvm_run until the next KVM_RUN (api.rst, KVM_EXIT_IO/KVM_EXIT_MMIO:
"the data ... will be copied into the guest when KVM_RUN is next called").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hypervisor.errors import GuestMemoryError

if TYPE_CHECKING:
    from hypervisor.devices.bus import Device
    from hypervisor.kvm import Vcpu
    from hypervisor.kvm.registers import SystemRegisters
    from hypervisor.memory import GuestMemory

PAGE_SIZE = 4096


class ExitContext:
    """The vCPU, guest memory and the handling device at one exit."""

    __slots__ = ("vcpu", "memory", "device", "machine", "_data", "stop_reason")

    def __init__(
        self, vcpu: Vcpu, memory: GuestMemory | None, device: Device | None, data: memoryview | None,
        machine: Any = None,
    ) -> None:  # fmt: skip
        self.vcpu = vcpu
        self.memory = memory
        self.device = device
        self.machine = machine
        self._data = data
        self.stop_reason: str | None = None

    # -- registers -----------------------------------------------------------------------------

    def regs(self) -> dict[str, int]:
        return self.vcpu.get_regs()

    def set_regs(self, **values: int) -> None:
        self.vcpu.set_regs(**values)

    def sregs(self) -> SystemRegisters:
        return self.vcpu.get_sregs()

    # -- the access's data ---------------------------------------------------------------------

    def set_read_data(self, data: bytes) -> None:
        """Changes what the guest receives for this read (same length as the access)."""
        if self._data is None:
            raise ValueError("this exit is not a device access")
        if len(data) != len(self._data):
            raise ValueError(f"the access is {len(self._data)} bytes, not {len(data)}")
        self._data[:] = data

    # -- guest memory --------------------------------------------------------------------------

    def _memory(self) -> GuestMemory:
        if self.memory is None:
            raise GuestMemoryError("this machine has no guest memory")
        return self.memory

    def read_physical(self, address: int, size: int) -> bytes:
        return self._memory().read(address, size)

    def write_physical(self, address: int, data: bytes) -> None:
        self._memory().write(address, data)

    def translate(self, address: int) -> int:
        physical = self.vcpu.translate(address)
        if physical is None:
            raise GuestMemoryError(f"virtual address {address:#x} is not mapped by the vCPU's page tables")
        return physical

    def read_virtual(self, address: int, size: int) -> bytes:
        """Reads through the vCPU's page tables (KVM_TRANSLATE), page by page."""
        chunks = []
        while size > 0:
            part = min(size, PAGE_SIZE - address % PAGE_SIZE)
            chunks.append(self._memory().read(self.translate(address), part))
            address, size = address + part, size - part
        return b"".join(chunks)

    def write_virtual(self, address: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            part = min(len(view), PAGE_SIZE - address % PAGE_SIZE)
            self._memory().write(self.translate(address), view[:part])
            address, view = address + part, view[part:]

    # -- control -------------------------------------------------------------------------------

    def stop(self, reason: str = "hook") -> None:
        """Stops the machine after this exit: every vCPU parks and a Stop is queued."""
        self.stop_reason = reason
