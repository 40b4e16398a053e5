"""The initial vCPU state a loader asks for, as plain data (no KVM here).

A loader returns an `EntryState`; the machine copies it into `kvm_regs` / `kvm_sregs` (the field
names of `Segment` and `DescriptorTable` are those of `struct kvm_segment` / `struct kvm_dtable`
in <linux/kvm.h>, so the copy is one attribute per field).

Three entry modes exist:
- real mode (`real_mode_state`): `pyhv run --raw FILE@ADDR`;
- 32-bit protected mode, flat segments, paging off (`protected_mode_flat_state`): multiboot
  (Multiboot 0.6.96 §3.2 "Machine state"), PVH (xen/include/public/arch-x86/hvm/start_info.h),
  and the bzImage 32-bit entry (boot.rst "32-bit BOOT PROTOCOL");
- 64-bit long mode (`long_mode_state`): boot.rst "64-bit BOOT PROTOCOL", with the GDT from
  `setup_gdt` and the identity page tables from `setup_identity_page_tables`.

The GDT follows boot.rst: __BOOT_CS at selector 0x10 and __BOOT_DS at 0x18, 4 GiB flat. The code
descriptor is 64-bit (L=1) for the 64-bit entry and 32-bit (D=1) for the 32-bit entries, so the
hidden segment state the machine loads matches what a guest reloading CS from the GDT finds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from hypervisor.boot.page_tables import setup_identity_page_tables
from hypervisor.memory import GuestMemory

__all__ = [
    "BOOT_CS",
    "BOOT_DS",
    "BOOT_TSS",
    "DescriptorTable",
    "EntryState",
    "Segment",
    "decode_descriptor",
    "encode_descriptor",
    "long_mode_state",
    "protected_mode_flat_state",
    "real_mode_state",
    "setup_gdt",
    "setup_identity_page_tables",
]

# Control register and EFER bits, Intel SDM vol. 3A §2.5 "Control Registers" and §2.2.1 "EFER".
CR0_PE = 1 << 0  # protection enable
CR0_ET = 1 << 4  # extension type, hard-wired to 1 since the i486
CR0_PG = 1 << 31  # paging
CR4_PAE = 1 << 5  # physical address extension, required for IA-32e paging
EFER_LME = 1 << 8  # IA-32e mode enable
EFER_LMA = 1 << 10  # IA-32e mode active (set by the CPU; KVM wants it in sregs too)

# RFLAGS bit 1 is reserved and always 1 (SDM vol. 1 §3.4.3); interrupts stay off (IF=0) at every
# entry: boot.rst ("interrupts must be disabled") and Multiboot §3.2 ("IF must be clear").
RFLAGS_RESERVED = 0x2

# Selectors of the boot GDT written by `setup_gdt` (boot.rst: __BOOT_CS=0x10, __BOOT_DS=0x18).
GDT_ENTRY_COUNT = 5  # null, unused, code, data, TSS
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20

# Segment descriptor "type" field values, SDM vol. 3A §3.4.5.1 table 3-1 and §3.5 table 3-2.
SEG_TYPE_DATA_RW_ACCESSED = 0x3
SEG_TYPE_CODE_XR_ACCESSED = 0xB
SEG_TYPE_LDT = 0x2
SEG_TYPE_TSS_BUSY = 0xB  # 32-bit (or, in IA-32e mode, 64-bit) busy TSS

# A TSS must exist for VM entry even though the boot code never switches tasks (SDM vol. 3C
# §26.3.1.2: TR must be usable); 0x67 is the minimal 104-byte 32-bit TSS limit (SDM §7.2.1).
TSS_LIMIT = 0x67
REAL_MODE_LIMIT = 0xFFFF
FLAT_LIMIT = 0xFFFFFFFF
# An empty IDT for the protected and long mode entries: an exception before the guest loads its
# own IDT then escalates to a triple fault (KVM_EXIT_SHUTDOWN), which the machine reports,
# instead of jumping through whatever bytes lie at address 0 (SDM vol. 3A §6.10, §6.15 #DF).
NULL_IDT_LIMIT = 0


@dataclass(frozen=True)
class Segment:
    """One segment register's visible selector and hidden descriptor cache (kvm_segment)."""

    selector: int
    base: int
    limit: int  # byte granular, as KVM wants it (already expanded when g=1)
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the field name of struct kvm_segment and of the SDM
    g: int
    avl: int = 0
    unusable: int = 0


