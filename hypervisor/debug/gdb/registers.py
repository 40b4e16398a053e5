"""A vCPU's registers as the flat dictionary the gdb layouts read (target_xml), and back.

Sources: KVM_GET_REGS (GPRs, rip, rflags), KVM_GET_SREGS (selectors, segment bases, GDTR/IDTR,
CR0/2/3/4/8, EFER), KVM_GET_FPU (the FXSAVE image: x87, XMM, MXCSR; SDM Vol. 1 §10.5.1) and the
IA32_KERNEL_GS_BASE MSR (0xC0000102, SDM Vol. 4). gdb wants the full x87 tag word while FXSAVE
keeps only the abridged one (one "not empty" bit per register), so the full tag is rebuilt
from each register's contents as FXSAVE's description says (§10.5.1.1, table 10-3).
"""

from __future__ import annotations

from dataclasses import replace

from hypervisor.kvm.registers import FpuState, SystemRegisters
from hypervisor.kvm.vcpu import GPR_NAMES

MSR_KERNEL_GS_BASE = 0xC0000102
SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
CONTROL_REGISTERS = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
TAG_VALID, TAG_ZERO, TAG_SPECIAL, TAG_EMPTY = 0, 1, 2, 3
EXPONENT_MASK = 0x7FFF
INTEGER_BIT = 1 << 63
X87_REGISTER_BYTES = 10  # the 80-bit register in the low part of its 16-byte FXSAVE slot


def _x87_tag(value: int) -> int:
    """The two-bit tag of one 80-bit register that FXSAVE marks as in use."""
    exponent = (value >> 64) & EXPONENT_MASK
    mantissa = value & ((1 << 64) - 1)
    if exponent == EXPONENT_MASK:
        return TAG_SPECIAL
    if exponent == 0:
        return TAG_ZERO if mantissa == 0 else TAG_SPECIAL
    return TAG_VALID if mantissa & INTEGER_BIT else TAG_SPECIAL


def full_tag_word(abridged: int, status: int, registers: list[int]) -> int:
    """FXSAVE's abridged tag (bit n: physical register n in use) to the x87 16-bit tag word.

    `registers` are ST(0)-ST(7) as FXSAVE stores them; physical register n is ST((n - TOP) % 8)
    with TOP in FSW bits 11-13.
    """
    top = (status >> 11) & 7
    word = 0
    for physical in range(8):
        if abridged & (1 << physical):
            tag = _x87_tag(registers[(physical - top) % 8])
        else:
            tag = TAG_EMPTY
        word |= tag << (2 * physical)
    return word


def abridged_tag(full: int) -> int:
    return sum(1 << n for n in range(8) if (full >> (2 * n)) & 3 != TAG_EMPTY)


def collect(regs: dict[str, int], sregs: SystemRegisters, fpu: FpuState | None, msrs: dict[int, int]) -> dict[str, int]:
    values = dict(regs)
    for name in SEGMENTS:
        segment = sregs.segment(name)
        values[name] = segment.selector
        values[f"{name}_base"] = segment.base
    for name in CONTROL_REGISTERS:
        values[name] = getattr(sregs, name)
    values["gdtr_base"], values["gdtr_limit"] = sregs.gdt.base, sregs.gdt.limit
    values["idtr_base"], values["idtr_limit"] = sregs.idt.base, sregs.idt.limit
    if MSR_KERNEL_GS_BASE in msrs:
        values["k_gs_base"] = msrs[MSR_KERNEL_GS_BASE]
    if fpu is not None:
        st = [int.from_bytes(slot[:X87_REGISTER_BYTES], "little") for slot in fpu.fpr]
        for index, value in enumerate(st):
            values[f"st{index}"] = value
        values["fctrl"] = fpu.fcw
        values["fstat"] = fpu.fsw
        values["ftag"] = full_tag_word(fpu.ftwx, fpu.fsw, st)
        values["fioff"] = fpu.last_ip & 0xFFFF_FFFF
        values["fiseg"] = (fpu.last_ip >> 32) & 0xFFFF
        values["fooff"] = fpu.last_dp & 0xFFFF_FFFF
        values["foseg"] = (fpu.last_dp >> 32) & 0xFFFF
        values["fop"] = fpu.last_opcode & 0x7FF
        for index, register in enumerate(fpu.xmm):
            values[f"xmm{index}"] = int.from_bytes(register, "little")
        values["mxcsr"] = fpu.mxcsr
    return values


