"""Name the instruction of an emulation failure, and say when it is a known limit of this host.

A `KVM_EXIT_INTERNAL_ERROR` emulation failure carries the instruction bytes only. A user needs
the instruction (`lock cmpxchg16b [rdi]`, not `f0 48 0f c7 0f`) and, on a kvm_pvm host
(shared/PLATFORM.md), whether it is one KVM's emulator there is known to reject at CPL0 and what
to do about it. `describe_instruction` uses capstone when it is installed (an optional extra:
`pip install capstone`) and otherwise, or when capstone does not know the instruction (RDPRU,
for one), a small table of the system instructions such failures are made of. Opcodes and
ModRM forms: Intel SDM Vol. 2, Appendix A (opcode map) and the instruction pages; AMD APM Vol. 3
for VMMCALL and RDPRU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hypervisor.vcpu.x86_decode import (
    GPR_NAMES,
    REX_W,
    DecodeError,
    MemoryOperand,
    ModRM,
    Prefixes,
    address_bits,
    decode_modrm,
    decode_prefixes,
    operand_bits,
)

log = logging.getLogger(__name__)

# 0F 01 with mod = 3: one instruction per byte (SDM Vol. 2 Table A-6, AMD APM Vol. 3).
_0F01_REGISTER_FORMS = {
    0xC1: "vmcall", 0xC2: "vmlaunch", 0xC3: "vmresume", 0xC4: "vmxoff", 0xC8: "monitor", 0xC9: "mwait",
    0xCA: "clac", 0xCB: "stac", 0xD0: "xgetbv", 0xD1: "xsetbv", 0xD4: "vmfunc", 0xD8: "vmrun", 0xD9: "vmmcall",
    0xDA: "vmload", 0xDB: "vmsave", 0xDC: "stgi", 0xDD: "clgi", 0xDF: "invlpga", 0xEE: "rdpkru", 0xEF: "wrpkru",
    0xF8: "swapgs", 0xF9: "rdtscp", 0xFA: "monitorx", 0xFB: "mwaitx", 0xFD: "rdpru",
}  # fmt: skip
_0F01_MEMORY_FORMS = ("sgdt", "sidt", "lgdt", "lidt", "smsw", None, "lmsw", "invlpg")
# Two-byte opcodes without a ModRM operand worth naming (Table A-3).
_0F_SIMPLE = {
    0x05: "syscall", 0x06: "clts", 0x07: "sysret", 0x08: "invd", 0x09: "wbinvd", 0x0B: "ud2", 0x30: "wrmsr",
    0x31: "rdtsc", 0x32: "rdmsr", 0x33: "rdpmc", 0x34: "sysenter", 0x35: "sysexit", 0x77: "emms", 0xA2: "cpuid",
}  # fmt: skip
# 0F AE by prefix and /reg (Table A-6 group 15): memory forms, then register forms.
_0FAE_MEMORY = {
    None: ("fxsave", "fxrstor", "ldmxcsr", "stmxcsr", "xsave", "xrstor", "xsaveopt", "clflush"),
    0x66: (None, None, None, None, None, None, "clwb", "clflushopt"),
}
_0FAE_REGISTER = {
    None: (None, None, None, None, None, "lfence", "mfence", "sfence"),
    0xF3: ("rdfsbase", "rdgsbase", "wrfsbase", "wrgsbase", None, None, None, None),
    0x66: (None, None, None, None, None, None, "tpause", None),
}
_REX_W_NAMES = {
    "fxsave": "fxsave64", "fxrstor": "fxrstor64", "xsave": "xsave64", "xrstor": "xrstor64",
    "xsaveopt": "xsaveopt64", "xsavec": "xsavec64", "xsaves": "xsaves64", "xrstors": "xrstors64",
}  # fmt: skip
_ONE_BYTE = {0xCC: "int3", 0xCE: "into", 0xF1: "int1", 0xF4: "hlt", 0x9B: "fwait", 0xFA: "cli", 0xFB: "sti",
             0xCF: "iret"}  # fmt: skip
_X87_NAMED = {b"\xdb\xe2": "fnclex", b"\xdb\xe3": "fninit", b"\xd9\xd0": "fnop"}
# x87 memory forms seen in kernels' FPU paths (Table A-7..A-22), by (escape byte, /reg).
_X87_MEMORY = {(0xDB, 0): "fild dword", (0xDF, 0): "fild word", (0xDF, 5): "fild qword", (0xD9, 5): "fldcw",
               (0xD9, 7): "fnstcw", (0xDD, 7): "fnstsw", (0xDD, 4): "frstor", (0xDD, 6): "fnsave"}  # fmt: skip

_XSAVE_FAMILY = frozenset(
    {"xsave", "xrstor", "xsaveopt", "xsavec", "xsaves", "xrstors", "xsetbv"}
    | {"xsave64", "xrstor64", "xsaveopt64", "xsavec64", "xsaves64", "xrstors64"}
)
# What pyhv's emulator (hypervisor/vcpu/emulate.py) answers on this host's behalf.
EMULATED_BY_PYHV = frozenset({"int3", "int", "clac", "stac", "popcnt", "fwait", "fnclex", "emms", "xgetbv", "invpcid",
                              "clwb", "clflushopt", "cmpxchg16b", "rdpru", "movbe"})  # fmt: skip
# Linux clearcpuid= numbers (arch/x86/include/asm/cpufeatures.h) that keep a kernel from using
# an instruction KVM's emulator rejects at CPL0 on kvm_pvm (PLATFORM.md).
_CLEARCPUID = {"rdrand": "158", "rdseed": "306", "movbe": "150", "rdfsbase": "288", "rdgsbase": "288",
               "wrfsbase": "288", "wrgsbase": "288", "vex": "156,293,291,296"}  # fmt: skip
# How a limit message names an instruction whose table name is not its mnemonic.
_SHOWN_AS = {"int": "int imm8", "vex": "VEX-encoded (AVX, BMI) instructions"}


@dataclass(frozen=True)
class _Named:
    mnemonic: str  # without prefixes: the key of the limit tables
    text: str  # what the user reads: prefixes, mnemonic, operands


def describe_instruction(data: bytes, code_bits: int = 64) -> str:
    """The instruction at the start of `data` as text, e.g. `lock cmpxchg16b [rdi]`."""
    if not data:
        return "no instruction bytes"
    text = _capstone_text(data, code_bits)
    return text if text is not None else _builtin(data, code_bits).text


def known_host_limit(data: bytes, code_bits: int = 64) -> str | None:
    """Why this instruction stops a guest on a kvm_pvm host, if that is a known limit; else None."""
    if not data:
        return None
    mnemonic = _builtin(data, code_bits).mnemonic
    if mnemonic in _XSAVE_FAMILY:
        return ("kvm_pvm's KVM cannot emulate XSAVE-family instructions at CPL0; "
                "boot the kernel with noxsave")  # fmt: skip
    if mnemonic in ("vmcall", "vmmcall"):
        return ("a KVM hypercall: kvm_pvm cannot take one from emulated CPL0; pyhv does not offer "
                "the paravirtual features that use it (CPUID 0x40000001) on this host")  # fmt: skip
    shown = _SHOWN_AS.get(mnemonic, mnemonic)
    if mnemonic in EMULATED_BY_PYHV:
        return (f"kvm_pvm's KVM cannot emulate {shown} at CPL0; pyhv emulates it except where it cannot "
                "do so faithfully (an operand outside guest RAM, a page fault, single-stepping)")  # fmt: skip
    if mnemonic in _CLEARCPUID:
        return (f"kvm_pvm's KVM cannot emulate {shown} at CPL0; hide the feature from the kernel with "
                f"clearcpuid={_CLEARCPUID[mnemonic]}")  # fmt: skip
    if mnemonic.startswith(("fild", "x87")):
        return ("x87 arithmetic at CPL0 is beyond kvm_pvm's emulator; keep the FPU out of kernel "
                "mode (the bundled kernel does, with pyhv.pvm)")  # fmt: skip
    return None


def describe_failure(
    data: bytes, rip: int, *, code_bits: int = 64, refusal: str | None = None, pvm_host: bool = False
) -> str:
    """The one line an emulation-failure outcome shows: the instruction by name and bytes, why
    pyhv's own emulator did not run it (`refusal`, from `PvmEmulator.refusal`), and on a kvm_pvm
    host (`pvm_host`, from `hypervisor.kvm.kvm_is_pvm()`) the known limit it is."""
    line = f"KVM could not emulate {describe_instruction(data, code_bits)} ({data.hex(' ')}) at rip {rip:#x}"
    if refusal:
        line += f"; pyhv's emulator did not either: {refusal}"
    limit = known_host_limit(data, code_bits) if pvm_host else None
    if limit:
        line += f"; {limit}"
    return line


def _capstone_text(data: bytes, code_bits: int) -> str | None:
    """capstone's reading, or None when it is not installed or does not know the bytes."""
    try:
        import capstone  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}.get(code_bits)
    if mode is None:
        return None
    try:
        instruction = next(capstone.Cs(capstone.CS_ARCH_X86, mode).disasm(bytes(data), 0, count=1), None)
    except capstone.CsError as error:
        log.debug("capstone could not decode %s: %s", data.hex(), error)
        return None
    if instruction is None:
        return None
    return f"{instruction.mnemonic} {instruction.op_str}".strip()


