"""Emulating, on KVM_EXIT_INTERNAL_ERROR, the instructions kvm_pvm's emulator rejects.

On kvm_pvm hosts guest kernel code runs in KVM's instruction emulator, which gives up on a few
instructions Linux uses at CPL0 (shared/PLATFORM.md: int3, clac/stac, popcnt, fwait, int imm8,
invpcid, xgetbv, clwb, lock cmpxchg16b, rdpru...). The exit carries the instruction bytes; with
the vCPU's registers and guest memory pyhv emulates them itself (hypervisor.vcpu.emulate), so
users' own kernels boot without command-line workarounds. On hardware virtualization these exits
do not happen.

This module is the glue: it reads the vCPU state `emulate()` needs (registers, sregs, FPU, the
guest's CPUID, XCR0), gives it guest-memory access (reads, and CMPXCHG16B's atomic exchange on
the host mapping), and applies the result: registers, x87 state, a TLB flush, an injected
exception or interrupt.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from hypervisor.errors import HypervisorError, KvmError
from hypervisor.kvm.loop import cmpxchg16b
from hypervisor.kvm.registers import FpuState

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu
    from hypervisor.memory import GuestMemory
    from hypervisor.vcpu.emulate import ExchangeGuest, GuestCpuid

log = logging.getLogger(__name__)

EFER_LMA = 1 << 10  # SDM vol. 3A §2.2.1
CR0_PE = 1 << 0
CR4_PGE = 1 << 7
CPUID_FLAG_SIGNIFICANT_INDEX = 1  # struct kvm_cpuid_entry2 flags (linux/kvm.h)
X87_REGISTER_BYTES = 10  # an 80-bit x87 register, the low part of its 16-byte FXSAVE slot


def guest_cpuid_map(entries: Any, count: int) -> GuestCpuid:
    """(leaf, subleaf) -> (eax, ebx, ecx, edx) from `struct kvm_cpuid_entry2` records; a leaf
    without significant subleaves is filed under subleaf 0."""
    table: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    for slot in range(count):
        entry = entries[slot]
        index = int(entry.index) if entry.flags & CPUID_FLAG_SIGNIFICANT_INDEX else 0
        table[(int(entry.function), index)] = (int(entry.eax), int(entry.ebx), int(entry.ecx), int(entry.edx))
    return table


def read_guest_cpuid(vcpu: Vcpu) -> GuestCpuid | None:
    """The CPUID this vCPU's guest sees (KVM_GET_CPUID2), or None if KVM cannot say."""
    try:
        entries = vcpu.get_cpuid()
    except KvmError as error:
        log.debug("KVM_GET_CPUID2 failed (%s): CPUID-dependent instructions are not emulated", error)
        return None
    return guest_cpuid_map(entries, len(entries))


def read_xcr0(vcpu: Vcpu) -> int | None:
    """XCR0 (KVM_GET_XCRS), or None where KVM has no XCRs (api.rst: needs KVM_CAP_XCRS)."""
    return vcpu.get_xcr0()


def inject_interrupt(vcpu: Vcpu, vector: int) -> None:
    """Deliver `vector` as an interrupt at the next entry (api.rst KVM_SET_VCPU_EVENTS,
    `interrupt.injected`). Not `soft`: the RIP is already past the INT n, and KVM's soft
    injection would add the instruction length again on some hosts (VMX's VM-entry instruction
    length, SVM's next_rip). Tried on kvm_pvm: the handler runs and IRET returns after the INT."""
    vcpu.inject_interrupt(vector)


def flush_guest_tlb(vcpu: Vcpu) -> None:
    """Flush every guest TLB entry, global ones and every PCID included.

    Writing CR4 with PGE changed "invalidates all TLB entries (including global entries) and all
    entries in all paging-structure caches (for all PCIDs)" (SDM Vol. 3 §4.10.4.1), so KVM must
    drop its translations when CR4.PGE flips (KVM_SET_SREGS resets the vCPU's MMU context on a
    CR4 change). Flipping it and flipping it back is a superset of every INVPCID type, each of
    which invalidates a subset of those entries; the guest's CR4 ends as it was."""
    sregs = vcpu.get_sregs()
    vcpu.set_sregs(replace(sregs, cr4=sregs.cr4 ^ CR4_PGE))
    vcpu.set_sregs(sregs)


def _opcode_bytes(instruction: bytes, code_bits: int) -> bytes:
    """The first three bytes after the prefixes (b"" when the prefixes do not decode): enough to
    tell the instructions that need more vCPU state than the rest, XGETBV (0F 01 D0: XCR0) and
    the x87 ones (the x87 state; the data registers for MMX MOVD/MOVQ only)."""
    from hypervisor.vcpu.x86_decode import DecodeError, decode_prefixes

    try:
        at = decode_prefixes(instruction, code_bits).length
    except DecodeError:
        return b""
    return instruction[at : at + 3]


# The instructions emulate.py needs the x87 state for (FWAIT, FNCLEX, EMMS, MMX MOVD/MOVQ), by
# their bytes after the prefixes.
FWAIT = b"\x9b"
X87_CONTROL = (b"\xdb\xe2", b"\x0f\x77")  # FNCLEX, EMMS
MMX_MOVES = (b"\x0f\x6e", b"\x0f\x7e")  # NP 0F 6E / 0F 7E (with 66 they are SSE: see emulate.py)


