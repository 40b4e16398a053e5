"""Loading a loader's EntryState and the boot-time LAPIC, FPU and MSR state into a vCPU."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from hypervisor.boot.cpu_state import EntryState
from hypervisor.boot.cpu_state import Segment as BootSegment
from hypervisor.kvm.registers import APIC_LVT_LINT0, APIC_LVT_LINT1, DescriptorTable, Segment

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu

# LVT delivery modes, Intel SDM vol. 3A §10.5.1 figure 10-8 (the LINT0/LINT1 register offsets
# are kvm/registers.py's). LINT0 as ExtINT lets the 8259 PIC deliver through the LAPIC, LINT1 as
# NMI is the PC wiring the MP spec (§5.1, default configuration) describes.
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


def _kvm_segment(segment: BootSegment) -> Segment:
    # boot/ keeps its own Segment (pure data, no KVM import); the field names are the same.
    return Segment(base=segment.base, limit=segment.limit, selector=segment.selector, type=segment.type,
                   present=segment.present, dpl=segment.dpl, db=segment.db, s=segment.s, l=segment.l,
                   g=segment.g, avl=segment.avl, unusable=segment.unusable)  # fmt: skip


def apply_entry_state(vcpu: Vcpu, state: EntryState) -> None:
    """Loads `state` into the vCPU's special and general purpose registers; the rest of the
    special registers (CR2, CR8, the APIC base, the interrupt bitmap) stay as KVM has them."""
    sregs = replace(
        vcpu.get_sregs(),
        cs=_kvm_segment(state.cs), ds=_kvm_segment(state.ds), es=_kvm_segment(state.es),
        fs=_kvm_segment(state.fs), gs=_kvm_segment(state.gs), ss=_kvm_segment(state.ss),
        tr=_kvm_segment(state.tr), ldt=_kvm_segment(state.ldt),
        gdt=DescriptorTable(state.gdt.base, state.gdt.limit), idt=DescriptorTable(state.idt.base, state.idt.limit),
        cr0=state.cr0, cr3=state.cr3, cr4=state.cr4, efer=state.efer,
    )  # fmt: skip
    vcpu.set_sregs(sregs)
    registers = {name: 0 for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp")}
    registers.update(state.gprs)
    vcpu.set_regs(rip=state.rip, rsp=state.rsp, rflags=state.rflags, **registers)


def configure_lapic(vcpu: Vcpu) -> None:
    """LINT0 as ExtINT, LINT1 as NMI (the PC wiring Linux expects with an MP table)."""
    lapic = vcpu.get_lapic()
    for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        lapic = lapic.with_register(offset, (lapic.register(offset) & ~APIC_DELIVERY_MODE_MASK) | mode)
    vcpu.set_lapic(lapic)


def configure_boot_msrs(vcpu: Vcpu) -> None:
    vcpu.set_msrs(BOOT_MSRS)