def _builtin(data: bytes, code_bits: int) -> _Named:
    try:
        prefixes = decode_prefixes(data, code_bits)
        named = _opcode(data, prefixes, code_bits)
    except DecodeError:
        named = None
    if named is None:
        return _Named("unknown", f"unknown instruction ({data[:15].hex(' ')})")
    shown = ("lock " if prefixes.lock else "") + named.text
    return _Named(named.mnemonic, shown)


def _opcode(data: bytes, prefixes: Prefixes, code_bits: int) -> _Named | None:
    at = prefixes.length
    first = data[at]
    if first in (0xC4, 0xC5) and (code_bits == 64 or (len(data) > at + 1 and data[at + 1] >= 0xC0)):
        return _Named("vex", "VEX-encoded instruction (AVX, AVX2, BMI1, BMI2...)")
    if first in _ONE_BYTE:
        return _Named(_ONE_BYTE[first], _ONE_BYTE[first] + ("q" if first == 0xCF and prefixes.rex & REX_W else ""))
    if first == 0xCD:
        if len(data) < at + 2:
            raise DecodeError("int without its vector")
        return _Named("int", f"int {data[at + 1]:#x}")
    if 0xD8 <= first <= 0xDF:
        return _x87(data, prefixes, code_bits)
    if first != 0x0F or len(data) < at + 2:
        return None
    second = data[at + 1]
    if second in _0F_SIMPLE:
        return _Named(_0F_SIMPLE[second], _0F_SIMPLE[second])
    if second == 0x01:
        return _group_0f01(data, prefixes, code_bits)
    if second == 0xAE:
        return _group_15(data, prefixes, code_bits)
    if second == 0xC7:
        return _group_9(data, prefixes, code_bits)
    if second in (0xB8, 0xBC, 0xBD) and prefixes.rep:
        name = {0xB8: "popcnt", 0xBC: "tzcnt", 0xBD: "lzcnt"}[second]
        modrm = _modrm(data, prefixes, code_bits, 2)
        size = operand_bits(prefixes, code_bits)
        return _Named(name, f"{name} {_register(modrm.reg, size)}, {_rm(modrm, prefixes, size)}")
    if data[at + 1 : at + 3] == b"\x38\x82" and prefixes.operand_size_override:
        modrm = _modrm(data, prefixes, code_bits, 3)
        return _Named("invpcid", f"invpcid {_register(modrm.reg, 64 if code_bits == 64 else 32)}, "
                                 f"{_rm(modrm, prefixes, 128)}")  # fmt: skip
    if data[at + 1 : at + 3] in (b"\x38\xf0", b"\x38\xf1"):
        return _movbe_or_crc32(data, prefixes, code_bits)
    return None


