"""A vCPU's special registers, x87/SSE state and local APIC page as plain values.

`SystemRegisters` is `struct kvm_sregs`, `FpuState` is `struct kvm_fpu` and `LapicState` is
`struct kvm_lapic_state` (<linux/kvm.h>, api.rst KVM_GET_SREGS / KVM_GET_FPU / KVM_GET_LAPIC).
Each is a copy: changing one changes nothing in KVM until it is handed to the matching
`Vcpu.set_*`; no cffi object leaves this package. `FpuState` and `LapicState` are frozen (change
them with `dataclasses.replace` or `with_*`). `Segment`, `DescriptorTable` and `SystemRegisters`
are plain slotted dataclasses: a frozen dataclass sets each field through object.__setattr__,
and with 8 segments of 12 fields that made `get_sregs` five times slower than the cffi struct it
replaces (37 us against 7 us on this host, KVM_GET_SREGS and the fields the pvm glue reads);
plain, it takes 12 us. Prefer their `with_*` methods, which give a new value, to changing one in
place (`dataclasses.replace` copies shallowly: the segments are shared with the original).

The conversion goes through the struct's bytes with one `struct.Struct` per layout instead of one
cffi attribute read per field: `get_sregs` runs for every instruction pyhv's emulator handles on a
kvm_pvm host, and one unpack of 312 bytes costs a fraction of a hundred cffi reads. The formats
are checked against the compiler's layout (cffi's offsets) when the module is imported, so a
header that disagrees fails at start-up, not with registers read from the wrong bytes. The
padding bytes KVM zeroes are written back as zeros, so a struct from KVM survives the round trip
byte for byte (snapshots rely on that for the LAPIC page).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import Any

from hypervisor.kvm.ffi import ffi, lib

__all__ = [
    "APIC_ID",
    "APIC_LVT_LINT0",
    "APIC_LVT_LINT1",
    "APIC_REGISTER_PAGE_SIZE",
    "APIC_VERSION",
    "DescriptorTable",
    "FpuState",
    "LapicState",
    "SEGMENT_FIELDS",
    "SEGMENT_NAMES",
    "Segment",
    "SystemRegisters",
]

SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
SEGMENT_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")
DESCRIPTOR_TABLE_NAMES = ("gdt", "idt")
CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
# kvm_sregs.interrupt_bitmap is __u64[(KVM_NR_INTERRUPTS + 63) / 64] (<asm/kvm.h>).
INTERRUPT_BITMAP_WORDS = (lib.KVM_NR_INTERRUPTS + 63) // 64

# struct kvm_segment: base, limit, selector, type, present, dpl, db, s, l, g, avl, unusable,
# one padding byte.
_SEGMENT_FORMAT = "QIH9Bx"
# struct kvm_dtable: base, limit, padding[3] (u16 each).
_DTABLE_FORMAT = "QH6x"
_SREGS = struct.Struct(
    "<" + _SEGMENT_FORMAT * len(SEGMENT_NAMES) + _DTABLE_FORMAT * len(DESCRIPTOR_TABLE_NAMES)
    + f"{len(CONTROL_NAMES)}Q{INTERRUPT_BITMAP_WORDS}Q"
)  # fmt: skip
_SEGMENT_VALUES = len(SEGMENT_FIELDS)

# struct kvm_fpu: fpr[8][16], fcw, fsw, ftwx, pad1, last_opcode, last_ip, last_dp, xmm[16][16],
# mxcsr, pad2.
FPR_SLOTS, XMM_SLOTS, SLOT_BYTES = 8, 16, 16
_FPU = struct.Struct(f"<{FPR_SLOTS * SLOT_BYTES}sHHBxHQQ{XMM_SLOTS * SLOT_BYTES}sI4x")

# The local APIC register page (KVM_APIC_REG_SIZE, <asm/kvm.h>) and the offsets of the registers
# callers use (SDM Vol. 3A §11.4.1, table 11-1). Each register is 32 bits on a 16-byte boundary.
APIC_REGISTER_PAGE_SIZE = 0x400
APIC_ID = 0x20
APIC_VERSION = 0x30
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
_APIC_REGISTER = struct.Struct("<I")
_APIC_ID_SHIFT = 24  # xAPIC mode: the ID is bits 31:24 (SDM Vol. 3A §11.4.6)


def _check_layout() -> None:
    """Refuses to import if the formats above do not describe the structs the compiler saw."""
    expected = {
        "struct kvm_sregs": _SREGS.size,
        "struct kvm_fpu": _FPU.size,
        "struct kvm_lapic_state": APIC_REGISTER_PAGE_SIZE,
    }
    for name, size in expected.items():
        if ffi.sizeof(name) != size:
            raise ImportError(f"{name} is {ffi.sizeof(name)} bytes, hypervisor/kvm/registers.py expects {size}")
    segment_offsets = dict(
        zip(SEGMENT_FIELDS, (0, 8, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22), strict=True)
    )
    for name, offset in segment_offsets.items():
        if ffi.offsetof("struct kvm_segment", name) != offset:
            raise ImportError(f"struct kvm_segment.{name} is not at byte {offset}")
    for name, offset in (("cr0", 224), ("interrupt_bitmap", 280)):
        if ffi.offsetof("struct kvm_sregs", name) != offset:
            raise ImportError(f"struct kvm_sregs.{name} is not at byte {offset}")
    for name, offset in (("fcw", 128), ("last_opcode", 134), ("last_ip", 136), ("xmm", 152), ("mxcsr", 408)):
        if ffi.offsetof("struct kvm_fpu", name) != offset:
            raise ImportError(f"struct kvm_fpu.{name} is not at byte {offset}")


_check_layout()


def _struct_bytes(cdata: Any, size: int) -> bytes:
    return bytes(ffi.buffer(cdata, size))


@dataclass(slots=True)
class Segment:
    """One segment register: selector and hidden descriptor cache (struct kvm_segment).

    `limit` is byte granular (KVM expands it when g=1); the flags are 0 or 1 as KVM gives them.
    """

    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - the field name of struct kvm_segment and of the SDM
    g: int = 0
    avl: int = 0
    unusable: int = 0

    def values(self) -> tuple[int, ...]:
        """The fields in struct kvm_segment order (SEGMENT_FIELDS)."""
        return (self.base, self.limit, self.selector, self.type, self.present, self.dpl, self.db,
                self.s, self.l, self.g, self.avl, self.unusable)  # fmt: skip


@dataclass(slots=True)
class DescriptorTable:
    """GDTR or IDTR (struct kvm_dtable): linear base and limit (size in bytes minus one)."""

    base: int = 0
    limit: int = 0


_NO_INTERRUPTS = (0,) * INTERRUPT_BITMAP_WORDS


@dataclass(slots=True)
class SystemRegisters:
    """struct kvm_sregs: segments, descriptor tables, control registers, EFER, APIC base, and
    the bitmap of a pending external interrupt (api.rst KVM_GET_SREGS)."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, ...] = _NO_INTERRUPTS

    def __post_init__(self) -> None:
        if len(self.interrupt_bitmap) != INTERRUPT_BITMAP_WORDS:
            raise ValueError(f"interrupt_bitmap has {INTERRUPT_BITMAP_WORDS} words, not {len(self.interrupt_bitmap)}")

    def segment(self, name: str) -> Segment:
        """The segment register called `name` (one of SEGMENT_NAMES)."""
        if name not in SEGMENT_NAMES:
            raise ValueError(f"unknown segment register {name!r}")
        segment: Segment = getattr(self, name)
        return segment

    def with_segment(self, name: str, **fields: int) -> SystemRegisters:
        """A copy with fields of segment register `name` changed (`with_segment("cs", base=0)`)."""
        changes: dict[str, Any] = {name: replace(self.segment(name), **fields)}
        return replace(self, **changes)

    def with_table(self, name: str, **fields: int) -> SystemRegisters:
        """A copy with the base or limit of "gdt" or "idt" changed."""
        if name not in DESCRIPTOR_TABLE_NAMES:
            raise ValueError(f"unknown descriptor table {name!r}")
        changes: dict[str, Any] = {name: replace(getattr(self, name), **fields)}
        return replace(self, **changes)

    def with_control(self, name: str, value: int) -> SystemRegisters:
        """A copy with one of cr0, cr2, cr3, cr4, cr8, efer, apic_base set to `value`."""
        if name not in CONTROL_NAMES:
            raise ValueError(f"unknown control register {name!r}")
        changes: dict[str, Any] = {name: value}
        return replace(self, **changes)

    @classmethod
    def from_bytes(cls, data: bytes) -> SystemRegisters:
        values = _SREGS.unpack(data)
        at = len(SEGMENT_NAMES) * _SEGMENT_VALUES
        width = _SEGMENT_VALUES
        cs, ds, es, fs, gs, ss, tr, ldt = (Segment(*values[i : i + width]) for i in range(0, at, width))
        gdt, idt = DescriptorTable(*values[at : at + 2]), DescriptorTable(*values[at + 2 : at + 4])
        cr0, cr2, cr3, cr4, cr8, efer, apic_base = values[at + 4 : at + 4 + len(CONTROL_NAMES)]
        bitmap = tuple(values[at + 4 + len(CONTROL_NAMES) :])
        return cls(cs=cs, ds=ds, es=es, fs=fs, gs=gs, ss=ss, tr=tr, ldt=ldt, gdt=gdt, idt=idt, cr0=cr0, cr2=cr2,
                   cr3=cr3, cr4=cr4, cr8=cr8, efer=efer, apic_base=apic_base, interrupt_bitmap=bitmap)  # fmt: skip

    def to_bytes(self) -> bytes:
        values: list[int] = []
        for name in SEGMENT_NAMES:
            values += self.segment(name).values()
        values += (self.gdt.base, self.gdt.limit, self.idt.base, self.idt.limit)
        values += (self.cr0, self.cr2, self.cr3, self.cr4, self.cr8, self.efer, self.apic_base)
        values += self.interrupt_bitmap
        return _SREGS.pack(*values)

    @classmethod
    def from_struct(cls, sregs: Any) -> SystemRegisters:
        """From a `struct kvm_sregs *` (cffi)."""
        return cls.from_bytes(_struct_bytes(sregs, _SREGS.size))

    def to_struct(self) -> Any:
        """A new `struct kvm_sregs *` (cffi) holding these registers."""
        sregs = ffi.new("struct kvm_sregs *")
        ffi.memmove(sregs, self.to_bytes(), _SREGS.size)
        return sregs


