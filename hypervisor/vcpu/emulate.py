"""Emulate the few instructions a kvm_pvm host's KVM cannot run at CPL0 (PLATFORM.md).

On such a host the vCPU stops with KVM_EXIT_INTERNAL_ERROR, suberror KVM_INTERNAL_ERROR_EMULATION,
and the exit carries the instruction bytes. `emulate()` is a pure function of those bytes, the
registers, a little CPU state and a guest-memory reader; it returns what to write back, or None
when it does not handle the instruction (the caller then reports the emulation failure with the
bytes). It never guesses: an encoding it does not fully understand is None, never a wrong result.

Handled (Intel SDM Vol. 2 instruction pages):

* CLAC / STAC (NP 0F 01 CA / CB): clear / set RFLAGS.AC. #UD with LOCK, at CPL > 0, in real mode.
* INT3 (CC) at CPL0: #BP delivered as a software exception; the saved RIP points after the INT3
  ("INT n/INTO/INT3/INT1": the return address is the next instruction).
* POPCNT (F3 [REX.W] 0F B8 /r): dest = number of set bits of r/m16/32/64; ZF = (source == 0),
  OF SF AF CF PF cleared. Register and memory sources, every 16/32/64-bit addressing form.
* FWAIT (9B): #NM if CR0.MP and CR0.TS; #MF if an unmasked x87 exception is pending (FSW.ES) and
  CR0.NE; otherwise it does nothing but advance RIP ("WAIT/FWAIT": "checks for and handles
  pending unmasked floating-point exceptions").
* FNCLEX (DB E2): #NM if CR0.EM or CR0.TS; clears FSW bits 7:0 and 15 (C3-C0 are left as they
  were: the SDM says "undefined").
* EMMS (NP 0F 77): #UD if CR0.EM, #NM if CR0.TS, #MF if an x87 exception is pending; marks every
  x87 register empty (abridged tag word 0, the FXSAVE format KVM_GET_FPU returns).

Deliberately not handled (None): XSAVE/XRSTOR (0F AE /4 /5; the machine boots with `noxsave`),
FILD and other x87 arithmetic, anything in virtual-8086 mode or with RFLAGS.TF set (the single-step
trap after the instruction cannot be reproduced faithfully here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from hypervisor.errors import HypervisorError
from hypervisor.vcpu.x86_decode import (
    GPR_NAMES,
    DecodeError,
    MemoryOperand,
    Prefixes,
    address_bits,
    decode_modrm,
    decode_prefixes,
    operand_bits,
)

# RFLAGS bits (SDM Vol. 1 §3.4.3).
RFLAGS_CF = 1 << 0
RFLAGS_PF = 1 << 2
RFLAGS_AF = 1 << 4
RFLAGS_ZF = 1 << 6
RFLAGS_SF = 1 << 7
RFLAGS_TF = 1 << 8
RFLAGS_OF = 1 << 11
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18

# CR0 bits (SDM Vol. 3 §2.5).
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_NE = 1 << 5

# x87 status word (SDM Vol. 1 §8.1.3): exception flags 5:0, SF 6, ES 7, busy 15.
FSW_ERROR_SUMMARY = 1 << 7
FSW_CLEARED_BY_FNCLEX = 0x80FF

# Exception vectors (SDM Vol. 3 Table 6-1).
VECTOR_BP = 3
VECTOR_UD = 6
VECTOR_NM = 7
VECTOR_MF = 16

# struct emulation_failure in linux/kvm.h (KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION).
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

ReadGuest = Callable[[int, int], bytes | None]


@dataclass
class RegisterFile:
    """The registers an emulated instruction may read or change (the fields of struct kvm_regs)."""

    rax: int = 0
    rcx: int = 0
    rdx: int = 0
    rbx: int = 0
    rsp: int = 0
    rbp: int = 0
    rsi: int = 0
    rdi: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2

    def gpr(self, number: int) -> int:
        return int(getattr(self, GPR_NAMES[number]))

    def set_gpr(self, number: int, value: int) -> None:
        setattr(self, GPR_NAMES[number], value & (1 << 64) - 1)

    def copy(self) -> RegisterFile:
        return dataclasses.replace(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, int]) -> RegisterFile:
        """From a name -> value mapping such as `Vcpu.get_regs()`; extra names are ignored."""
        return cls(**{name: int(values[name]) for name in REGISTER_NAMES})

    def as_dict(self) -> dict[str, int]:
        """Name -> value, ready for `Vcpu.set_regs(**registers.as_dict())`."""
        return {name: getattr(self, name) for name in REGISTER_NAMES}

    @classmethod
    def from_kvm(cls, regs: object) -> RegisterFile:
        """Read a `struct kvm_regs` (a cffi object or anything with those attribute names)."""
        return cls(**{name: int(getattr(regs, name)) for name in REGISTER_NAMES})

    def to_kvm(self, regs: object) -> None:
        for name in REGISTER_NAMES:
            setattr(regs, name, getattr(self, name))


REGISTER_NAMES = (*GPR_NAMES, "rip", "rflags")


@dataclass(frozen=True)
class X87Status:
    """The part of the x87 state these instructions touch, as in struct kvm_fpu."""

    fsw: int  # status word
    ftw: int  # abridged tag word (FXSAVE format, kvm_fpu.ftwx): bit i set = register i valid


@dataclass(frozen=True)
class CpuState:
    """What besides the registers decides an instruction's meaning (from KVM_GET_SREGS)."""

    code_bits: int  # 16, 32 or 64: see code_bits_from_cs()
    cpl: int
    cr0: int
    segment_bases: Mapping[str, int] = field(default_factory=dict)  # "ds", "fs", ... -> base
    x87: X87Status | None = None  # from KVM_GET_FPU; needed only by FWAIT, FNCLEX and EMMS


