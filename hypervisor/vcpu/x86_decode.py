"""Just enough x86 instruction decoding for the kvm_pvm emulator: prefixes and ModRM operands.

References are to the Intel SDM, Volume 2 (Instruction Set Reference), chapter 2 "Instruction
Format": §2.1.1 legacy prefixes, §2.1.5 ModR/M and SIB (Tables 2-1, 2-2, 2-3), §2.2.1 REX
prefixes (and Table 2-5 for the special cases of REX.B with rBP/r13 and rSP/r12),
§2.2.1.6 RIP-relative addressing. Decoding never guesses: anything it does not fully understand
raises `DecodeError`, which the emulator turns into "not emulated".
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_INSTRUCTION_LENGTH = 15  # SDM Vol. 2 §2.1: longer instructions raise #GP

# General-purpose register numbers as encoded in ModRM/SIB (with REX.R/X/B as bit 3).
GPR_NAMES = (
    "rax",
    "rcx",
    "rdx",
    "rbx",
    "rsp",
    "rbp",
    "rsi",
    "rdi",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
)
RSP, RBP, RSI, RDI, RBX = 4, 5, 6, 7, 3

# Legacy prefixes (SDM Vol. 2 §2.1.1).
PREFIX_LOCK = 0xF0
PREFIX_REPNE = 0xF2
PREFIX_REP = 0xF3
PREFIX_OPERAND_SIZE = 0x66
PREFIX_ADDRESS_SIZE = 0x67
SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}

REX_W, REX_R, REX_X, REX_B = 0x8, 0x4, 0x2, 0x1


class DecodeError(Exception):
    """The bytes are truncated, too long, or use an encoding this decoder does not handle."""


@dataclass(frozen=True)
class Prefixes:
    length: int  # bytes of prefixes, REX included
    lock: bool = False
    repne: bool = False  # F2 present
    rep: bool = False  # F3 present
    operand_size_override: bool = False
    address_size_override: bool = False
    segment: str | None = None  # the last segment override, as in the SDM's "last one wins"
    rex: int = 0  # the low nibble of an effective REX prefix, 0 when there is none
    rex_present: bool = False  # an effective REX (even 0x40) was seen


def decode_prefixes(code: bytes, code_bits: int) -> Prefixes:
    """Read legacy and REX prefixes. A REX counts only directly before the opcode (§2.2.1)."""
    lock = repne = rep = opsize = addrsize = rex_present = False
    segment: str | None = None
    rex = 0
    position = 0
    while True:
        if position >= len(code):
            raise DecodeError("instruction bytes end inside the prefixes")
        if position >= MAX_INSTRUCTION_LENGTH:
            raise DecodeError("more than 15 bytes of prefixes")
        byte = code[position]
        if code_bits == 64 and 0x40 <= byte <= 0x4F:
            rex, rex_present = byte & 0x0F, True
            position += 1
            continue
        if byte == PREFIX_LOCK:
            lock = True
        elif byte == PREFIX_REPNE:
            repne = True
        elif byte == PREFIX_REP:
            rep = True
        elif byte == PREFIX_OPERAND_SIZE:
            opsize = True
        elif byte == PREFIX_ADDRESS_SIZE:
            addrsize = True
        elif byte in SEGMENT_PREFIXES:
            segment = SEGMENT_PREFIXES[byte]
        else:
            break
        # A legacy prefix after a REX makes that REX ineffective (§2.2.1).
        rex, rex_present = 0, False
        position += 1
    return Prefixes(position, lock, repne, rep, opsize, addrsize, segment, rex, rex_present)


def operand_bits(prefixes: Prefixes, code_bits: int) -> int:
    """Operand size for instructions whose default is 32 bits (SDM Vol. 1 §3.6, Table 3-4)."""
    if code_bits == 64:
        if prefixes.rex & REX_W:
            return 64
        return 16 if prefixes.operand_size_override else 32
    default = 32 if code_bits == 32 else 16
    if prefixes.operand_size_override:
        return 48 - default  # 32 <-> 16
    return default


def address_bits(prefixes: Prefixes, code_bits: int) -> int:
    """Effective address size (SDM Vol. 1 §3.6, Tables 3-3 and 3-4)."""
    if code_bits == 64:
        return 32 if prefixes.address_size_override else 64
    default = 32 if code_bits == 32 else 16
    return 48 - default if prefixes.address_size_override else default


@dataclass(frozen=True)
class MemoryOperand:
    """An effective address: base + index * scale + displacement (+ next RIP if rip_relative)."""

    base: int | None
    index: int | None
    scale: int
    displacement: int  # already sign-extended
    rip_relative: bool
    default_segment: str  # "ss" for rBP/rSP-based addresses, else "ds" (SDM Vol. 1 §3.7.4)


@dataclass(frozen=True)
class ModRM:
    mod: int
    reg: int  # the reg field with REX.R applied
    rm_register: int | None  # set when mod == 3 (rm with REX.B applied)
    memory: MemoryOperand | None  # set when mod != 3
    length: int  # bytes of ModRM, SIB and displacement


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


def _take(code: bytes, position: int, size: int) -> int:
    if position + size > len(code):
        raise DecodeError("instruction bytes end inside the operand")
    return int.from_bytes(code[position : position + size], "little")


# 16-bit addressing (SDM Vol. 2 Table 2-1): rm -> (base, index).
_ADDRESSING_16 = {
    0: (RBX, RSI),
    1: (RBX, RDI),
    2: (RBP, RSI),
    3: (RBP, RDI),
    4: (RSI, None),
    5: (RDI, None),
    6: (RBP, None),
    7: (RBX, None),
}


def decode_modrm(code: bytes, position: int, address_size: int, rex: int, code_bits: int) -> ModRM:
    """Decode the ModRM byte at `position` and what follows it (SIB, displacement).

    `code_bits` matters for one case: mod=00 rm=101 is RIP-relative only in 64-bit mode (with
    either address size), an absolute disp32 otherwise.
    """
    byte = _take(code, position, 1)
    mod, reg, rm = byte >> 6, (byte >> 3) & 7, byte & 7
    reg |= 8 if rex & REX_R else 0
    if mod == 3:
        return ModRM(mod, reg, rm | (8 if rex & REX_B else 0), None, 1)
    if address_size == 16:
        return _decode_memory_16(code, position, mod, reg, rm)
    return _decode_memory_32_64(code, position, mod, reg, rm, rex, code_bits == 64)


def _decode_memory_16(code: bytes, position: int, mod: int, reg: int, rm: int) -> ModRM:
    length = 1
    if mod == 0 and rm == 6:
        displacement = _signed(_take(code, position + 1, 2), 16)
        memory = MemoryOperand(None, None, 1, displacement, False, "ds")
        return ModRM(mod, reg, None, memory, length + 2)
    base, index = _ADDRESSING_16[rm]
    displacement = 0
    if mod == 1:
        displacement = _signed(_take(code, position + 1, 1), 8)
        length += 1
    elif mod == 2:
        displacement = _signed(_take(code, position + 1, 2), 16)
        length += 2
    segment = "ss" if base == RBP else "ds"
    return ModRM(mod, reg, None, MemoryOperand(base, index, 1, displacement, False, segment), length)


def _decode_memory_32_64(code: bytes, position: int, mod: int, reg: int, rm: int, rex: int, long_mode: bool) -> ModRM:
    length = 1
    base: int | None
    index: int | None = None
    scale = 1
    rip_relative = False
    if rm == 4:  # a SIB byte follows (Table 2-3); REX.B does not change that (Table 2-5)
        sib = _take(code, position + 1, 1)
        length += 1
        scale = 1 << (sib >> 6)
        index = ((sib >> 3) & 7) | (8 if rex & REX_X else 0)
        if index == RSP:  # "none": only without REX.X; r12 is a valid index
            index = None
        base = (sib & 7) | (8 if rex & REX_B else 0)
        if sib & 7 == 5 and mod == 0:  # no base, disp32 (also with REX.B: Table 2-5)
            displacement = _signed(_take(code, position + length, 4), 32)
            length += 4
            return ModRM(mod, reg, None, MemoryOperand(None, index, scale, displacement, False, "ds"), length)
    elif rm == 5 and mod == 0:  # disp32; RIP-relative in 64-bit mode (§2.2.1.6), also with REX.B
        displacement = _signed(_take(code, position + 1, 4), 32)
        rip_relative = long_mode
        return ModRM(mod, reg, None, MemoryOperand(None, None, 1, displacement, rip_relative, "ds"), 5)
    else:
        base = rm | (8 if rex & REX_B else 0)
    displacement = 0
    if mod == 1:
        displacement = _signed(_take(code, position + length, 1), 8)
        length += 1
    elif mod == 2:
        displacement = _signed(_take(code, position + length, 4), 32)
        length += 4
    segment = "ss" if base in (RSP, RBP) else "ds"
    return ModRM(mod, reg, None, MemoryOperand(base, index, scale, displacement, rip_relative, segment), length)