def _movbe_or_crc32(data: bytes, prefixes: Prefixes, code_bits: int) -> _Named:
    """0F 38 F0/F1: MOVBE, or CRC32 with F2 (SDM Vol. 2 Table A-4); F0 loads, F1 stores."""
    modrm = _modrm(data, prefixes, code_bits, 3)
    store = data[prefixes.length + 2] == 0xF1
    size = operand_bits(prefixes, code_bits)
    if prefixes.repne:  # CRC32 r32/r64, r/m8 (F0) or r/m16/32/64 (F1)
        destination = _register(modrm.reg, 64 if prefixes.rex & REX_W else 32)
        if store:
            return _Named("crc32", f"crc32 {destination}, {_rm(modrm, prefixes, size)}")
        if modrm.memory is None:
            return _Named("crc32", f"crc32 {destination}, r8")  # byte registers are not named here
        return _Named("crc32", f"crc32 {destination}, byte {_memory(modrm.memory, prefixes)}")
    register, memory = _register(modrm.reg, size), _rm(modrm, prefixes, size)
    return _Named("movbe", f"movbe {memory}, {register}" if store else f"movbe {register}, {memory}")


def _modrm(data: bytes, prefixes: Prefixes, code_bits: int, opcode_length: int) -> ModRM:
    return decode_modrm(data, prefixes.length + opcode_length, address_bits(prefixes, code_bits), prefixes.rex,
                        code_bits)  # fmt: skip