def code_bits_from_cs(long_mode_active: bool, cs_l: bool, cs_db: bool) -> int:
    """The code size from EFER.LMA and the CS descriptor (SDM Vol. 3 §5.2.1)."""
    if long_mode_active and cs_l:
        return 64
    return 32 if cs_db else 16


@dataclass(frozen=True)
class InjectedException:
    vector: int
    error_code: int | None = None
    # True for INT3: a trap raised by an instruction, saved RIP after it (SDM Vol. 3 §6.5).
    software: bool = False


@dataclass(frozen=True)
class EmulationResult:
    """Write `registers` back (KVM_SET_REGS), `x87` if set (KVM_SET_FPU), then inject
    `exception` if set. For a fault, `registers.rip` still points at the instruction."""

    mnemonic: str
    length: int
    registers: RegisterFile
    exception: InjectedException | None = None
    x87: X87Status | None = None


def failure_instruction_bytes(ndata: int, data: Sequence[int]) -> bytes | None:
    """The instruction bytes of an emulation-failure exit (`run.internal.ndata` and `.data`)."""
    if ndata < 3 or len(data) < 3 or not data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
        return None
    raw = int(data[1]).to_bytes(8, "little") + int(data[2]).to_bytes(8, "little")
    size = min(raw[0], 15)
    return raw[1 : 1 + size] if size else None


PAGE_SIZE = 4096


def guest_reader(translate: Callable[[int], int | None],
                 read_physical: Callable[[int, int], bytes]) -> ReadGuest:
    """Build `read_guest` from a linear->physical translation (KVM_TRANSLATE) and a physical
    read (GuestMemory.read). Operands crossing a page boundary are read page by page, since
    the two pages need not be contiguous in physical memory; any failure reads as None."""

    def read_guest(address: int, size: int) -> bytes | None:
        chunks = []
        while size > 0:
            in_page = min(size, PAGE_SIZE - address % PAGE_SIZE)
            physical = translate(address)
            if physical is None:
                return None
            try:
                chunks.append(bytes(read_physical(physical, in_page)))
            except HypervisorError:  # e.g. GuestMemoryError: the page is not guest RAM
                return None
            address = (address + in_page) & (1 << 64) - 1
            size -= in_page
        return b"".join(chunks)

    return read_guest


def emulate(insn: bytes, regs: RegisterFile, cpu: CpuState, read_guest: ReadGuest) -> EmulationResult | None:
    """Emulate the instruction at the start of `insn`, or return None if it is not handled.

    `read_guest(linear_address, size)` returns the bytes, or None when they cannot be read.
    """
    if regs.rflags & (RFLAGS_TF | RFLAGS_VM) or cpu.code_bits not in (16, 32, 64):
        return None
    try:
        prefixes = decode_prefixes(insn, cpu.code_bits)
        return _dispatch(insn, prefixes, regs, cpu, read_guest)
    except DecodeError:
        return None