def split_writes(values: dict[str, int]) -> tuple[dict[str, int], dict[str, int], dict[str, int], dict[int, int]]:
    """(GPR writes, sregs writes, FPU writes, MSR writes) for `apply_*`; unknown names dropped."""
    gprs = {name: value for name, value in values.items() if name in GPR_NAMES}
    system_names = set(SEGMENTS) | {f"{s}_base" for s in SEGMENTS} | set(CONTROL_REGISTERS)
    system_names |= {"gdtr_base", "gdtr_limit", "idtr_base", "idtr_limit"}
    system = {name: value for name, value in values.items() if name in system_names}
    fpu_names = {f"st{i}" for i in range(8)} | {f"xmm{i}" for i in range(16)}
    fpu_names |= {"fctrl", "fstat", "ftag", "fioff", "fiseg", "fooff", "foseg", "fop", "mxcsr"}
    fpu = {name: value for name, value in values.items() if name in fpu_names}
    msrs = {MSR_KERNEL_GS_BASE: values["k_gs_base"]} if "k_gs_base" in values else {}
    return gprs, system, fpu, msrs


def apply_system(sregs: SystemRegisters, values: dict[str, int]) -> SystemRegisters:
    """`sregs` with the selectors, bases, descriptor tables and control registers of `values`.

    A selector written from gdb changes only the selector: the hidden descriptor cache (base,
    limit, access rights) keeps what the guest loaded, as a debugger writing `$cs` expects;
    `$cs_base` changes the base.
    """
    for name, value in values.items():
        if name in SEGMENTS:
            sregs = sregs.with_segment(name, selector=value & 0xFFFF)
        elif name.endswith("_base") and name[:2] in SEGMENTS:
            sregs = sregs.with_segment(name[:2], base=value)
        elif name in CONTROL_REGISTERS:
            sregs = sregs.with_control(name, value)
        elif name in ("gdtr_base", "idtr_base"):
            sregs = sregs.with_table(name[:3], base=value)
        elif name in ("gdtr_limit", "idtr_limit"):
            sregs = sregs.with_table(name[:3], limit=value & 0xFFFF)
    return sregs


def apply_fpu(fpu: FpuState, values: dict[str, int]) -> FpuState:
    """`fpu` with the x87 and SSE registers of `values` (gdb's names) written."""
    for name, value in values.items():
        if name.startswith("st"):
            index = int(name[2:])
            register = (value & ((1 << 80) - 1)).to_bytes(X87_REGISTER_BYTES, "little")
            fpu = fpu.with_fpr(index, register + fpu.fpr[index][X87_REGISTER_BYTES:])
        elif name.startswith("xmm"):
            fpu = fpu.with_xmm(int(name[3:]), (value & ((1 << 128) - 1)).to_bytes(16, "little"))
        elif name == "fctrl":
            fpu = replace(fpu, fcw=value & 0xFFFF)
        elif name == "fstat":
            fpu = replace(fpu, fsw=value & 0xFFFF)
        elif name == "ftag":
            fpu = replace(fpu, ftwx=abridged_tag(value))
        elif name == "fop":
            fpu = replace(fpu, last_opcode=value & 0x7FF)
        elif name == "fioff":
            fpu = replace(fpu, last_ip=(fpu.last_ip & ~0xFFFF_FFFF) | (value & 0xFFFF_FFFF))
        elif name == "fiseg":
            fpu = replace(fpu, last_ip=(fpu.last_ip & 0xFFFF_FFFF) | ((value & 0xFFFF) << 32))
        elif name == "fooff":
            fpu = replace(fpu, last_dp=(fpu.last_dp & ~0xFFFF_FFFF) | (value & 0xFFFF_FFFF))
        elif name == "foseg":
            fpu = replace(fpu, last_dp=(fpu.last_dp & 0xFFFF_FFFF) | ((value & 0xFFFF) << 32))
        elif name == "mxcsr":
            fpu = replace(fpu, mxcsr=value & 0xFFFF_FFFF)
    return fpu
