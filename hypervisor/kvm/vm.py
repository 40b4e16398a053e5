"""A KVM VM file descriptor: memory slots, in-kernel irqchip and PIT, IRQs, irqfd, ioeventfd."""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING

from hypervisor.errors import KvmError
from hypervisor.kvm.ffi import ffi, ioctl, ioctl_value, lib, read_struct, write_struct
from hypervisor.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from hypervisor.kvm.protocols import SlotMemory
    from hypervisor.kvm.system import Kvm

log = logging.getLogger(__name__)

# x86 addresses KVM needs for Intel's real-mode support (api.rst KVM_SET_TSS_ADDR: "three pages
# ... must be in the first 4GB"; KVM_SET_IDENTITY_MAP_ADDR: one page). Just below the 4 GiB
# MMIO top where no guest RAM or device lives, as QEMU and Firecracker place them.
TSS_ADDRESS = 0xFFFB_D000
IDENTITY_MAP_ADDRESS = 0xFFFB_C000
# struct kvm_irqchip: chip_id and a pad before the chip's state; struct kvm_ioapic_state:
# base_address (8), ioregsel, id, irr, pad (4 each) before redirtbl[KVM_IOAPIC_NUM_PINS].
IRQCHIP_STATE_OFFSET = 8
IOAPIC_REDIRTBL_OFFSET = 24
IOAPIC_REDIRECTION_ENTRIES = 24


class Vm:
    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self._next_slot = 0
        self.vcpus: list[Vcpu] = []

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_address: int, flags: int = 0
    ) -> None:
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": gpa,
                "memory_size": size,
                "userspace_addr": host_address,
            },
        )
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)

    def map_memory(self, memory: SlotMemory) -> None:
        """Registers every region of `memory` as a memory slot."""
        for region in memory.regions:
            self.set_user_memory_region(self._next_slot, region.gpa, region.size, region.host_address)
            self._next_slot += 1

    def set_tss_address(self, address: int = TSS_ADDRESS) -> None:
        ioctl_value(self.fd, "KVM_SET_TSS_ADDR", address)

    def set_identity_map_address(self, address: int = IDENTITY_MAP_ADDRESS) -> None:
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("uint64_t *", address))

    def create_irqchip(self) -> None:
        """The in-kernel PIC pair, IOAPIC and per-vCPU LAPICs (api.rst KVM_CREATE_IRQCHIP)."""
        ioctl(self.fd, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        """The in-kernel i8254 PIT; call after create_irqchip (api.rst KVM_CREATE_PIT2).

        KVM_PIT_SPEAKER_DUMMY makes KVM answer port 0x61 (PC speaker gate and PIT channel 2
        output), which Linux reads to calibrate the TSC against the PIT.
        """
        config = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        ioctl(self.fd, "KVM_CREATE_PIT2", config)

    def set_irq_line(self, irq: int, level: bool) -> None:
        ioctl(self.fd, "KVM_IRQ_LINE", ffi.new("struct kvm_irq_level *", {"irq": irq, "level": int(level)}))

    def signal_msi(self, address: int, data: int) -> bool:
        """Injects the MSI write of `data` to `address` into the in-kernel LAPICs (api.rst 4.71
        KVM_SIGNAL_MSI); False when KVM delivered it to no vCPU (a destination nobody has)."""
        message = {"address_lo": address & 0xFFFF_FFFF, "address_hi": address >> 32, "data": data}
        try:
            return ioctl(self.fd, "KVM_SIGNAL_MSI", ffi.new("struct kvm_msi *", message)) > 0
        except KvmError as error:
            # kvm_irq_delivery_to_apic's "no destination" is -1, which the ioctl returns as EPERM.
            if error.errno == errno.EPERM:
                return False
            raise

    def ioapic_redirection_entry(self, pin: int) -> int:
        """The in-kernel IOAPIC's 64-bit redirection table entry for `pin` (KVM_GET_IRQCHIP,
        struct kvm_ioapic_state: redirtbl follows base_address, ioregsel, id, irr and a pad)."""
        if not 0 <= pin < IOAPIC_REDIRECTION_ENTRIES:
            raise ValueError(f"IOAPIC pin {pin} does not exist")
        state = self.get_irqchip("KVM_IRQCHIP_IOAPIC")
        offset = IRQCHIP_STATE_OFFSET + IOAPIC_REDIRTBL_OFFSET + 8 * pin
        return int.from_bytes(state[offset : offset + 8], "little")

    def register_irqfd(self, eventfd: int, gsi: int) -> None:
        """Writes to `eventfd` inject an edge on GSI `gsi` without a syscall into pyhv."""
        ioctl(self.fd, "KVM_IRQFD", ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi}))

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        arg = {"fd": eventfd, "gsi": gsi, "flags": lib.KVM_IRQFD_FLAG_DEASSIGN}
        ioctl(self.fd, "KVM_IRQFD", ffi.new("struct kvm_irqfd *", arg))

    def register_ioeventfd(
        self,
        eventfd: int,
        address: int,
        length: int,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        """A guest write of `length` bytes at `address` signals `eventfd` instead of exiting."""
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = {"datamatch": datamatch or 0, "addr": address, "len": length, "fd": eventfd, "flags": flags}
        ioctl(self.fd, "KVM_IOEVENTFD", ffi.new("struct kvm_ioeventfd *", arg))

    def get_state_blob(self, ioctl_name: str, struct: str) -> bytes:
        """The raw bytes of a VM-wide KVM_GET_* state struct (PIT2, CLOCK), for snapshots."""
        return read_struct(self.fd, ioctl_name, struct)

    def set_state_blob(self, ioctl_name: str, struct: str, data: bytes) -> None:
        write_struct(self.fd, ioctl_name, struct, data)

    def get_irqchip(self, chip: str) -> bytes:
        """KVM_GET_IRQCHIP for chip KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE or _IOAPIC (api.rst 4.26)."""
        buffer = ffi.new("struct kvm_irqchip *", {"chip_id": getattr(lib, chip)})
        ioctl(self.fd, "KVM_GET_IRQCHIP", buffer)
        return bytes(ffi.buffer(buffer))

    def set_irqchip(self, chip: str, data: bytes) -> None:
        buffer = ffi.new("struct kvm_irqchip *")
        if len(data) != ffi.sizeof(buffer[0]):
            raise KvmError("KVM_SET_IRQCHIP", errno.EINVAL, f"irqchip state is {len(data)} bytes")
        ffi.memmove(buffer, data, len(data))
        if buffer.chip_id != getattr(lib, chip):
            raise KvmError("KVM_SET_IRQCHIP", errno.EINVAL, f"the saved state is not {chip}'s")
        ioctl(self.fd, "KVM_SET_IRQCHIP", buffer)

    def set_clock(self, data: bytes) -> None:
        """KVM_SET_CLOCK with a saved kvm_clock_data: only the clock value is given back (its
        flags say what KVM_GET_CLOCK knew, not what KVM_SET_CLOCK accepts; api.rst 4.49)."""
        buffer = ffi.new("struct kvm_clock_data *")
        ffi.memmove(buffer, data, min(len(data), ffi.sizeof(buffer[0])))
        clock = ffi.new("struct kvm_clock_data *", {"clock": buffer.clock})
        ioctl(self.fd, "KVM_SET_CLOCK", clock)

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = ioctl_value(self.fd, "KVM_CREATE_VCPU", vcpu_id)
        try:
            vcpu = Vcpu(self, fd, vcpu_id, self.kvm.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
