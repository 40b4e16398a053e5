"""Loading a loader's EntryState and the boot-time LAPIC, FPU and MSR state into a vCPU."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from hypervisor.boot.cpu_state import EntryState, Segment

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu

# Local APIC register offsets and LVT delivery modes, Intel SDM vol. 3A §10.4.1 table 10-1 and
# §10.5.1 figure 10-8. LINT0 as ExtINT lets the 8259 PIC deliver through the LAPIC, LINT1 as NMI
# is the PC wiring the MP spec (§5.1, default configuration) describes.
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_DELIVERY_MODE_MASK = 0x700
APIC_MODE_EXTINT = 0x700
APIC_MODE_NMI = 0x400

# MSRs a boot loader leaves in a known state (SDM vol. 4): SYSENTER and SYSCALL MSRs zero,
# IA32_MISC_ENABLE with fast strings (bit 0), as Firecracker and QEMU do.
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1 << 0

BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_CSTAR: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_LSTAR: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
}


def _copy_segment(target: object, segment: Segment) -> None:
    for name in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable"):
        setattr(target, name, getattr(segment, name))


def apply_entry_state(vcpu: Vcpu, state: EntryState) -> None:
    """Loads `state` into the vCPU's special and general purpose registers."""
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        _copy_segment(getattr(sregs, name), getattr(state, name))
    sregs.gdt.base, sregs.gdt.limit = state.gdt.base, state.gdt.limit
    sregs.idt.base, sregs.idt.limit = state.idt.base, state.idt.limit
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    vcpu.set_sregs(sregs)
    registers = {name: 0 for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp")}
    registers.update(state.gprs)
    vcpu.set_regs(rip=state.rip, rsp=state.rsp, rflags=state.rflags, **registers)


def configure_lapic(vcpu: Vcpu) -> None:
    """LINT0 as ExtINT, LINT1 as NMI (the PC wiring Linux expects with an MP table)."""
    registers = vcpu.get_lapic()
    for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        (value,) = struct.unpack_from("<I", registers, offset)
        value = (value & ~APIC_DELIVERY_MODE_MASK) | mode
        struct.pack_into("<I", registers, offset, value)
    vcpu.set_lapic(bytes(registers))


def configure_boot_msrs(vcpu: Vcpu) -> None:
    vcpu.set_msrs(BOOT_MSRS)