_EMPTY_FPR = (bytes(SLOT_BYTES),) * FPR_SLOTS
_EMPTY_XMM = (bytes(SLOT_BYTES),) * XMM_SLOTS


@dataclass(frozen=True, slots=True)
class FpuState:
    """struct kvm_fpu: the x87 and SSE state of the FXSAVE image (SDM Vol. 1 §10.5.1).

    `fpr` are ST(0)/MM0..ST(7)/MM7 as FXSAVE keeps them, 16 bytes a slot (the 80-bit register in
    the low 10); `ftwx` is the abridged tag word; `last_ip` / `last_dp` are the 64-bit FPU
    instruction and data pointers; `xmm` are XMM0..XMM15.
    """

    fpr: tuple[bytes, ...] = _EMPTY_FPR
    fcw: int = 0
    fsw: int = 0
    ftwx: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    xmm: tuple[bytes, ...] = _EMPTY_XMM
    mxcsr: int = 0

    def __post_init__(self) -> None:
        for name, slots in (("fpr", FPR_SLOTS), ("xmm", XMM_SLOTS)):
            registers = getattr(self, name)
            if len(registers) != slots or any(len(register) != SLOT_BYTES for register in registers):
                raise ValueError(f"{name} is {slots} registers of {SLOT_BYTES} bytes")

    def with_fpr(self, index: int, value: bytes) -> FpuState:
        """A copy with ST(index)'s 16-byte slot replaced (pass the old slot's tail to keep it)."""
        return replace(self, fpr=_replaced(self.fpr, index, value))

    def with_xmm(self, index: int, value: bytes) -> FpuState:
        return replace(self, xmm=_replaced(self.xmm, index, value))

    @classmethod
    def from_bytes(cls, data: bytes) -> FpuState:
        fpr, fcw, fsw, ftwx, last_opcode, last_ip, last_dp, xmm, mxcsr = _FPU.unpack(data)
        return cls(_slots(fpr), fcw, fsw, ftwx, last_opcode, last_ip, last_dp, _slots(xmm), mxcsr)

    def to_bytes(self) -> bytes:
        return _FPU.pack(b"".join(self.fpr), self.fcw, self.fsw, self.ftwx, self.last_opcode,
                         self.last_ip, self.last_dp, b"".join(self.xmm), self.mxcsr)  # fmt: skip

    @classmethod
    def from_struct(cls, fpu: Any) -> FpuState:
        """From a `struct kvm_fpu *` (cffi)."""
        return cls.from_bytes(_struct_bytes(fpu, _FPU.size))

    def to_struct(self) -> Any:
        """A new `struct kvm_fpu *` (cffi) holding this state."""
        fpu = ffi.new("struct kvm_fpu *")
        ffi.memmove(fpu, self.to_bytes(), _FPU.size)
        return fpu