def _dispatch(insn: bytes, prefixes: Prefixes, regs: RegisterFile, cpu: CpuState,
              read_guest: ReadGuest) -> EmulationResult | None:
    at = prefixes.length
    opcode = insn[at : at + 3]
    mandatory = prefixes.operand_size_override or prefixes.rep or prefixes.repne
    if opcode[:1] == b"\xcc":
        return _int3(prefixes, regs, cpu)
    if opcode[:1] == b"\x9b":
        return _fwait(prefixes, regs, cpu)
    if opcode[:2] == b"\xdb\xe2":
        return _fnclex(prefixes, regs, cpu)
    if opcode[:3] in (b"\x0f\x01\xca", b"\x0f\x01\xcb"):
        return None if mandatory else _clac_stac(opcode[2] == 0xCB, prefixes, regs, cpu)
    if opcode[:2] == b"\x0f\x77":
        return None if mandatory else _emms(prefixes, regs, cpu)
    if opcode[:2] == b"\x0f\xb8" and prefixes.rep and not prefixes.repne:
        return _popcnt(insn, prefixes, regs, cpu, read_guest)
    return None


def _advance(regs: RegisterFile, length: int, cpu: CpuState) -> RegisterFile:
    """Registers after an instruction completes: RIP past it, RFLAGS.RF cleared (SDM Vol. 3
    §17.3.1.1). Outside 64-bit mode the instruction pointer wraps at 32 (or 16) bits."""
    new = regs.copy()
    mask = (1 << 64) - 1 if cpu.code_bits == 64 else (1 << 32) - 1 if cpu.code_bits == 32 else 0xFFFF
    new.rip = (regs.rip + length) & mask
    new.rflags = regs.rflags & ~RFLAGS_RF
    return new


def _fault(mnemonic: str, length: int, regs: RegisterFile, vector: int) -> EmulationResult:
    return EmulationResult(mnemonic, length, regs.copy(), InjectedException(vector))


def _int3(prefixes: Prefixes, regs: RegisterFile, cpu: CpuState) -> EmulationResult | None:
    length = prefixes.length + 1
    if prefixes.lock:
        return _fault("int3", length, regs, VECTOR_UD)
    if cpu.cpl != 0:
        return None  # the IDT gate's DPL decides between #BP and #GP; not known here
    return EmulationResult("int3", length, _advance(regs, length, cpu),
                           InjectedException(VECTOR_BP, software=True))


def _clac_stac(set_ac: bool, prefixes: Prefixes, regs: RegisterFile, cpu: CpuState) -> EmulationResult:
    mnemonic, length = ("stac" if set_ac else "clac"), prefixes.length + 3
    if prefixes.lock or cpu.cpl != 0 or not cpu.cr0 & CR0_PE:
        return _fault(mnemonic, length, regs, VECTOR_UD)
    new = _advance(regs, length, cpu)
    new.rflags = new.rflags | RFLAGS_AC if set_ac else new.rflags & ~RFLAGS_AC
    return EmulationResult(mnemonic, length, new)


def _fwait(prefixes: Prefixes, regs: RegisterFile, cpu: CpuState) -> EmulationResult | None:
    length = prefixes.length + 1
    if prefixes.lock:
        return _fault("fwait", length, regs, VECTOR_UD)
    if cpu.cr0 & CR0_MP and cpu.cr0 & CR0_TS:
        return _fault("fwait", length, regs, VECTOR_NM)
    if cpu.x87 is None:
        return None
    if cpu.x87.fsw & FSW_ERROR_SUMMARY:
        # With CR0.NE clear the PC reports the error through FERR#/IRQ 13 instead: not modelled.
        return _fault("fwait", length, regs, VECTOR_MF) if cpu.cr0 & CR0_NE else None
    return EmulationResult("fwait", length, _advance(regs, length, cpu))


