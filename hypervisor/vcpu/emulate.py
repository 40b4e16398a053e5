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
* INT imm8 (CD ib): the checks of "INT n/INTO/INT3/INT1" (Operation) before delivery, made here
  because delivering an interrupt skips the software-only ones and kvm_pvm's delivery was seen
  to skip the code-segment ones: vector beyond the IDT limit or a gate type not valid in this
  mode -> #GP(vector * 8 + 2); gate DPL < CPL -> #GP(vector * 8 + 2); gate not present ->
  #NP(vector * 8 + 2); the gate's code segment null -> #GP(0); beyond its table, not code,
  DPL > CPL, or not 64-bit code in IA-32e mode -> #GP(selector); not present -> #NP(selector).
  Then the vector is delivered as an interrupt with RIP past the INT (the caller injects it:
  KVM_SET_VCPU_EVENTS `interrupt`), so KVM does the stack switch and the pushes. No error code
  is pushed for any vector, 8, 10-14 and 17 included.
* RDPRU (0F 01 FD, AMD APM Vol. 3): #UD when the guest's CPUID lacks it (Fn8000_0008 EBX[4]);
  with the bit set it is not emulated (the APERF/MPERF values are the host's).
* XGETBV (NP 0F 01 D0): #UD if CPUID lacks XSAVE or CR4.OSXSAVE = 0; #GP(0) for an ECX that
  names no supported XCR; EDX:EAX = XCR0 for ECX = 0 (XINUSE, ECX = 1, is not emulated).
* CLWB / CLFLUSHOPT (66 0F AE /6, /7, memory operand): #UD without the CPUID bit; the address
  checks (non-canonical -> #GP(0), or #SS(0) through SS; an unmapped page is not emulated);
  then nothing: guest memory is ordinary coherent host memory, and "CLWB ... may retain the
  line in the cache hierarchy in non-modified state", so writing nothing back is correct.
* INVPCID (66 0F 38 82 /r): #UD without CPUID.(7,0):EBX[10] or with LOCK or a register operand;
  #GP(0) at CPL > 0, for a type > 3, descriptor bits 63:12 set, a non-canonical address (type 0),
  a PCID other than 0 with CR4.PCIDE = 0 (types 0 and 1). Then `flush_tlb`: the caller flushes
  every TLB entry, a superset of each type.
* CMPXCHG16B (F0 REX.W 0F C7 /1 m128, 64-bit mode): #UD without CPUID.1:ECX.CX16 or with a
  register operand; #GP(0) if the operand is not 16-byte aligned or not canonical (#SS(0) via SS);
  compare RDX:RAX with m128, ZF = equal, store RCX:RBX or load RDX:RAX; the other flags are
  unchanged. The exchange itself is the caller's `exchange_guest` (atomic on the host mapping).
* MOVD/MOVQ with an MMX register (NP 0F 6E /r: mm <- r/m32, with REX.W r/m64; NP 0F 7E /r:
  r/m32 or r/m64 <- mm): #UD if CR0.EM or LOCK, #NM if CR0.TS, #MF if an x87 exception is
  pending, address faults as MOVBE's. A 32-bit source is zero-extended into the MMX register, a
  32-bit GPR destination zero-extends (§3.4.1.1). Like every MMX instruction but EMMS it sets
  the x87 TOP to 0 and every tag valid, and writing MMi sets bits 79:64 of the physical register
  Ri to ones (SDM Vol. 1 §9.5.1). The data registers come in stack order (`X87Status.st`) and
  go back in it, rotated for the new TOP. The 66 (XMM) and F3 forms are not handled.
* MOVBE (0F 38 F0 /r load, 0F 38 F1 /r store; 16, 32 or 64 bits by 66 and REX.W): the bytes
  reversed between the register and m16/32/64. #UD without CPUID.01H:ECX.MOVBE[bit 22], with
  LOCK or REP (F3), or with a register operand (the instruction has memory forms only); with
  REPNE (F2) the bytes are CRC32 when the guest has SSE4.2 (not emulated), #UD otherwise.
  Non-canonical operand -> #GP(0), or #SS(0) through SS; #AC(0) for a misaligned operand at CPL3
  with CR0.AM and RFLAGS.AC. A 16-bit load keeps bits 63:16 of the register, a 32-bit one
  zero-extends (SDM Vol. 1 §3.4.1.1). The store goes through `exchange_guest` like CMPXCHG16B's:
  each aligned 16 bytes the operand touches is compare-and-exchanged with the new bytes spliced
  in, so bytes around the operand that another vCPU writes meanwhile are kept and an aligned store
  is single-copy atomic as on the CPU (SDM Vol. 3 §9.1.1). Both pages of an operand that crosses
  a page are read first, so nothing is written unless every byte is in mapped guest RAM.

Memory faults are not modelled: an operand on a page that is not present (KVM_TRANSLATE fails)
or not guest RAM (MMIO) is NotEmulated with the address, never a guessed #PF. A store to a
present but read-only page is not caught: KVM_TRANSLATE does a supervisor walk without access
checks and reports every page writable, and this module does not walk the guest's page tables
(it is not given CR3); CMPXCHG16B has the same limit.

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
    MAX_INSTRUCTION_LENGTH,
    REX_W,
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

RFLAGS_IF = 1 << 9

# CR4 bits (SDM Vol. 3 §2.5).
CR4_LA57 = 1 << 12
CR4_PCIDE = 1 << 17
CR4_OSXSAVE = 1 << 18

# CR0 bits (SDM Vol. 3 §2.5).
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_NE = 1 << 5
CR0_AM = 1 << 18

# x87 status word (SDM Vol. 1 §8.1.3): exception flags 5:0, SF 6, ES 7, busy 15.
FSW_ERROR_SUMMARY = 1 << 7
FSW_CLEARED_BY_FNCLEX = 0x80FF

# Exception vectors (SDM Vol. 3 Table 6-1).
VECTOR_BP = 3
VECTOR_UD = 6
VECTOR_NM = 7
VECTOR_NP = 11
VECTOR_SS = 12
VECTOR_GP = 13
VECTOR_MF = 16
VECTOR_AC = 17

# struct emulation_failure in linux/kvm.h (KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION).
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

ReadGuest = Callable[[int, int], bytes | None]
# exchange_guest(linear, expected_low, expected_high, desired_low, desired_high) ->
# (swapped, memory_low, memory_high) as one atomic 16-byte compare-and-exchange, or None when the
# address is not accessible guest RAM.
ExchangeGuest = Callable[[int, int, int, int, int], "tuple[bool, int, int] | None"]
# Guest CPUID as the guest sees it: (leaf, subleaf) -> (eax, ebx, ecx, edx); subleaf 0 for leaves
# without subleaves.
GuestCpuid = Mapping[tuple[int, int], tuple[int, int, int, int]]


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
    # The eight data registers in stack order ST(0)..ST(7), 10 bytes each (kvm_fpu.fpr[i][0:10],
    # the FXSAVE layout); needed only by the MMX MOVD/MOVQ, None when the caller gives none.
    st: tuple[bytes, ...] | None = None


@dataclass(frozen=True)
class CpuState:
    """What besides the registers decides an instruction's meaning (from KVM_GET_SREGS)."""

    code_bits: int  # 16, 32 or 64: see code_bits_from_cs()
    cpl: int
    cr0: int
    segment_bases: Mapping[str, int] = field(default_factory=dict)  # "ds", "fs", ... -> base
    x87: X87Status | None = None  # from KVM_GET_FPU; needed only by FWAIT, FNCLEX, EMMS and MMX MOVD/MOVQ
    cr4: int = 0
    idt_base: int | None = None  # linear address of the IDT (sregs.idt); needed only by INT n
    idt_limit: int = 0
    gdt_base: int | None = None  # linear address of the GDT (sregs.gdt); needed only by INT n
    gdt_limit: int = 0
    ldt_base: int | None = None  # None when LDTR is unusable (a null LDT)
    ldt_limit: int = 0
    efer_lma: bool = False  # IA-32e mode active; 64-bit code implies it
    cpuid: GuestCpuid | None = None  # None: unknown, so CPUID-dependent instructions are not emulated
    xcr0: int | None = None  # from KVM_GET_XCRS; needed only by XGETBV


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
    # INT n: deliver this vector as an interrupt (KVM_SET_VCPU_EVENTS `interrupt`, not soft),
    # with `registers.rip` already past the instruction, which is INT n's return address.
    interrupt: int | None = None
    flush_tlb: bool = False  # INVPCID: flush every TLB entry, global ones included


def failure_instruction_bytes(ndata: int, data: Sequence[int]) -> bytes | None:
    """The instruction bytes of an emulation-failure exit (`run.internal.ndata` and `.data`)."""
    if ndata < 3 or len(data) < 3 or not data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
        return None
    raw = int(data[1]).to_bytes(8, "little") + int(data[2]).to_bytes(8, "little")
    size = min(raw[0], 15)
    return raw[1 : 1 + size] if size else None


PAGE_SIZE = 4096


def guest_reader(translate: Callable[[int], int | None], read_physical: Callable[[int, int], bytes]) -> ReadGuest:
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


class NotEmulated(Exception):
    """An instruction the emulator knows but cannot run faithfully in this state; says why."""


_UNKNOWN_CPUID = "the guest's CPUID is not known (KVM_GET_CPUID2 failed)"
_UNKNOWN_BASE = "the operand's segment base is not known"
# With CR0.NE clear a PC reports a pending x87 error through FERR# and IRQ 13 (SDM Vol. 1 §8.7).
_X87_ERROR_WITHOUT_NE = "a pending x87 error with CR0.NE = 0 goes to FERR#/IRQ 13, which is not modelled"


def _unreadable(linear: int) -> str:
    return f"guest memory at {linear:#x} cannot be read (a page fault, or not guest RAM), which is not modelled"


def emulate(
    insn: bytes,
    regs: RegisterFile,
    cpu: CpuState,
    read_guest: ReadGuest,
    exchange_guest: ExchangeGuest | None = None,
) -> EmulationResult | None:
    """Emulate the instruction at the start of `insn`, or return None if it is not handled.

    `read_guest(linear_address, size)` returns the bytes, or None when they cannot be read.
    `exchange_guest` does CMPXCHG16B's atomic exchange and MOVBE's store; without it neither
    is emulated.
    """
    result = emulate_or_reason(insn, regs, cpu, read_guest, exchange_guest)
    return result if isinstance(result, EmulationResult) else None


def emulate_or_reason(
    insn: bytes,
    regs: RegisterFile,
    cpu: CpuState,
    read_guest: ReadGuest,
    exchange_guest: ExchangeGuest | None = None,
) -> EmulationResult | str:
    """As `emulate`, but when the instruction is not emulated, the reason (one line)."""
    if regs.rflags & RFLAGS_TF:
        return "RFLAGS.TF is set: the single-step trap after the instruction is not reproduced"
    if regs.rflags & RFLAGS_VM:
        return "virtual-8086 mode is not emulated"
    if cpu.code_bits not in (16, 32, 64):
        return f"unknown code size {cpu.code_bits}"
    try:
        prefixes = decode_prefixes(insn, cpu.code_bits)
        result = _dispatch(insn, prefixes, regs, cpu, read_guest, exchange_guest)
    except DecodeError as error:
        return f"the bytes cannot be decoded: {error}"
    except NotEmulated as refusal:
        return str(refusal)
    return "pyhv's emulator does not handle this instruction" if result is None else result


def _dispatch(
    insn: bytes,
    prefixes: Prefixes,
    regs: RegisterFile,
    cpu: CpuState,
    read_guest: ReadGuest,
    exchange_guest: ExchangeGuest | None,
) -> EmulationResult | None:
    at = prefixes.length
    opcode = insn[at : at + 3]
    mandatory = prefixes.operand_size_override or prefixes.rep or prefixes.repne
    if opcode[:1] == b"\xcd":
        return _int_n(insn, prefixes, regs, cpu, read_guest)
    if opcode[:3] == b"\x0f\x01\xfd":
        return None if mandatory else _rdpru(prefixes, regs, cpu)
    if opcode[:3] == b"\x0f\x01\xd0":
        return None if mandatory else _xgetbv(prefixes, regs, cpu)
    if opcode[:2] == b"\x0f\xae" and prefixes.operand_size_override and not (prefixes.rep or prefixes.repne):
        return _cache_line_write_back(insn, prefixes, regs, cpu, read_guest)
    if opcode[:3] == b"\x0f\x38\x82" and prefixes.operand_size_override and not (prefixes.rep or prefixes.repne):
        return _invpcid(insn, prefixes, regs, cpu, read_guest)
    if opcode[:2] == b"\x0f\xc7" and cpu.code_bits == 64 and prefixes.rex & REX_W:
        return _cmpxchg16b(insn, prefixes, regs, cpu, exchange_guest)
    if opcode[:2] in (b"\x0f\x6e", b"\x0f\x7e"):
        return None if mandatory else _mmx_movd_movq(insn, prefixes, regs, cpu, read_guest, exchange_guest)
    if opcode[:3] in (b"\x0f\x38\xf0", b"\x0f\x38\xf1"):
        return _movbe(insn, prefixes, regs, cpu, read_guest, exchange_guest)
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
        raise NotEmulated("int3 above CPL0: the gate DPL decides between #BP and #GP")
    return EmulationResult("int3", length, _advance(regs, length, cpu), InjectedException(VECTOR_BP, software=True))


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
        raise NotEmulated("the x87 state is not known")
    if cpu.x87.fsw & FSW_ERROR_SUMMARY:
        if not cpu.cr0 & CR0_NE:
            raise NotEmulated(_X87_ERROR_WITHOUT_NE)
        return _fault("fwait", length, regs, VECTOR_MF)
    return EmulationResult("fwait", length, _advance(regs, length, cpu))


def _fnclex(prefixes: Prefixes, regs: RegisterFile, cpu: CpuState) -> EmulationResult | None:
    length = prefixes.length + 2
    if prefixes.lock:
        return _fault("fnclex", length, regs, VECTOR_UD)
    if cpu.cr0 & (CR0_EM | CR0_TS):
        return _fault("fnclex", length, regs, VECTOR_NM)
    if cpu.x87 is None:
        raise NotEmulated("the x87 state is not known")
    cleared = dataclasses.replace(cpu.x87, fsw=cpu.x87.fsw & ~FSW_CLEARED_BY_FNCLEX)
    return EmulationResult("fnclex", length, _advance(regs, length, cpu), x87=cleared)


def _emms(prefixes: Prefixes, regs: RegisterFile, cpu: CpuState) -> EmulationResult | None:
    length = prefixes.length + 2
    if prefixes.lock or cpu.cr0 & CR0_EM:
        return _fault("emms", length, regs, VECTOR_UD)
    if cpu.cr0 & CR0_TS:
        return _fault("emms", length, regs, VECTOR_NM)
    if cpu.x87 is None:
        raise NotEmulated("the x87 state is not known")
    if cpu.x87.fsw & FSW_ERROR_SUMMARY:
        if not cpu.cr0 & CR0_NE:
            raise NotEmulated(_X87_ERROR_WITHOUT_NE)
        return _fault("emms", length, regs, VECTOR_MF)
    return EmulationResult("emms", length, _advance(regs, length, cpu), x87=dataclasses.replace(cpu.x87, ftw=0))


def _popcnt(
    insn: bytes, prefixes: Prefixes, regs: RegisterFile, cpu: CpuState, read_guest: ReadGuest
) -> EmulationResult | None:
    size = operand_bits(prefixes, cpu.code_bits)
    addressing = address_bits(prefixes, cpu.code_bits)
    modrm = decode_modrm(insn, prefixes.length + 2, addressing, prefixes.rex, cpu.code_bits)
    length = prefixes.length + 2 + modrm.length
    if length > 15:
        raise NotEmulated("longer than 15 bytes (#GP on the CPU)")
    if prefixes.lock:
        return _fault("popcnt", length, regs, VECTOR_UD)
    mask = (1 << size) - 1
    if modrm.memory is None:
        assert modrm.rm_register is not None
        source = regs.gpr(modrm.rm_register) & mask
    else:
        linear = _linear_address(modrm.memory, prefixes, regs, cpu, addressing, length)
        if linear is None:
            raise NotEmulated(_UNKNOWN_BASE)
        data = read_guest(linear, size // 8)
        if data is None or len(data) != size // 8:
            raise NotEmulated(_unreadable(linear))
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


def _linear_address(
    memory: MemoryOperand, prefixes: Prefixes, regs: RegisterFile, cpu: CpuState, addressing: int, length: int
) -> int | None:
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


# Register numbers (ModRM order) and positions in a CPUID (eax, ebx, ecx, edx) tuple.
RAX, RCX, RDX, RBX = 0, 1, 2, 3
EAX_OUT, EBX_OUT, ECX_OUT, EDX_OUT = 0, 1, 2, 3

# Gate types of IDT descriptors (SDM Vol. 3 §3.5 Table 3-2; in IA-32e mode only 64-bit interrupt
# and trap gates, §6.14.1).
GATE_TASK, GATE_INTERRUPT_16, GATE_TRAP_16, GATE_INTERRUPT_32, GATE_TRAP_32 = 0x5, 0x6, 0x7, 0xE, 0xF
LEGACY_GATE_TYPES = frozenset({GATE_TASK, GATE_INTERRUPT_16, GATE_TRAP_16, GATE_INTERRUPT_32, GATE_TRAP_32})
LONG_MODE_GATE_TYPES = frozenset({GATE_INTERRUPT_32, GATE_TRAP_32})
ERROR_CODE_IDT = 1 << 1  # error-code bit 1: the index refers to the IDT (SDM Vol. 3 §6.13)
REAL_MODE_VECTOR_SIZE = 4  # an IVT entry is offset:segment, 16 bits each (SDM Vol. 3 §20.1.4)

INVPCID_INDIVIDUAL_ADDRESS, INVPCID_SINGLE_CONTEXT = 0, 1
INVPCID_LAST_TYPE = 3  # 2: all contexts with globals, 3: all contexts without globals


def _cpuid_bit(cpu: CpuState, leaf: int, subleaf: int, register: int, bit: int) -> bool | None:
    """Whether the guest's CPUID (not the host's) has the bit; None if the CPUID is not known.
    A leaf the guest does not have reads as zeros, so its features are absent."""
    if cpu.cpuid is None:
        return None
    values = cpu.cpuid.get((leaf, subleaf))
    return values is not None and bool(values[register] >> bit & 1)


def _canonical(address: int, cpu: CpuState) -> bool:
    """Bits 63 down to the top implemented bit (47, or 56 with 5-level paging) are all equal
    (SDM Vol. 1 §3.3.7.1)."""
    bits = 57 if cpu.cr4 & CR4_LA57 else 48
    top = address >> (bits - 1)
    return top in (0, (1 << (65 - bits)) - 1)


def _fault_with_code(
    mnemonic: str, length: int, regs: RegisterFile, cpu: CpuState, vector: int, error_code: int = 0
) -> EmulationResult:
    """A fault that pushes an error code in protected mode; real mode pushes none (SDM Vol. 3
    §20.1.4: exceptions in real-address mode have no error code)."""
    code = error_code if cpu.cr0 & CR0_PE else None
    return EmulationResult(mnemonic, length, regs.copy(), InjectedException(vector, code))


def _address_fault(linear: int, memory: MemoryOperand, prefixes: Prefixes, cpu: CpuState) -> int | None:
    """The vector for a memory operand at a non-canonical address in 64-bit mode: #SS when it is
    reached through SS, #GP otherwise (the "64-Bit Mode Exceptions" of each instruction page);
    None when the address may be used. Segment limits outside 64-bit mode are not checked
    (flat segments, see `_linear_address`)."""
    if cpu.code_bits == 64 and not _canonical(linear, cpu):
        return VECTOR_SS if (prefixes.segment or memory.default_segment) == "ss" else VECTOR_GP
    return None


def _int_n(
    insn: bytes, prefixes: Prefixes, regs: RegisterFile, cpu: CpuState, read_guest: ReadGuest
) -> EmulationResult | None:
    """INT imm8 ("INT n/INTO/INT3/INT1", Operation, for INT n). What differs from an external
    interrupt is checked here; the delivery itself (stack switch, pushes, gate's CS:RIP, IF for
    interrupt gates) is KVM's, so it is exactly what the hardware path does."""
    length = prefixes.length + 2
    if len(insn) < length:
        raise NotEmulated("the bytes end before the vector")
    vector = insn[length - 1]
    if prefixes.lock:
        return _fault("int", length, regs, VECTOR_UD)
    if cpu.idt_base is None:
        raise NotEmulated("the IDT base is not known")
    if not cpu.cr0 & CR0_PE:  # real mode: "IF ((vector_number « 2) + 3) is not within IDT limit"
        if vector * REAL_MODE_VECTOR_SIZE + REAL_MODE_VECTOR_SIZE - 1 > cpu.idt_limit:
            return _fault("int", length, regs, VECTOR_GP)
        return EmulationResult("int", length, _advance(regs, length, cpu), interrupt=vector)
    entry_size = 16 if _ia32e(cpu) else 8
    idt_error = vector * 8 + ERROR_CODE_IDT  # EXT = 0: INT n is not an external event
    if vector * entry_size + entry_size - 1 > cpu.idt_limit:
        return _fault_with_code("int", length, regs, cpu, VECTOR_GP, idt_error)
    gate_bytes = read_guest((cpu.idt_base + vector * entry_size) & (1 << 64) - 1, 8)
    if gate_bytes is None or len(gate_bytes) != 8:
        raise NotEmulated(_unreadable(cpu.idt_base + vector * entry_size) + " (the IDT entry)")
    gate = int.from_bytes(gate_bytes, "little")
    gate_type, system, dpl, present = gate >> 40 & 0xF, gate >> 44 & 1, gate >> 45 & 3, gate >> 47 & 1
    valid = LONG_MODE_GATE_TYPES if _ia32e(cpu) else LEGACY_GATE_TYPES
    if system or gate_type not in valid:
        return _fault_with_code("int", length, regs, cpu, VECTOR_GP, idt_error)
    if dpl < cpu.cpl:  # only for software interrupts: user code may not call kernel-only gates
        return _fault_with_code("int", length, regs, cpu, VECTOR_GP, idt_error)
    if not present:
        return _fault_with_code("int", length, regs, cpu, VECTOR_NP, idt_error)
    if gate_type != GATE_TASK:
        code_segment_fault = _gate_code_segment_fault(gate >> 16 & 0xFFFF, cpu, read_guest)
        if code_segment_fault != _NO_FAULT:
            fault_vector, error_code = code_segment_fault
            return _fault_with_code("int", length, regs, cpu, fault_vector, error_code)
    # No error code for any vector, 8 and 10-14 and 17 included: the SDM's INT n pushes none.
    return EmulationResult("int", length, _advance(regs, length, cpu), interrupt=vector)


_NO_FAULT = (-1, -1)
SELECTOR_TABLE_LOCAL = 1 << 2  # TI: the selector indexes the LDT (SDM Vol. 3 §3.4.2)
DESCRIPTOR_CODE = 1 << 43  # type bit 3 of a code/data descriptor: code (SDM Vol. 3 §3.4.5.1)


def _gate_code_segment_fault(selector: int, cpu: CpuState, read_guest: ReadGuest) -> tuple[int, int]:
    """The checks of the code segment an interrupt or trap gate names ("INT n", Operation,
    TRAP-OR-INTERRUPT-GATE): (vector, error code) of the fault, _NO_FAULT when delivery may go
    on; NotEmulated when the descriptor cannot be read. Error codes carry the selector without its RPL
    and EXT = 0."""
    error = selector & 0xFFFC
    if selector & 0xFFFC == 0:
        return VECTOR_GP, 0  # a null selector: #GP(EXT)
    if selector & SELECTOR_TABLE_LOCAL:
        base, limit = cpu.ldt_base, cpu.ldt_limit
        if base is None:
            return VECTOR_GP, error  # no LDT: every local selector is beyond its (empty) table
    else:
        base, limit = cpu.gdt_base, cpu.gdt_limit
        if base is None:
            raise NotEmulated("the GDT base is not known")
    index = selector >> 3
    if index * 8 + 7 > limit:
        return VECTOR_GP, error
    raw = read_guest((base + index * 8) & (1 << 64) - 1, 8)
    if raw is None or len(raw) != 8:
        raise NotEmulated(_unreadable(base + index * 8) + " (the gate's code segment descriptor)")
    descriptor = int.from_bytes(raw, "little")
    is_code = bool(descriptor >> 44 & 1) and bool(descriptor & DESCRIPTOR_CODE)
    dpl, present = descriptor >> 45 & 3, descriptor >> 47 & 1
    if not is_code or dpl > cpu.cpl:
        return VECTOR_GP, error
    if not present:
        return VECTOR_NP, error
    long_mode_code = descriptor >> 53 & 1 and not descriptor >> 54 & 1  # L = 1, D = 0
    if _ia32e(cpu) and not long_mode_code:
        return VECTOR_GP, error  # IA-32e mode gates must lead to 64-bit code (SDM Vol. 3 §6.14.1)
    # A non-conforming segment with DPL < CPL means a privilege change: the stack switch is
    # part of KVM's delivery, like everything after these checks.
    return _NO_FAULT


def _ia32e(cpu: CpuState) -> bool:
    """IA-32e mode (EFER.LMA): 64-bit or compatibility mode, both with 16-byte IDT gates."""
    return cpu.efer_lma or cpu.code_bits == 64


def _rdpru(prefixes: Prefixes, regs: RegisterFile, cpu: CpuState) -> EmulationResult | None:
    """RDPRU (AMD APM Vol. 3): #UD unless CPUID Fn8000_0008 EBX[4] offers it."""
    length = prefixes.length + 3
    if prefixes.lock:
        return _fault("rdpru", length, regs, VECTOR_UD)
    offered = _cpuid_bit(cpu, 0x80000008, 0, EBX_OUT, 4)
    if offered is None:
        raise NotEmulated(_UNKNOWN_CPUID)
    if not offered:
        return _fault("rdpru", length, regs, VECTOR_UD)
    raise NotEmulated("the guest's CPUID offers RDPRU, and MPERF/APERF would be the host's counters")


def _xgetbv(prefixes: Prefixes, regs: RegisterFile, cpu: CpuState) -> EmulationResult | None:
    length = prefixes.length + 3
    if prefixes.lock:
        return _fault("xgetbv", length, regs, VECTOR_UD)
    xsave = _cpuid_bit(cpu, 0x1, 0, ECX_OUT, 26)
    if xsave is None:
        raise NotEmulated(_UNKNOWN_CPUID)
    if not xsave or not cpu.cr4 & CR4_OSXSAVE:
        return _fault("xgetbv", length, regs, VECTOR_UD)
    register = regs.rcx & 0xFFFFFFFF
    if register == 1 and _cpuid_bit(cpu, 0xD, 1, EAX_OUT, 2):
        raise NotEmulated("XGETBV with ECX = 1 (XINUSE) reports the host's init optimisation")
    if register != 0:
        return _fault_with_code("xgetbv", length, regs, cpu, VECTOR_GP)
    if cpu.xcr0 is None:
        raise NotEmulated("XCR0 is not known (KVM_GET_XCRS gave nothing)")
    new = _advance(regs, length, cpu)
    new.rax, new.rdx = cpu.xcr0 & 0xFFFFFFFF, cpu.xcr0 >> 32 & 0xFFFFFFFF  # 32-bit writes zero-extend
    return EmulationResult("xgetbv", length, new)


def _cache_line_write_back(
    insn: bytes, prefixes: Prefixes, regs: RegisterFile, cpu: CpuState, read_guest: ReadGuest
) -> EmulationResult | None:
    """CLWB (66 0F AE /6) and CLFLUSHOPT (66 0F AE /7) with a memory operand."""
    addressing = address_bits(prefixes, cpu.code_bits)
    modrm = decode_modrm(insn, prefixes.length + 2, addressing, prefixes.rex, cpu.code_bits)
    extension = modrm.reg & 7  # REX.R does not extend an opcode extension
    if modrm.memory is None or extension not in (6, 7):
        return None  # register forms are other instructions (TPAUSE, ...)
    mnemonic, feature_bit = ("clwb", 24) if extension == 6 else ("clflushopt", 23)
    length = prefixes.length + 2 + modrm.length
    if length > MAX_INSTRUCTION_LENGTH:
        raise NotEmulated("longer than 15 bytes (#GP on the CPU)")
    if prefixes.lock:
        return _fault(mnemonic, length, regs, VECTOR_UD)
    offered = _cpuid_bit(cpu, 0x7, 0, EBX_OUT, feature_bit)
    if offered is None:
        raise NotEmulated(_UNKNOWN_CPUID)
    if not offered:
        return _fault(mnemonic, length, regs, VECTOR_UD)
    linear = _linear_address(modrm.memory, prefixes, regs, cpu, addressing, length)
    if linear is None:
        raise NotEmulated(_UNKNOWN_BASE)
    fault = _address_fault(linear, modrm.memory, prefixes, cpu)
    if fault is not None:
        return _fault_with_code(mnemonic, length, regs, cpu, fault)
    if read_guest(linear, 1) is None:
        raise NotEmulated(_unreadable(linear))
    return EmulationResult(mnemonic, length, _advance(regs, length, cpu))


def _invpcid(
    insn: bytes, prefixes: Prefixes, regs: RegisterFile, cpu: CpuState, read_guest: ReadGuest
) -> EmulationResult | None:
    addressing = address_bits(prefixes, cpu.code_bits)
    modrm = decode_modrm(insn, prefixes.length + 3, addressing, prefixes.rex, cpu.code_bits)
    length = prefixes.length + 3 + modrm.length
    if length > MAX_INSTRUCTION_LENGTH:
        raise NotEmulated("longer than 15 bytes (#GP on the CPU)")
    if prefixes.lock or modrm.memory is None:
        return _fault("invpcid", length, regs, VECTOR_UD)
    offered = _cpuid_bit(cpu, 0x7, 0, EBX_OUT, 10)
    if offered is None:
        raise NotEmulated(_UNKNOWN_CPUID)
    if not offered:
        return _fault("invpcid", length, regs, VECTOR_UD)
    if cpu.cr0 & CR0_PE and cpu.cpl > 0:
        return _fault_with_code("invpcid", length, regs, cpu, VECTOR_GP)
    # The type register is 64 bits in 64-bit mode whatever REX.W says, 32 bits elsewhere.
    invalidation_type = regs.gpr(modrm.reg) if cpu.code_bits == 64 else regs.gpr(modrm.reg) & 0xFFFFFFFF
    linear = _linear_address(modrm.memory, prefixes, regs, cpu, addressing, length)
    if linear is None:
        raise NotEmulated(_UNKNOWN_BASE)
    fault = _address_fault(linear, modrm.memory, prefixes, cpu)
    if fault is not None:
        return _fault_with_code("invpcid", length, regs, cpu, fault)
    if invalidation_type > INVPCID_LAST_TYPE:
        return _fault_with_code("invpcid", length, regs, cpu, VECTOR_GP)
    descriptor = read_guest(linear, 16)
    if descriptor is None or len(descriptor) != 16:
        raise NotEmulated(_unreadable(linear) + " (the INVPCID descriptor)")
    low, address = int.from_bytes(descriptor[:8], "little"), int.from_bytes(descriptor[8:], "little")
    pcid = low & 0xFFF
    invalid = (
        low >> 12 != 0  # bits 63:12 of the descriptor are reserved
        or (invalidation_type == INVPCID_INDIVIDUAL_ADDRESS and not _canonical(address, cpu))
        or (
            invalidation_type in (INVPCID_INDIVIDUAL_ADDRESS, INVPCID_SINGLE_CONTEXT)
            and pcid != 0
            and not cpu.cr4 & CR4_PCIDE
        )
    )
    if invalid:
        return _fault_with_code("invpcid", length, regs, cpu, VECTOR_GP)
    return EmulationResult("invpcid", length, _advance(regs, length, cpu), flush_tlb=True)


def _cmpxchg16b(
    insn: bytes, prefixes: Prefixes, regs: RegisterFile, cpu: CpuState, exchange_guest: ExchangeGuest | None
) -> EmulationResult | None:
    """CMPXCHG16B m128 ("CMPXCHG8B/CMPXCHG16B"); with or without LOCK it is done atomically."""
    addressing = address_bits(prefixes, cpu.code_bits)
    modrm = decode_modrm(insn, prefixes.length + 2, addressing, prefixes.rex, cpu.code_bits)
    if modrm.reg & 7 != 1:
        return None  # 0F C7 /6 /7 are RDRAND, RDSEED, ...: not emulated
    length = prefixes.length + 2 + modrm.length
    if length > MAX_INSTRUCTION_LENGTH:
        raise NotEmulated("longer than 15 bytes (#GP on the CPU)")
    if modrm.memory is None:
        return _fault("cmpxchg16b", length, regs, VECTOR_UD)
    offered = _cpuid_bit(cpu, 0x1, 0, ECX_OUT, 13)
    if offered is None:
        raise NotEmulated(_UNKNOWN_CPUID)
    if not offered:
        return _fault("cmpxchg16b", length, regs, VECTOR_UD)
    linear = _linear_address(modrm.memory, prefixes, regs, cpu, addressing, length)
    if linear is None:
        raise NotEmulated(_UNKNOWN_BASE)
    fault = _address_fault(linear, modrm.memory, prefixes, cpu)
    if fault is not None:
        return _fault_with_code("cmpxchg16b", length, regs, cpu, fault)
    if linear % 16:
        return _fault_with_code("cmpxchg16b", length, regs, cpu, VECTOR_GP)
    if exchange_guest is None:
        raise NotEmulated("no atomic exchange on guest memory is available (the fast path lacks pyhv_cmpxchg16b)")
    outcome = exchange_guest(linear, regs.rax, regs.rdx, regs.rbx, regs.rcx)
    if outcome is None:
        raise NotEmulated(f"the operand at {linear:#x} is not mapped guest RAM (a page fault is not modelled)")
    swapped, memory_low, memory_high = outcome
    new = _advance(regs, length, cpu)
    if swapped:
        new.rflags |= RFLAGS_ZF
    else:
        new.rflags &= ~RFLAGS_ZF
        new.rax, new.rdx = memory_low, memory_high
    return EmulationResult("cmpxchg16b", length, new)


_EXCHANGE_ATTEMPTS = 1000  # a store that loses this many races to other vCPUs is given up


def _movbe(
    insn: bytes,
    prefixes: Prefixes,
    regs: RegisterFile,
    cpu: CpuState,
    read_guest: ReadGuest,
    exchange_guest: ExchangeGuest | None,
) -> EmulationResult | None:
    """MOVBE ("MOVBE—Move Data After Swapping Bytes", SDM Vol. 2B): F0 loads, F1 stores."""
    store = insn[prefixes.length + 2] == 0xF1
    addressing = address_bits(prefixes, cpu.code_bits)
    modrm = decode_modrm(insn, prefixes.length + 3, addressing, prefixes.rex, cpu.code_bits)
    length = prefixes.length + 3 + modrm.length
    if length > MAX_INSTRUCTION_LENGTH:
        raise NotEmulated("longer than 15 bytes (#GP on the CPU)")
    if prefixes.rep and prefixes.repne:
        raise NotEmulated("both F2 and F3: which one is the mandatory prefix depends on their order")
    if prefixes.lock or prefixes.rep:
        return _fault("movbe", length, regs, VECTOR_UD)
    if prefixes.repne:  # F2 0F 38 F0/F1 is CRC32 r32, r/m8/16/32 when SSE4.2 is there
        sse42 = _cpuid_bit(cpu, 0x1, 0, ECX_OUT, 20)
        if sse42 is None:
            raise NotEmulated(_UNKNOWN_CPUID)
        return None if sse42 else _fault("movbe", length, regs, VECTOR_UD)
    if modrm.memory is None:
        return _fault("movbe", length, regs, VECTOR_UD)
    offered = _cpuid_bit(cpu, 0x1, 0, ECX_OUT, 22)
    if offered is None:
        raise NotEmulated(_UNKNOWN_CPUID)
    if not offered:
        return _fault("movbe", length, regs, VECTOR_UD)
    size = operand_bits(prefixes, cpu.code_bits) // 8
    linear = _linear_address(modrm.memory, prefixes, regs, cpu, addressing, length)
    if linear is None:
        raise NotEmulated(_UNKNOWN_BASE)
    fault = _address_fault(linear, modrm.memory, prefixes, cpu)
    if fault is not None:
        return _fault_with_code("movbe", length, regs, cpu, fault)
    if _alignment_check(linear, size, regs, cpu):
        return _fault_with_code("movbe", length, regs, cpu, VECTOR_AC)
    new = _advance(regs, length, cpu)
    if store:
        value = regs.gpr(modrm.reg) & (1 << size * 8) - 1
        _store(linear, value.to_bytes(size, "big"), cpu, read_guest, exchange_guest)
        return EmulationResult("movbe", length, new)
    data = read_guest(linear, size)
    if data is None or len(data) != size:
        raise NotEmulated(_unreadable(linear))
    value = int.from_bytes(data, "big")
    if size == 2:  # a 16-bit destination keeps bits 63:16; 32-bit results zero-extend (§3.4.1.1)
        new.set_gpr(modrm.reg, (regs.gpr(modrm.reg) & ~0xFFFF) | value)
    else:
        new.set_gpr(modrm.reg, value)
    return EmulationResult("movbe", length, new)


def _alignment_check(linear: int, size: int, regs: RegisterFile, cpu: CpuState) -> bool:
    """#AC: a misaligned data access at CPL3 with CR0.AM and RFLAGS.AC (SDM Vol. 3 §6.15, Interrupt 17)."""
    return cpu.cpl == 3 and bool(cpu.cr0 & CR0_AM) and bool(regs.rflags & RFLAGS_AC) and linear % size != 0


def _store(
    linear: int, data: bytes, cpu: CpuState, read_guest: ReadGuest, exchange_guest: ExchangeGuest | None
) -> None:
    """Write `data` at `linear` through `exchange_guest`, one aligned 16-byte block at a time
    (a block never crosses a page). Every byte is read first, so an operand that crosses into a
    page that is not present, or not guest RAM, writes nothing and is NotEmulated."""
    if exchange_guest is None:
        raise NotEmulated("no atomic exchange on guest memory is available (the fast path lacks pyhv_cmpxchg16b)")
    current = read_guest(linear, len(data))
    if current is None or len(current) != len(data):
        raise NotEmulated(_unreadable(linear) + " (the store's operand)")
    wrap = (1 << 64) - 1 if cpu.code_bits == 64 else 0xFFFFFFFF  # linear addresses wrap (§3.3.7.1, §3.4)
    offset = 0
    while offset < len(data):
        address = (linear + offset) & wrap
        block, start = address & ~0xF, address & 0xF
        piece = data[offset : offset + 16 - start]
        _store_in_block(block, start, piece, read_guest, exchange_guest)
        offset += len(piece)


def _store_in_block(block: int, start: int, piece: bytes, read_guest: ReadGuest, exchange_guest: ExchangeGuest) -> None:
    """Splice `piece` into the 16 bytes at `block` (16-byte aligned) by compare-and-exchange,
    retrying with what memory held when another vCPU changed the block in between."""
    expected = read_guest(block, 16)
    if expected is None or len(expected) != 16:
        raise NotEmulated(_unreadable(block))
    for _ in range(_EXCHANGE_ATTEMPTS):
        desired = expected[:start] + piece + expected[start + len(piece) :]
        old, new = int.from_bytes(expected, "little"), int.from_bytes(desired, "little")
        outcome = exchange_guest(block, old & _LOW_64, old >> 64, new & _LOW_64, new >> 64)
        if outcome is None:
            raise NotEmulated(f"the operand at {block:#x} is not mapped guest RAM (a page fault is not modelled)")
        swapped, memory_low, memory_high = outcome
        if swapped:
            return
        expected = memory_low.to_bytes(8, "little") + memory_high.to_bytes(8, "little")
    raise NotEmulated(f"other vCPUs kept changing the 16 bytes at {block:#x} during the store")


_LOW_64 = (1 << 64) - 1


X87_REGISTERS = 8
X87_REGISTER_BYTES = 10  # 80-bit registers (SDM Vol. 1 §8.1.2)
FSW_TOP_SHIFT, FSW_TOP = 11, 7 << 11  # x87 status word TOP, bits 13:11 (SDM Vol. 1 §8.1.3.1)
MMX_EXPONENT_ONES = b"\xff\xff"  # bits 79:64 of a register an MMX instruction writes


def _mmx_movd_movq(
    insn: bytes,
    prefixes: Prefixes,
    regs: RegisterFile,
    cpu: CpuState,
    read_guest: ReadGuest,
    exchange_guest: ExchangeGuest | None,
) -> EmulationResult | None:
    """MOVD/MOVQ between an MMX register and r/m32/64 ("MOVD/MOVQ—Move Doubleword/Move Quadword",
    SDM Vol. 2B, the NP 0F 6E and NP 0F 7E forms)."""
    to_mmx = insn[prefixes.length + 1] == 0x6E
    wide = cpu.code_bits == 64 and bool(prefixes.rex & REX_W)
    mnemonic, size = ("movq", 8) if wide else ("movd", 4)
    addressing = address_bits(prefixes, cpu.code_bits)
    modrm = decode_modrm(insn, prefixes.length + 2, addressing, prefixes.rex, cpu.code_bits)
    length = prefixes.length + 2 + modrm.length
    if length > MAX_INSTRUCTION_LENGTH:
        raise NotEmulated("longer than 15 bytes (#GP on the CPU)")
    if prefixes.lock or cpu.cr0 & CR0_EM:
        return _fault(mnemonic, length, regs, VECTOR_UD)
    if cpu.cr0 & CR0_TS:
        return _fault(mnemonic, length, regs, VECTOR_NM)
    if cpu.x87 is None or cpu.x87.st is None:
        raise NotEmulated("the x87/MMX registers are not known")
    if cpu.x87.fsw & FSW_ERROR_SUMMARY:
        if not cpu.cr0 & CR0_NE:
            raise NotEmulated(_X87_ERROR_WITHOUT_NE)
        return _fault(mnemonic, length, regs, VECTOR_MF)
    physical = _physical_x87_registers(cpu.x87)
    mmx = modrm.reg & 7  # MMX registers are mm0-mm7: REX.R does not extend them
    new = _advance(regs, length, cpu)
    linear = None
    if modrm.memory is not None:
        linear = _linear_address(modrm.memory, prefixes, regs, cpu, addressing, length)
        if linear is None:
            raise NotEmulated(_UNKNOWN_BASE)
        fault = _address_fault(linear, modrm.memory, prefixes, cpu)
        if fault is not None:
            return _fault_with_code(mnemonic, length, regs, cpu, fault)
        if _alignment_check(linear, size, regs, cpu):
            return _fault_with_code(mnemonic, length, regs, cpu, VECTOR_AC)
    if to_mmx:
        if linear is None:
            assert modrm.rm_register is not None
            value = regs.gpr(modrm.rm_register) & (1 << size * 8) - 1
        else:
            data = read_guest(linear, size)
            if data is None or len(data) != size:
                raise NotEmulated(_unreadable(linear))
            value = int.from_bytes(data, "little")
        physical[mmx] = value.to_bytes(8, "little") + MMX_EXPONENT_ONES  # zero-extended to 64 bits
    else:
        value = int.from_bytes(physical[mmx][:8], "little") & (1 << size * 8) - 1
        if linear is None:
            assert modrm.rm_register is not None
            new.set_gpr(modrm.rm_register, value)  # a 32-bit destination zero-extends
        else:
            _store(linear, value.to_bytes(size, "little"), cpu, read_guest, exchange_guest)
    # TOP = 0, so ST(i) is Ri again; every tag valid (abridged tag word all ones).
    x87 = X87Status(fsw=cpu.x87.fsw & ~FSW_TOP, ftw=0xFF, st=tuple(physical))
    return EmulationResult(mnemonic, length, new, x87=x87)


def _physical_x87_registers(x87: X87Status) -> list[bytes]:
    """R0..R7 from the registers in stack order: ST(i) is R((TOP + i) mod 8) (SDM Vol. 1 §8.1.2)."""
    assert x87.st is not None
    if len(x87.st) != X87_REGISTERS or any(len(register) < X87_REGISTER_BYTES for register in x87.st):
        raise NotEmulated("the x87 registers given are not eight 80-bit registers")
    top = (x87.fsw & FSW_TOP) >> FSW_TOP_SHIFT
    return [bytes(x87.st[(index - top) % X87_REGISTERS][:X87_REGISTER_BYTES]) for index in range(X87_REGISTERS)]