@dataclass(frozen=True)
class DescriptorTable:
    """GDTR / IDTR contents (kvm_dtable): linear base and limit (size in bytes minus one)."""

    base: int
    limit: int


def _real_mode_segment(selector: int, base: int, type_: int) -> Segment:
    return Segment(selector, base, REAL_MODE_LIMIT, type_, present=1, dpl=0, db=0, s=1, l=0, g=0)


_RESET_LDT = Segment(0, 0, REAL_MODE_LIMIT, SEG_TYPE_LDT, present=1, dpl=0, db=0, s=0, l=0, g=0)
_RESET_TR = Segment(0, 0, REAL_MODE_LIMIT, SEG_TYPE_TSS_BUSY, present=1, dpl=0, db=0, s=0, l=0, g=0)


@dataclass(frozen=True)
class EntryState:
    """Everything the machine must load into a vCPU before its first KVM_RUN.

    `gprs` holds the general purpose registers a protocol defines, by their 64-bit name
    ("rsi" for the zero page of the Linux 64-bit entry, "rax"/"rbx" for multiboot, "rbx" for
    PVH). Registers not named are zero.
    """

    rip: int
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    rsp: int = 0
    rflags: int = RFLAGS_RESERVED
    gprs: dict[str, int] = field(default_factory=dict)
    tr: Segment = _RESET_TR
    ldt: Segment = _RESET_LDT
    gdt: DescriptorTable = DescriptorTable(0, 0xFFFF)
    idt: DescriptorTable = DescriptorTable(0, 0xFFFF)
    cr0: int = CR0_ET
    cr3: int = 0
    cr4: int = 0
    efer: int = 0

    def with_registers(self, **registers: int) -> EntryState:
        """A copy with more general purpose registers set (e.g. `rsi=zero_page`)."""
        return replace(self, gprs={**self.gprs, **registers})


# --- GDT descriptors (SDM vol. 3A §3.4.5 "Segment Descriptors", figure 3-8) ---


def encode_descriptor(segment: Segment) -> int:
    """The 8-byte GDT descriptor of `segment` (limit re-encoded in 4 KiB units when g=1)."""
    limit = segment.limit >> 12 if segment.g else segment.limit
    if limit > 0xFFFFF or segment.base > 0xFFFFFFFF:
        raise ValueError(f"segment {segment} does not fit a legacy descriptor")
    return (
        (limit & 0xFFFF)
        | (segment.base & 0xFFFFFF) << 16
        | (segment.type & 0xF) << 40
        | (segment.s & 1) << 44
        | (segment.dpl & 3) << 45
        | (segment.present & 1) << 47
        | (limit >> 16 & 0xF) << 48
        | (segment.avl & 1) << 52
        | (segment.l & 1) << 53
        | (segment.db & 1) << 54
        | (segment.g & 1) << 55
        | (segment.base >> 24 & 0xFF) << 56
    )


def decode_descriptor(selector: int, descriptor: int) -> Segment:
    """The hidden segment state a CPU loads for `descriptor` through `selector`."""
    limit = (descriptor & 0xFFFF) | (descriptor >> 48 & 0xF) << 16
    granular = descriptor >> 55 & 1
    if granular:
        limit = limit << 12 | 0xFFF
    return Segment(
        selector=selector,
        base=(descriptor >> 16 & 0xFFFFFF) | (descriptor >> 56 & 0xFF) << 24,
        limit=limit,
        type=descriptor >> 40 & 0xF,
        s=descriptor >> 44 & 1,
        dpl=descriptor >> 45 & 3,
        present=descriptor >> 47 & 1,
        avl=descriptor >> 52 & 1,
        l=descriptor >> 53 & 1,
        db=descriptor >> 54 & 1,
        g=granular,
    )


def _flat_code(long_mode: bool) -> Segment:
    # 64-bit code: L=1 and D=0 (SDM §5.2.1); 32-bit code: D=1, L=0.
    return Segment(BOOT_CS, 0, FLAT_LIMIT, SEG_TYPE_CODE_XR_ACCESSED, present=1, dpl=0,
                   db=0 if long_mode else 1, s=1, l=1 if long_mode else 0, g=1)