def _slots(data: bytes) -> tuple[bytes, ...]:
    return tuple(data[at : at + SLOT_BYTES] for at in range(0, len(data), SLOT_BYTES))


def _replaced(registers: tuple[bytes, ...], index: int, value: bytes) -> tuple[bytes, ...]:
    if not 0 <= index < len(registers):
        raise IndexError(f"register {index} of {len(registers)}")
    return registers[:index] + (bytes(value),) + registers[index + 1 :]


@dataclass(frozen=True, slots=True)
class LapicState:
    """The local APIC register page of struct kvm_lapic_state (api.rst KVM_GET_LAPIC): 1024
    bytes, one 32-bit register at each 16-byte boundary (SDM Vol. 3A table 11-1)."""

    registers: bytes = field(default=bytes(APIC_REGISTER_PAGE_SIZE), repr=False)

    def __post_init__(self) -> None:
        if len(self.registers) != APIC_REGISTER_PAGE_SIZE:
            raise ValueError(f"a LAPIC page is {APIC_REGISTER_PAGE_SIZE} bytes, not {len(self.registers)}")
        if not isinstance(self.registers, bytes):
            # A bytearray handed in would let the "frozen" page change under its holder.
            object.__setattr__(self, "registers", bytes(self.registers))

    def register(self, offset: int) -> int:
        """The 32-bit register at `offset` (APIC_ID, APIC_LVT_LINT0...)."""
        _check_offset(offset)
        (value,) = _APIC_REGISTER.unpack_from(self.registers, offset)
        return int(value)

    def with_register(self, offset: int, value: int) -> LapicState:
        """A copy with the 32-bit register at `offset` set to `value`."""
        _check_offset(offset)
        page = bytearray(self.registers)
        _APIC_REGISTER.pack_into(page, offset, value & 0xFFFF_FFFF)
        return LapicState(bytes(page))

    @property
    def id(self) -> int:
        """The APIC ID (xAPIC mode: bits 31:24 of the ID register)."""
        return self.register(APIC_ID) >> _APIC_ID_SHIFT

    @property
    def version(self) -> int:
        """The version register: version in bits 7:0, max LVT entry in bits 23:16."""
        return self.register(APIC_VERSION)

    @property
    def lvt_lint0(self) -> int:
        return self.register(APIC_LVT_LINT0)

    @property
    def lvt_lint1(self) -> int:
        return self.register(APIC_LVT_LINT1)

    @classmethod
    def from_struct(cls, lapic: Any) -> LapicState:
        """From a `struct kvm_lapic_state *` (cffi)."""
        return cls(_struct_bytes(lapic, APIC_REGISTER_PAGE_SIZE))

    def to_struct(self) -> Any:
        """A new `struct kvm_lapic_state *` (cffi) holding this page."""
        lapic = ffi.new("struct kvm_lapic_state *")
        ffi.memmove(lapic, self.registers, APIC_REGISTER_PAGE_SIZE)
        return lapic


def _check_offset(offset: int) -> None:
    if offset % 16 or not 0 <= offset < APIC_REGISTER_PAGE_SIZE:
        raise ValueError(f"{offset:#x} is not a LAPIC register offset (a multiple of 16 below 0x400)")