def _fnclex(prefixes: Prefixes, regs: RegisterFile, cpu: CpuState) -> EmulationResult | None:
    length = prefixes.length + 2
    if prefixes.lock:
        return _fault("fnclex", length, regs, VECTOR_UD)
    if cpu.cr0 & (CR0_EM | CR0_TS):
        return _fault("fnclex", length, regs, VECTOR_NM)
    if cpu.x87 is None:
        return None
    cleared = dataclasses.replace(cpu.x87, fsw=cpu.x87.fsw & ~FSW_CLEARED_BY_FNCLEX)
    return EmulationResult("fnclex", length, _advance(regs, length, cpu), x87=cleared)


def _emms(prefixes: Prefixes, regs: RegisterFile, cpu: CpuState) -> EmulationResult | None:
    length = prefixes.length + 2
    if prefixes.lock or cpu.cr0 & CR0_EM:
        return _fault("emms", length, regs, VECTOR_UD)
    if cpu.cr0 & CR0_TS:
        return _fault("emms", length, regs, VECTOR_NM)
    if cpu.x87 is None:
        return None
    if cpu.x87.fsw & FSW_ERROR_SUMMARY:
        return _fault("emms", length, regs, VECTOR_MF) if cpu.cr0 & CR0_NE else None
    return EmulationResult("emms", length, _advance(regs, length, cpu),
                           x87=dataclasses.replace(cpu.x87, ftw=0))


def _popcnt(insn: bytes, prefixes: Prefixes, regs: RegisterFile, cpu: CpuState,
            read_guest: ReadGuest) -> EmulationResult | None:
    size = operand_bits(prefixes, cpu.code_bits)
    addressing = address_bits(prefixes, cpu.code_bits)
    modrm = decode_modrm(insn, prefixes.length + 2, addressing, prefixes.rex, cpu.code_bits)
    length = prefixes.length + 2 + modrm.length
    if length > 15:
        return None  # #GP on the CPU; not worth modelling
    if prefixes.lock:
        return _fault("popcnt", length, regs, VECTOR_UD)
    mask = (1 << size) - 1
    if modrm.memory is None:
        assert modrm.rm_register is not None
        source = regs.gpr(modrm.rm_register) & mask
    else:
        linear = _linear_address(modrm.memory, prefixes, regs, cpu, addressing, length)
        if linear is None:
            return None
        data = read_guest(linear, size // 8)
        if data is None or len(data) != size // 8:
            return None
        source = int.from_bytes(data, "little")
    count = bin(source).count("1")
    new = _advance(regs, length, cpu)
    if size == 16:  # a 16-bit destination keeps bits 63:16; 32-bit results zero-extend (§3.4.1.1)
        new.set_gpr(modrm.reg, (regs.gpr(modrm.reg) & ~0xFFFF) | count)
    else:
        new.set_gpr(modrm.reg, count)
    status = RFLAGS_OF | RFLAGS_SF | RFLAGS_ZF | RFLAGS_AF | RFLAGS_CF | RFLAGS_PF
    new.rflags = (new.rflags & ~status) | (RFLAGS_ZF if source == 0 else 0)
    return EmulationResult("popcnt", length, new)


def _linear_address(memory: MemoryOperand, prefixes: Prefixes, regs: RegisterFile, cpu: CpuState,
                    addressing: int, length: int) -> int | None:
    """Effective address (SDM Vol. 1 §3.7.5) plus the segment base; None if a base is unknown.
    Segment limits are not checked: outside 64-bit mode this relies on flat segments."""
    address_mask = (1 << addressing) - 1
    effective = memory.displacement
    if memory.base is not None:
        effective += regs.gpr(memory.base)
    if memory.index is not None:
        effective += regs.gpr(memory.index) * memory.scale
    if memory.rip_relative:
        effective += regs.rip + length  # relative to the next instruction (§2.2.1.6)
    effective &= address_mask
    segment = prefixes.segment or memory.default_segment
    if cpu.code_bits == 64:
        if segment not in ("fs", "gs"):
            return effective  # CS, DS, ES, SS have base 0 in 64-bit mode (SDM Vol. 3 §3.4.4)
        base = cpu.segment_bases.get(segment)
        return None if base is None else (base + effective) & (1 << 64) - 1
    base = cpu.segment_bases.get(segment)
    return None if base is None else (base + effective) & 0xFFFFFFFF