def _flat_data(selector: int = BOOT_DS) -> Segment:
    return Segment(selector, 0, FLAT_LIMIT, SEG_TYPE_DATA_RW_ACCESSED, present=1, dpl=0,
                   db=1, s=1, l=0, g=1)


def _boot_tss() -> Segment:
    return Segment(BOOT_TSS, 0, TSS_LIMIT, SEG_TYPE_TSS_BUSY, present=1, dpl=0, db=0, s=0, l=0, g=0)


def boot_gdt_entries(long_mode: bool) -> list[int]:
    """The descriptors of the boot GDT, indexed by selector >> 3."""
    return [0, 0, encode_descriptor(_flat_code(long_mode)), encode_descriptor(_flat_data()),
            encode_descriptor(_boot_tss())]


def setup_gdt(memory: GuestMemory, gpa: int, long_mode: bool = True) -> DescriptorTable:
    """Write the boot GDT at `gpa` and return the GDTR value that points at it."""
    entries = boot_gdt_entries(long_mode)
    memory.write(gpa, struct.pack(f"<{len(entries)}Q", *entries))
    return DescriptorTable(gpa, len(entries) * 8 - 1)


# --- the three entry modes ---


def real_mode_state(entry: int, stack: int = 0) -> EntryState:
    """Real mode at physical address `entry`: CS=0 and IP=entry when it fits 16 bits.

    Above 64 KiB, CS's hidden base takes the high bits (selector = base >> 4 below 1 MiB; above
    1 MiB the base is loaded directly, as the CPU's own reset state does with base 0xffff0000)
    and IP the low 16 bits. Data segments are 0, SS:SP = 0:`stack`.
    """
    if not 0 <= entry <= 0xFFFFFFFF:
        raise ValueError(f"real-mode entry {entry:#x} is outside the 32-bit address space")
    code_base = entry & ~0xFFFF
    code = _real_mode_segment((code_base >> 4) & 0xFFFF, code_base, SEG_TYPE_CODE_XR_ACCESSED)
    data = _real_mode_segment(0, 0, SEG_TYPE_DATA_RW_ACCESSED)
    return EntryState(rip=entry & 0xFFFF, rsp=stack, cs=code, ds=data, es=data, fs=data, gs=data,
                      ss=data)


def protected_mode_flat_state(entry: int, gdt: DescriptorTable | None = None, stack: int = 0,
                              **registers: int) -> EntryState:
    """32-bit protected mode, 4 GiB flat CS (0x10) and data segments (0x18), paging off.

    `gdt` should be what `setup_gdt(memory, gpa, long_mode=False)` returned, so that a guest
    that reloads a segment register from the GDT gets the same flat segment.
    """
    data = _flat_data()
    return EntryState(
        rip=entry, rsp=stack, gprs=dict(registers), cs=_flat_code(long_mode=False), ds=data,
        es=data, fs=data, gs=data, ss=data, tr=_boot_tss(), gdt=gdt or DescriptorTable(0, 0xFFFF),
        idt=DescriptorTable(0, NULL_IDT_LIMIT), cr0=CR0_PE | CR0_ET,
    )


def long_mode_state(entry: int, gdt: DescriptorTable, pml4_gpa: int, stack: int = 0,
                    **registers: int) -> EntryState:
    """64-bit mode per boot.rst "64-bit BOOT PROTOCOL": flat __BOOT_CS/__BOOT_DS, paging on.

    `gdt` comes from `setup_gdt(memory, gpa, long_mode=True)`, `pml4_gpa` from
    `setup_identity_page_tables` (identity map covering the kernel, zero page and command line).
    """
    data = _flat_data()
    return EntryState(
        rip=entry, rsp=stack, gprs=dict(registers), cs=_flat_code(long_mode=True), ds=data,
        es=data, fs=data, gs=data, ss=data, tr=_boot_tss(), gdt=gdt,
        idt=DescriptorTable(0, NULL_IDT_LIMIT), cr0=CR0_PE | CR0_ET | CR0_PG, cr3=pml4_gpa,
        cr4=CR4_PAE, efer=EFER_LME | EFER_LMA,
    )
