"""The PVH boot ABI: an ELF note names a 32-bit entry, EBX points at `struct hvm_start_info`.

Structures from xen/include/public/arch-x86/hvm/start_info.h (version 1) and the note from
xen/include/public/elfnote.h (XEN_ELFNOTE_PHYS32_ENTRY = 18, name "Xen"). The entry state is
32-bit protected mode with flat segments and paging off (docs/misc/pvh.pandoc "x86/HVM direct
boot ABI"); Linux implements it in arch/x86/platform/pvh/head.S.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from hypervisor.boot.elf import ElfImage
from hypervisor.boot.layout import E820Entry
from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

XEN_ELFNOTE_PHYS32_ENTRY = 18
MAX_32BIT_ADDRESS = 0xFFFF_FFFF
XEN_NOTE_NAME = b"Xen"
HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
# struct hvm_start_info: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr,
# rsdp_paddr, memmap_paddr, memmap_entries, reserved (56 bytes).
START_INFO_FORMAT = "<IIIIQQQQII"
START_INFO_SIZE = struct.calcsize(START_INFO_FORMAT)
# struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved (32 bytes).
MODLIST_ENTRY_FORMAT = "<QQQQ"
MODLIST_ENTRY_SIZE = struct.calcsize(MODLIST_ENTRY_FORMAT)
# struct hvm_memmap_table_entry: addr, size, type (e820 types), reserved (24 bytes).
MEMMAP_ENTRY_FORMAT = "<QQII"
MEMMAP_ENTRY_SIZE = struct.calcsize(MEMMAP_ENTRY_FORMAT)


def pvh_entry_point(image: ElfImage) -> int | None:
    """The physical 32-bit entry from the XEN_ELFNOTE_PHYS32_ENTRY note, or None without one.

    The entry runs in 32-bit protected mode with paging off (pvh.pandoc), so it must lie below
    4 GiB and, like any entry point, inside a loaded segment's bytes: a note pointing anywhere
    else is a broken kernel, refused here rather than left to fail on the vCPU.
    """
    for note in image.notes():
        if note.name == XEN_NOTE_NAME and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(note.desc) not in (4, 8):
                raise BootError(f"the kernel's PVH entry note has a {len(note.desc)}-byte value, expected 4 or 8")
            entry = int.from_bytes(note.desc, "little")
            if entry > MAX_32BIT_ADDRESS:
                raise BootError(f"the kernel's PVH entry {entry:#x} is above 4 GiB; it is entered in 32-bit mode")
            if not image.holds_code_at(entry):
                raise BootError(f"the kernel's PVH entry {entry:#x} is outside every loadable segment's contents")
            return entry
    return None


def build_start_info(gpa: int, cmdline_gpa: int, e820: Sequence[E820Entry], initrd: tuple[int, int] | None) -> bytes:
    """hvm_start_info at `gpa`, followed by its module list (0 or 1 entry) and memory map."""
    modlist_gpa = gpa + START_INFO_SIZE
    modules = [initrd] if initrd else []
    memmap_gpa = modlist_gpa + len(modules) * MODLIST_ENTRY_SIZE
    start_info = struct.pack(
        START_INFO_FORMAT,
        HVM_START_MAGIC,
        HVM_START_VERSION,
        0,
        len(modules),
        modlist_gpa if modules else 0,
        cmdline_gpa,
        0,
        memmap_gpa,
        len(e820),
        0,
    )
    modlist = b"".join(struct.pack(MODLIST_ENTRY_FORMAT, address, size, 0, 0) for address, size in modules)
    memmap = b"".join(struct.pack(MEMMAP_ENTRY_FORMAT, e.address, e.size, e.type, 0) for e in e820)
    return start_info + modlist + memmap


def write_start_info(
    memory: GuestMemory,
    gpa: int,
    limit: int,
    cmdline_gpa: int,
    e820: Sequence[E820Entry],
    initrd: tuple[int, int] | None,
) -> int:
    """Write hvm_start_info at `gpa` (must end before `limit`); returns its size."""
    blob = build_start_info(gpa, cmdline_gpa, e820, initrd)
    if gpa + len(blob) > limit:
        raise BootError(f"the PVH start info ({len(blob)} bytes) does not fit below {limit:#x}")
    memory.write(gpa, blob)
    return len(blob)