def _x87_registers(fpu: FpuState) -> tuple[bytes, ...]:
    """ST(0)..ST(7), 10 bytes each: kvm_fpu.fpr keeps them in FXSAVE order, 16 bytes a slot."""
    return tuple(slot[:X87_REGISTER_BYTES] for slot in fpu.fpr)


class PvmEmulator:
    """The runner's `Emulator`: True when the instruction was emulated and the vCPU updated."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.counts: dict[str, int] = {}
        self._cpuid: dict[int, GuestCpuid | None] = {}  # per vCPU id: CPUID is fixed once set
        # Per vCPU id: why the last instruction handed in was not emulated (for the outcome).
        self.refusals: dict[int, str] = {}

    def refusal(self, vcpu_id: int) -> str | None:
        """Why the last instruction vCPU `vcpu_id` handed in was not emulated, or None."""
        return self.refusals.get(vcpu_id)

    def _exchange_guest(self, vcpu: Vcpu) -> ExchangeGuest:
        """CMPXCHG16B's atomic exchange on the host mapping of guest RAM, through the C helper
        (other vCPUs run on the same memory at the same time, so Python cannot do it)."""

        def exchange(
            linear: int, expected_low: int, expected_high: int, desired_low: int, desired_high: int
        ) -> tuple[bool, int, int] | None:
            physical = vcpu.translate(linear)
            if physical is None:
                return None
            try:
                host = self.memory.host_address(physical, 16)  # aligned: never crosses a page or region
            except HypervisorError:
                return None
            swapped, (low, high) = cmpxchg16b(host, (expected_low, expected_high), (desired_low, desired_high))
            return swapped, low, high

        return exchange

    def __call__(self, vcpu: Vcpu, instruction: bytes) -> bool:
        # The decoder is loaded on the first emulation only: most guests never need it.
        from hypervisor.vcpu.emulate import (
            CpuState,
            EmulationResult,
            RegisterFile,
            X87Status,
            code_bits_from_cs,
            emulate_or_reason,
            guest_reader,
        )

        if vcpu.id not in self._cpuid:
            self._cpuid[vcpu.id] = read_guest_cpuid(vcpu)
        sregs = vcpu.get_sregs()
        code_bits = code_bits_from_cs(bool(sregs.efer & EFER_LMA), bool(sregs.cs.l), bool(sregs.cs.db))
        opcode = _opcode_bytes(instruction, code_bits)
        mmx = opcode[:2] in MMX_MOVES
        # The x87 state is an XSAVE read (about 12 us): only for the instructions that use it.
        fpu = vcpu.get_fpu() if mmx or opcode[:1] == FWAIT or opcode[:2] in X87_CONTROL else None
        cpu = CpuState(
            code_bits=code_bits,
            cpl=sregs.ss.dpl if sregs.cr0 & CR0_PE else 0,
            cr0=sregs.cr0,
            segment_bases={name: getattr(sregs, name).base for name in ("cs", "ds", "es", "ss", "fs", "gs")},
            x87=None if fpu is None else X87Status(fpu.fsw, fpu.ftwx, _x87_registers(fpu) if mmx else None),
            cr4=sregs.cr4,
            idt_base=sregs.idt.base,
            idt_limit=sregs.idt.limit,
            gdt_base=sregs.gdt.base,
            gdt_limit=sregs.gdt.limit,
            ldt_base=None if sregs.ldt.unusable or not sregs.ldt.present else sregs.ldt.base,
            ldt_limit=sregs.ldt.limit,
            efer_lma=bool(sregs.efer & EFER_LMA),
            cpuid=self._cpuid[vcpu.id],
            xcr0=read_xcr0(vcpu) if opcode == b"\x0f\x01\xd0" else None,  # an ioctl saved
        )
        result = emulate_or_reason(
            instruction,
            RegisterFile.from_mapping(vcpu.get_regs()),
            cpu,
            guest_reader(vcpu.translate, self.memory.read),
            self._exchange_guest(vcpu),
        )
        if not isinstance(result, EmulationResult):
            self.refusals[vcpu.id] = result
            log.debug("not emulated on vCPU %d: %s", vcpu.id, result)
            return False
        self.refusals.pop(vcpu.id, None)
        if result.x87 is not None and fpu is not None:
            fpu = replace(fpu, fsw=result.x87.fsw, ftwx=result.x87.ftw)
            if result.x87.st is not None:
                # The 80-bit register is the slot's low 10 bytes; the 6 above it are kept.
                fpr = tuple(bytes(register[:X87_REGISTER_BYTES]) + slot[X87_REGISTER_BYTES:]
                            for register, slot in zip(result.x87.st, fpu.fpr, strict=True))  # fmt: skip
                fpu = replace(fpu, fpr=fpr)
            vcpu.set_fpu_state(fpu)
        vcpu.set_regs(**result.registers.as_dict())
        if result.flush_tlb:
            flush_guest_tlb(vcpu)
        if result.exception is not None:
            vcpu.inject_exception(result.exception.vector, result.exception.error_code)
        elif result.interrupt is not None:
            inject_interrupt(vcpu, result.interrupt)
        self.counts[result.mnemonic] = self.counts.get(result.mnemonic, 0) + 1
        if self.counts[result.mnemonic] == 1:
            log.info("emulating %s for the guest (KVM's emulator cannot run it on this host)", result.mnemonic)
        return True