def _group_0f01(data: bytes, prefixes: Prefixes, code_bits: int) -> _Named | None:
    modrm = _modrm(data, prefixes, code_bits, 2)
    if modrm.memory is None:
        name = _0F01_REGISTER_FORMS.get(data[prefixes.length + 2])
        return None if name is None else _Named(name, name)
    name = _0F01_MEMORY_FORMS[modrm.reg & 7]
    return None if name is None else _Named(name, f"{name} {_memory(modrm.memory, prefixes)}")


def _group_15(data: bytes, prefixes: Prefixes, code_bits: int) -> _Named | None:
    modrm = _modrm(data, prefixes, code_bits, 2)
    prefix = 0x66 if prefixes.operand_size_override else 0xF3 if prefixes.rep else None
    table = _0FAE_MEMORY if modrm.memory is not None else _0FAE_REGISTER
    names = table.get(prefix)
    name = names[modrm.reg & 7] if names else None
    if name is None:
        return None
    if modrm.memory is None:
        assert modrm.rm_register is not None
        size = 64 if prefixes.rex & REX_W else 32
        return _Named(name, name if prefix is None else f"{name} {_register(modrm.rm_register, size)}")
    if prefixes.rex & REX_W:
        name = _REX_W_NAMES.get(name, name)
    return _Named(name, f"{name} {_memory(modrm.memory, prefixes)}")


def _group_9(data: bytes, prefixes: Prefixes, code_bits: int) -> _Named | None:
    modrm = _modrm(data, prefixes, code_bits, 2)
    extension = modrm.reg & 7
    if modrm.memory is not None:
        wide = bool(prefixes.rex & REX_W)
        name = {1: "cmpxchg16b" if wide else "cmpxchg8b", 3: "xrstors", 4: "xsavec", 5: "xsaves"}.get(extension)
        if name is None:
            return None
        if wide:
            name = _REX_W_NAMES.get(name, name)
        return _Named(name, f"{name} {_memory(modrm.memory, prefixes)}")
    assert modrm.rm_register is not None
    if extension == 7 and prefixes.rep:
        return _Named("rdpid", f"rdpid {_register(modrm.rm_register, 64 if code_bits == 64 else 32)}")
    if extension in (6, 7):
        name = "rdrand" if extension == 6 else "rdseed"
        size = operand_bits(prefixes, code_bits)
        return _Named(name, f"{name} {_register(modrm.rm_register, size)}")
    return None


def _x87(data: bytes, prefixes: Prefixes, code_bits: int) -> _Named:
    at = prefixes.length
    named = _X87_NAMED.get(bytes(data[at : at + 2]))
    if named is not None:
        return _Named(named, named)
    modrm = _modrm(data, prefixes, code_bits, 1)
    if modrm.memory is not None:
        name = _X87_MEMORY.get((data[at], modrm.reg & 7))
        if name is not None:
            return _Named(name.split()[0], f"{name} {_memory(modrm.memory, prefixes)}")
    return _Named("x87", f"x87 instruction (escape {data[at]:#04x} /{modrm.reg & 7})")


def _register(number: int, size: int) -> str:
    name = GPR_NAMES[number]
    if size == 64:
        return name
    if number >= 8:
        return name + {32: "d", 16: "w"}.get(size, "")
    return ("e" + name[1:]) if size == 32 else name[1:]


def _rm(modrm: ModRM, prefixes: Prefixes, size: int) -> str:
    if modrm.memory is None:
        assert modrm.rm_register is not None
        return _register(modrm.rm_register, size)
    return _memory(modrm.memory, prefixes)


def _memory(memory: MemoryOperand, prefixes: Prefixes) -> str:
    """Intel syntax, as capstone writes it: `fs:[rbx + rsi*4 + 0x8]`."""
    parts = []
    if memory.rip_relative:
        parts.append("rip")
    if memory.base is not None:
        parts.append(GPR_NAMES[memory.base])
    if memory.index is not None:
        parts.append(GPR_NAMES[memory.index] + (f"*{memory.scale}" if memory.scale != 1 else ""))
    text = " + ".join(parts)
    if memory.displacement or not parts:
        sign = "-" if memory.displacement < 0 and parts else "+"
        value = f"{abs(memory.displacement):#x}" if parts else f"{memory.displacement & 0xFFFFFFFFFFFFFFFF:#x}"
        text = f"{text} {sign} {value}" if parts else value
    segment = f"{prefixes.segment}:" if prefixes.segment else ""
    return f"{segment}[{text}]"
