"""INT n, RDPRU, XGETBV, CLWB/CLFLUSHOPT and INVPCID in the kvm_pvm emulator, against the SDM's
instruction pages (Vol. 2) and AMD's APM Vol. 3 for RDPRU: each encoding form, each exception.

Encodings are GNU as output (the assembly is next to each one).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from hypervisor.vcpu.emulate import (
    CR4_LA57,
    CR4_OSXSAVE,
    CR4_PCIDE,
    RFLAGS_RF,
    CpuState,
    EmulationResult,
    RegisterFile,
    emulate,
)

LONG_MODE_CR0 = 0x80050033  # PG WP NE ET MP PE
PROTECTED_CR0 = 0x00000011  # ET PE, no paging
IDT = 0xFFFF_FE00_0000_0000
GDT = 0xFFFF_FE00_0001_0000
LDT = 0xFFFF_FE00_0002_0000
# GDT: 0x08 32-bit code, 0x10 64-bit code, 0x18 data, 0x20 64-bit code not present,
# 0x28 64-bit code DPL 3, 0x30 32-bit code not present (SDM Vol. 3 §3.4.5).
GDT_ENTRIES = [0, 0x00CF9A000000FFFF, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00AF1A000000FFFF,
               0x00AFFA000000FFFF, 0x00CF1A000000FFFF]  # fmt: skip
GDT_BYTES = b"".join(entry.to_bytes(8, "little") for entry in GDT_ENTRIES)
# The guest CPUID leaves these instructions look at: (leaf, subleaf) -> (eax, ebx, ecx, edx).
CPUID_XSAVE = 1 << 26  # leaf 1 ECX
CPUID_CX16 = 1 << 13  # leaf 1 ECX
CPUID_INVPCID = 1 << 10  # leaf 7 EBX
CPUID_CLFLUSHOPT = 1 << 23  # leaf 7 EBX
CPUID_CLWB = 1 << 24  # leaf 7 EBX
CPUID_RDPRU = 1 << 4  # leaf 0x80000008 EBX
EVERYTHING = {
    (0x1, 0): (0, 0, CPUID_XSAVE | CPUID_CX16, 0),
    (0x7, 0): (0, CPUID_INVPCID | CPUID_CLFLUSHOPT | CPUID_CLWB, 0, 0),
    (0xD, 1): (0, 0, 0, 0),
    (0x80000008, 0): (0, CPUID_RDPRU, 0, 0),
}
NOTHING: dict[tuple[int, int], tuple[int, int, int, int]] = {(0x1, 0): (0, 0, 0, 0), (0x7, 0): (0, 0, 0, 0)}


def cpu(code_bits: int = 64, cpl: int = 0, cr0: int = LONG_MODE_CR0, **changes: object) -> CpuState:
    state = CpuState(
        code_bits=code_bits,
        cpl=cpl,
        cr0=cr0,
        cpuid=EVERYTHING,
        idt_base=IDT,
        idt_limit=0xFFF,
        gdt_base=GDT,
        gdt_limit=len(GDT_BYTES) - 1,
    )
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def regs(**values: int) -> RegisterFile:
    return RegisterFile(rip=0x1000, rflags=0x2 | RFLAGS_RF, **values)


class FakeMemory:
    """Linear memory made of (address -> bytes) blocks; a read inside a block is served."""

    def __init__(self, blocks: dict[int, bytes] | None = None) -> None:
        self.blocks = blocks or {}
        self.reads: list[tuple[int, int]] = []

    def __call__(self, address: int, size: int) -> bytes | None:
        self.reads.append((address, size))
        for start, data in self.blocks.items():
            if start <= address and address + size <= start + len(data):
                return data[address - start : address - start + size]
        return None


def no_memory(address: int, size: int) -> bytes | None:
    raise AssertionError(f"unexpected memory read at {address:#x}")


def fault(result: EmulationResult | None) -> tuple[int, int | None]:
    assert result is not None and result.exception is not None, result
    assert result.registers.rip == 0x1000  # a fault leaves RIP on the instruction
    assert result.interrupt is None and not result.flush_tlb
    return result.exception.vector, result.exception.error_code


def completed(result: EmulationResult | None, length: int) -> EmulationResult:
    assert result is not None and result.exception is None, result
    assert result.length == length and result.registers.rip == 0x1000 + length
    assert not result.registers.rflags & RFLAGS_RF
    return result


# ----------------------------------------------------------------------------- INT n


def gate64(
    gate_type: int = 0xE,
    dpl: int = 0,
    present: bool = True,
    offset: int = 0xFFFF_FFFF_8100_1234,
    selector: int = 0x10,
    system: bool = False,
) -> bytes:
    """A 16-byte IA-32e IDT gate (SDM Vol. 3 §6.14.1, Figure 6-8)."""
    low = (offset & 0xFFFF) | selector << 16 | gate_type << 40 | int(system) << 44 | dpl << 45
    low |= int(present) << 47 | (offset >> 16 & 0xFFFF) << 48
    return low.to_bytes(8, "little") + (offset >> 32).to_bytes(8, "little")


def gate32(gate_type: int = 0xE, dpl: int = 0, present: bool = True, selector: int = 0x08) -> bytes:
    low = 0x1234 | selector << 16 | gate_type << 40 | dpl << 45 | int(present) << 47
    return low.to_bytes(8, "little")


def idt_with(vector: int, gate: bytes) -> FakeMemory:
    return FakeMemory({IDT + vector * len(gate): gate, GDT: GDT_BYTES})


def test_int_n_delivers_the_vector_with_rip_after_the_instruction() -> None:
    result = completed(emulate(bytes.fromhex("cd80"), regs(), cpu(), idt_with(0x80, gate64())), 2)
    assert result.mnemonic == "int" and result.interrupt == 0x80
    assert result.exception is None  # delivered as an interrupt: no error code, return address next


@pytest.mark.parametrize("vector", [8, 10, 11, 12, 13, 14, 17])
def test_int_n_on_error_code_vectors_pushes_no_error_code(vector: int) -> None:
    result = completed(emulate(bytes([0xCD, vector]), regs(), cpu(), idt_with(vector, gate64())), 2)
    assert result.interrupt == vector and result.exception is None


def test_int_n_trap_gate_and_prefixes() -> None:
    memory = idt_with(0x21, gate64(gate_type=0xF))
    result = completed(emulate(bytes.fromhex("2e 66 cd21"), regs(), cpu(), memory), 4)
    assert result.interrupt == 0x21
    assert memory.reads == [(IDT + 0x21 * 16, 8), (GDT + 0x10, 8)]  # the gate, then its code segment


def test_int_n_beyond_the_idt_limit() -> None:
    # A 16-byte gate for vector 0x50 needs the limit to reach 0x50 * 16 + 15.
    state = cpu(idt_limit=0x50 * 16 + 14)
    assert fault(emulate(bytes.fromhex("cd50"), regs(), state, no_memory)) == (13, 0x50 * 8 + 2)
    state = cpu(idt_limit=0x50 * 16 + 15)
    assert emulate(bytes.fromhex("cd50"), regs(), state, idt_with(0x50, gate64())) is not None


@pytest.mark.parametrize("gate_type", [0x0, 0x2, 0x5, 0x6, 0x7, 0x9, 0xC])
def test_int_n_through_a_gate_invalid_in_long_mode(gate_type: int) -> None:
    memory = idt_with(0x30, gate64(gate_type=gate_type))
    assert fault(emulate(bytes.fromhex("cd30"), regs(), cpu(), memory)) == (13, 0x30 * 8 + 2)


def test_int_n_through_a_code_or_data_descriptor() -> None:
    memory = idt_with(0x30, gate64(system=True))  # S = 1: not a system descriptor, so no gate
    assert fault(emulate(bytes.fromhex("cd30"), regs(), cpu(), memory)) == (13, 0x182)


def test_int_n_gate_dpl_is_checked_against_cpl() -> None:
    memory = idt_with(0x30, gate64(dpl=0))
    assert fault(emulate(bytes.fromhex("cd30"), regs(), cpu(cpl=3), memory)) == (13, 0x182)
    memory = idt_with(0x30, gate64(dpl=3))
    assert completed(emulate(bytes.fromhex("cd30"), regs(), cpu(cpl=3), memory), 2).interrupt == 0x30
    memory = idt_with(0x30, gate64(dpl=0))
    assert completed(emulate(bytes.fromhex("cd30"), regs(), cpu(cpl=0), memory), 2).interrupt == 0x30


def test_int_n_gate_not_present() -> None:
    memory = idt_with(0x30, gate64(present=False))
    assert fault(emulate(bytes.fromhex("cd30"), regs(), cpu(), memory)) == (11, 0x182)


def test_int_n_dpl_is_checked_before_presence() -> None:
    memory = idt_with(0x30, gate64(present=False, dpl=0))
    assert fault(emulate(bytes.fromhex("cd30"), regs(), cpu(cpl=3), memory)) == (13, 0x182)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (0x00, (13, 0)),  # null selector: #GP(0)
        (0x03, (13, 0)),  # null with RPL 3
        (0x38, (13, 0x38)),  # beyond the GDT limit
        (0x18, (13, 0x18)),  # a data segment
        (0x08, (13, 0x08)),  # 32-bit code: IA-32e gates need 64-bit code
        (0x20, (11, 0x20)),  # not present: #NP(selector), as kvm-unit-tests' eventinj checks
        (0x23, (11, 0x20)),  # the error code drops the RPL
        (0x2C, (13, 0x2C)),  # TI = 1 with no LDT (the error code keeps TI)
    ],
)
def test_int_n_gate_code_segment_checks(selector: int, expected: tuple[int, int]) -> None:
    memory = idt_with(0x21, gate64(selector=selector))
    assert fault(emulate(bytes.fromhex("cd21"), regs(), cpu(), memory)) == expected


def test_int_n_code_segment_dpl_above_cpl() -> None:
    memory = idt_with(0x21, gate64(selector=0x28, dpl=3))  # DPL 3 code from CPL 0
    assert fault(emulate(bytes.fromhex("cd21"), regs(), cpu(), memory)) == (13, 0x28)
    # from CPL 3 the same gate leads to its own level: delivered
    assert completed(emulate(bytes.fromhex("cd21"), regs(), cpu(cpl=3), memory), 2).interrupt == 0x21


def test_int_n_code_segment_in_the_ldt() -> None:
    memory = FakeMemory({IDT + 0x21 * 16: gate64(selector=0x0C), GDT: GDT_BYTES, LDT: GDT_BYTES[:24]})
    state = cpu(ldt_base=LDT, ldt_limit=23)  # LDT entry 1 is 32-bit code, entry 2 64-bit code
    assert fault(emulate(bytes.fromhex("cd21"), regs(), state, memory)) == (13, 0x0C)
    memory.blocks[IDT + 0x21 * 16] = gate64(selector=0x14)
    assert completed(emulate(bytes.fromhex("cd21"), regs(), state, memory), 2).interrupt == 0x21


def test_int_n_compatibility_mode_uses_16_byte_gates() -> None:
    state = cpu(code_bits=32, efer_lma=True)
    memory = idt_with(0x21, gate64())
    assert completed(emulate(bytes.fromhex("cd21"), regs(), state, memory), 2).interrupt == 0x21
    assert fault(emulate(bytes.fromhex("cd21"), regs(), state, idt_with(0x21, gate64(gate_type=0x6)))) == (13, 0x10A)


def test_int_n_unreadable_gdt_is_not_guessed() -> None:
    memory = FakeMemory({IDT + 0x21 * 16: gate64()})
    assert emulate(bytes.fromhex("cd21"), regs(), cpu(), memory) is None
    assert emulate(bytes.fromhex("cd21"), regs(), cpu(gdt_base=None), idt_with(0x21, gate64())) is None


def test_int_n_protected_mode_gates() -> None:
    state = cpu(code_bits=32, cr0=PROTECTED_CR0, idt_limit=0x7FF)
    for gate_type in (0x5, 0x6, 0x7, 0xE, 0xF):  # task, 16- and 32-bit interrupt and trap gates
        memory = idt_with(0x40, gate32(gate_type=gate_type))
        assert completed(emulate(bytes.fromhex("cd40"), regs(), state, memory), 2).interrupt == 0x40
    # a 32-bit code segment is right outside IA-32e mode; one that is not present is #NP
    memory = idt_with(0x40, gate32(selector=0x30))
    assert fault(emulate(bytes.fromhex("cd40"), regs(), state, memory)) == (11, 0x30)
    # a task gate names a TSS, not a code segment: its checks are the task switch's (KVM's)
    memory = idt_with(0x40, gate32(gate_type=0x5, selector=0x30))
    assert completed(emulate(bytes.fromhex("cd40"), regs(), state, memory), 2).interrupt == 0x40
    assert fault(emulate(bytes.fromhex("cd40"), regs(), state, idt_with(0x40, gate32(gate_type=0xC)))) == (13, 0x202)
    # 8-byte gates: vector 0xFF needs the limit to reach 0x7FF
    assert fault(emulate(bytes.fromhex("cdff"), regs(), dataclasses.replace(state, idt_limit=0x7FE), no_memory)) == (
        13,
        0xFF * 8 + 2,
    )


def test_int_n_real_mode_checks_only_the_ivt_limit() -> None:
    state = cpu(code_bits=16, cr0=0, idt_limit=0x3FF)
    result = completed(emulate(bytes.fromhex("cd10"), regs(), state, no_memory), 2)
    assert result.interrupt == 0x10
    # beyond the limit: #GP, and real mode pushes no error code
    assert fault(emulate(bytes.fromhex("cd10"), regs(), dataclasses.replace(state, idt_limit=0x42), no_memory)) == (
        13,
        None,
    )


def test_int_n_with_lock_is_undefined() -> None:
    assert fault(emulate(bytes.fromhex("f0 cd80"), regs(), cpu(), no_memory)) == (6, None)


def test_int_n_not_emulated_without_idt_or_readable_gate() -> None:
    assert emulate(bytes.fromhex("cd80"), regs(), cpu(idt_base=None), no_memory) is None
    assert emulate(bytes.fromhex("cd80"), regs(), cpu(), FakeMemory()) is None  # #PF on the IDT
    assert emulate(bytes.fromhex("cd"), regs(), cpu(), no_memory) is None  # truncated


# ----------------------------------------------------------------------------- RDPRU


def test_rdpru_is_undefined_without_the_cpuid_bit() -> None:
    assert fault(emulate(bytes.fromhex("0f01fd"), regs(), cpu(cpuid=NOTHING), no_memory)) == (6, None)


def test_rdpru_offered_is_not_emulated_and_unknown_cpuid_is_not_guessed() -> None:
    assert emulate(bytes.fromhex("0f01fd"), regs(), cpu(), no_memory) is None
    assert emulate(bytes.fromhex("0f01fd"), regs(), cpu(cpuid=None), no_memory) is None
    assert emulate(bytes.fromhex("66 0f01fd"), regs(), cpu(cpuid=NOTHING), no_memory) is None


# ----------------------------------------------------------------------------- XGETBV


def test_xgetbv_reads_xcr0() -> None:
    state = cpu(cr4=CR4_OSXSAVE, xcr0=0x2_0000_0007)
    result = completed(
        emulate(
            bytes.fromhex("0f01d0"),
            regs(rcx=0xFFFF_FFFF_0000_0000, rax=-1 & (1 << 64) - 1, rdx=0x1234_5678_9ABC_DEF0),
            state,
            no_memory,
        ),
        3,
    )
    assert (result.registers.rax, result.registers.rdx) == (7, 2)  # EDX:EAX, upper halves zeroed
    assert result.mnemonic == "xgetbv"


def test_xgetbv_undefined_cases() -> None:
    assert fault(emulate(bytes.fromhex("0f01d0"), regs(), cpu(cr4=0, xcr0=7), no_memory)) == (6, None)
    assert fault(emulate(bytes.fromhex("0f01d0"), regs(), cpu(cpuid=NOTHING, cr4=CR4_OSXSAVE, xcr0=7), no_memory)) == (
        6,
        None,
    )
    assert fault(emulate(bytes.fromhex("f0 0f01d0"), regs(), cpu(cr4=CR4_OSXSAVE, xcr0=7), no_memory)) == (6, None)


def test_xgetbv_unsupported_xcr_is_a_general_protection_fault() -> None:
    state = cpu(cr4=CR4_OSXSAVE, xcr0=7)
    for register in (1, 2, 0xFFFF_FFFF):  # XCR1 only with CPUID.(0DH,1):EAX[2], not offered here
        assert fault(emulate(bytes.fromhex("0f01d0"), regs(rcx=register), state, no_memory)) == (13, 0)
    real = cpu(code_bits=16, cr0=0, cr4=CR4_OSXSAVE, xcr0=7)
    assert fault(emulate(bytes.fromhex("0f01d0"), regs(rcx=5), real, no_memory)) == (13, None)


def test_xgetbv_not_guessed() -> None:
    assert emulate(bytes.fromhex("0f01d0"), regs(), cpu(cr4=CR4_OSXSAVE, xcr0=None), no_memory) is None
    with_xinuse = dict(EVERYTHING)
    with_xinuse[(0xD, 1)] = (1 << 2, 0, 0, 0)
    state = cpu(cr4=CR4_OSXSAVE, xcr0=7, cpuid=with_xinuse)
    assert emulate(bytes.fromhex("0f01d0"), regs(rcx=1), state, no_memory) is None  # XINUSE
    assert emulate(bytes.fromhex("66 0f01d0"), regs(), cpu(cr4=CR4_OSXSAVE, xcr0=7), no_memory) is None


# ----------------------------------------------------------------------------- CLWB / CLFLUSHOPT


def test_clwb_completes_after_checking_the_address() -> None:
    memory = FakeMemory({0x5000: bytes(64)})
    result = completed(emulate(bytes.fromhex("660fae30"), regs(rax=0x5010), cpu(), memory), 4)  # clwb (%rax)
    assert result.mnemonic == "clwb" and memory.reads == [(0x5010, 1)]
    assert result.registers.rax == 0x5010


def test_clwb_segment_override_and_displacement() -> None:
    memory = FakeMemory({0x9_0000: bytes(64)})
    state = cpu(segment_bases={"fs": 0x9_0000})
    result = completed(emulate(bytes.fromhex("64660fae7308"), regs(rbx=0x10), state, memory), 6)  # %fs:8(%rbx)
    assert memory.reads == [(0x9_0018, 1)]
    assert result.mnemonic == "clwb"


def test_clflushopt() -> None:
    memory = FakeMemory({0x5000: bytes(64)})
    result = completed(emulate(bytes.fromhex("660fae3f"), regs(rdi=0x5000), cpu(), memory), 4)  # clflushopt (%rdi)
    assert result.mnemonic == "clflushopt"


def test_clwb_non_canonical_address() -> None:
    non_canonical = 0x0000_8000_0000_0000
    assert fault(emulate(bytes.fromhex("660fae30"), regs(rax=non_canonical), cpu(), no_memory)) == (13, 0)
    # through RBP the default segment is SS: #SS(0)
    assert fault(emulate(bytes.fromhex("660fae7510"), regs(rbp=non_canonical), cpu(), no_memory)) == (12, 0)
    # canonical with 5-level paging
    memory = FakeMemory({non_canonical: bytes(8)})
    assert emulate(bytes.fromhex("660fae30"), regs(rax=non_canonical), cpu(cr4=CR4_LA57), memory) is not None


def test_clwb_undefined_cases() -> None:
    assert fault(emulate(bytes.fromhex("660fae30"), regs(), cpu(cpuid=NOTHING), no_memory)) == (6, None)
    assert fault(emulate(bytes.fromhex("f0660fae30"), regs(), cpu(), no_memory)) == (6, None)


def test_clwb_not_guessed() -> None:
    assert emulate(bytes.fromhex("660fae30"), regs(rax=0x5000), cpu(), FakeMemory()) is None  # #PF
    assert emulate(bytes.fromhex("660fae30"), regs(), cpu(cpuid=None), no_memory) is None
    assert emulate(bytes.fromhex("660faef0"), regs(), cpu(), no_memory) is None  # mod 3: tpause
    assert emulate(bytes.fromhex("660fae28"), regs(), cpu(), no_memory) is None  # /5: not clwb
    assert emulate(bytes.fromhex("f3660fae30"), regs(), cpu(), no_memory) is None


# ----------------------------------------------------------------------------- INVPCID


def descriptor(pcid: int = 0, address: int = 0, reserved: int = 0) -> bytes:
    return (pcid | reserved << 12).to_bytes(8, "little") + address.to_bytes(8, "little")


@pytest.mark.parametrize("invalidation_type", [0, 1, 2, 3])
def test_invpcid_flushes(invalidation_type: int) -> None:
    memory = FakeMemory({0x6000: descriptor(address=0xFFFF_8000_0000_1000)})
    result = completed(
        emulate(bytes.fromhex("660f388208"), regs(rax=0x6000, rcx=invalidation_type), cpu(), memory), 5
    )  # invpcid (%rax),%rcx
    assert result.flush_tlb and result.mnemonic == "invpcid"
    assert memory.reads == [(0x6000, 16)]


def test_invpcid_register_encodings() -> None:
    memory = FakeMemory({0x6010: descriptor()})
    # invpcid 0x10(%rsp),%r9
    result = completed(emulate(bytes.fromhex("66440f38824c2410"), regs(rsp=0x6000, r9=2), cpu(), memory), 8)
    assert result.flush_tlb
    memory = FakeMemory({0x6000: descriptor()})
    # invpcid (%r8),%rdx
    assert completed(emulate(bytes.fromhex("66410f388210"), regs(r8=0x6000, rdx=3), cpu(), memory), 6).flush_tlb


def test_invpcid_type_register_is_64_bits_in_long_mode_and_32_elsewhere() -> None:
    memory = FakeMemory({0x6000: descriptor()})
    # bit 32 set: type 2^32 + 2 > 3 in 64-bit mode
    assert fault(emulate(bytes.fromhex("660f388208"), regs(rax=0x6000, rcx=1 << 32 | 2), cpu(), memory)) == (13, 0)
    protected = cpu(code_bits=32, cr0=PROTECTED_CR0, segment_bases={"ds": 0})
    assert completed(
        emulate(bytes.fromhex("660f388208"), regs(rax=0x6000, rcx=1 << 32 | 2), protected, memory), 5
    ).flush_tlb


def test_invpcid_general_protection_cases() -> None:
    def run(rcx: int, desc: bytes, state: CpuState | None = None) -> tuple[int, int | None]:
        memory = FakeMemory({0x6000: desc})
        return fault(emulate(bytes.fromhex("660f388208"), regs(rax=0x6000, rcx=rcx), state or cpu(), memory))

    assert run(4, descriptor()) == (13, 0)  # type > 3
    assert run(2, descriptor(reserved=1)) == (13, 0)  # descriptor bits 63:12
    assert run(0, descriptor(address=0x0000_8000_0000_0000)) == (13, 0)  # type 0, non-canonical
    assert run(0, descriptor(pcid=5)) == (13, 0)  # PCID without CR4.PCIDE
    assert run(1, descriptor(pcid=5)) == (13, 0)
    assert run(0, descriptor(), cpu(cpl=3)) == (13, 0)  # CPL > 0
    # real mode: no error code
    assert run(4, descriptor(), cpu(code_bits=16, cr0=0, segment_bases={"ds": 0})) == (13, None)


def test_invpcid_valid_with_pcide_and_for_all_context_types() -> None:
    memory = FakeMemory({0x6000: descriptor(pcid=5)})
    assert completed(
        emulate(bytes.fromhex("660f388208"), regs(rax=0x6000, rcx=1), cpu(cr4=CR4_PCIDE), memory), 5
    ).flush_tlb
    # types 2 and 3 ignore the descriptor's PCID and address (only its reserved bits count)
    memory = FakeMemory({0x6000: descriptor(pcid=5, address=0x0000_8000_0000_0000)})
    assert completed(emulate(bytes.fromhex("660f388208"), regs(rax=0x6000, rcx=2), cpu(), memory), 5).flush_tlb


def test_invpcid_memory_operand_checks() -> None:
    non_canonical = 0x0000_8000_0000_0000
    assert fault(emulate(bytes.fromhex("660f388208"), regs(rax=non_canonical), cpu(), no_memory)) == (13, 0)
    # 0x10(%rsp): SS
    assert fault(emulate(bytes.fromhex("66440f38824c2410"), regs(rsp=non_canonical), cpu(), no_memory)) == (12, 0)
    assert emulate(bytes.fromhex("660f388208"), regs(rax=0x6000), cpu(), FakeMemory()) is None  # #PF


def test_invpcid_undefined_cases() -> None:
    assert fault(emulate(bytes.fromhex("660f388208"), regs(), cpu(cpuid=NOTHING), no_memory)) == (6, None)
    assert fault(emulate(bytes.fromhex("f0660f388208"), regs(), cpu(), no_memory)) == (6, None)
    assert fault(emulate(bytes.fromhex("660f3882c8"), regs(), cpu(), no_memory)) == (6, None)  # register operand
    # #UD comes before the privilege check
    assert fault(emulate(bytes.fromhex("660f388208"), regs(), cpu(cpl=3, cpuid=NOTHING), no_memory)) == (6, None)
    assert emulate(bytes.fromhex("660f388208"), regs(), cpu(cpuid=None), no_memory) is None


# ----------------------------------------------------------------------------- reasons


def test_reasons_for_what_is_not_emulated() -> None:
    from hypervisor.vcpu.emulate import RFLAGS_TF, emulate_or_reason

    def reason(insn: str, registers: RegisterFile, state: CpuState, memory=no_memory) -> str:
        result = emulate_or_reason(bytes.fromhex(insn), registers, state, memory)
        assert isinstance(result, str), result
        return result

    stepping = regs()
    stepping.rflags |= RFLAGS_TF
    assert "single-step" in reason("cd80", stepping, cpu())
    assert reason("0f01fd", regs(), cpu(cpuid=None)) == "the guest's CPUID is not known (KVM_GET_CPUID2 failed)"
    assert "MPERF/APERF" in reason("0f01fd", regs(), cpu())
    assert "XCR0" in reason("0f01d0", regs(), cpu(cr4=CR4_OSXSAVE))
    assert f"{IDT + 0x80 * 16:#x}" in reason("cd80", regs(), cpu(), FakeMemory())
    assert "0x6000" in reason("660f388208", regs(rax=0x6000, rcx=2), cpu(), FakeMemory())
    assert reason("0f0b", regs(), cpu()) == "pyhv's emulator does not handle this instruction"
    assert reason("f0", regs(), cpu()).startswith("the bytes cannot be decoded")  # ends inside the prefixes
    assert reason("660f3882", regs(), cpu()).startswith("the bytes cannot be decoded")  # no ModRM


# GNU as text of the encodings the tests above use, so an independent encoder vouches for them.
ASSEMBLED = [
    ("int $0x80", "cd80"),
    ("invpcid (%rax), %rcx", "660f388208"),
    ("invpcid 0x10(%rsp), %r9", "66440f38824c2410"),
    ("invpcid (%r8), %rdx", "66410f388210"),
    ("xgetbv", "0f01d0"),
    ("clwb (%rax)", "660fae30"),
    ("clwb %fs:8(%rbx)", "64660fae7308"),
    ("clwb 0x10(%rbp)", "660fae7510"),
    ("clflushopt (%rdi)", "660fae3f"),
    ("lock cmpxchg16b (%rdi)", "f0480fc70f"),
    ("cmpxchg16b 0x20(%rsp)", "480fc74c2420"),
    ("rdpru", "0f01fd"),
]


@pytest.mark.skipif(
    shutil.which("as") is None or shutil.which("objcopy") is None,
    reason="GNU as/objcopy (binutils) not installed: no independent encoder",
)
def test_encodings_match_gnu_as(tmp_path: Path) -> None:
    source, obj, binary = tmp_path / "i.s", tmp_path / "i.o", tmp_path / "i.bin"
    for assembly, encoding in ASSEMBLED:
        source.write_text(f".code64\n{assembly}\n")
        subprocess.run(["as", "--64", str(source), "-o", str(obj)], check=True, timeout=30)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)], check=True, timeout=30)
        assert binary.read_bytes().hex() == encoding, assembly
