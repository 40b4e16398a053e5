"""Identity-mapping page tables for the 64-bit entry (IA-32e 4-level paging).

boot.rst "64-bit BOOT PROTOCOL": "the range with setup_header.init_size from start address of
loaded kernel and zero page and command line buffer get ident mapping". We map the whole low
4 GiB (or a caller-given size) one-to-one, which covers all of those wherever they are placed.

Structures from Intel SDM vol. 3A §4.5 "4-Level Paging": one PML4 page, one PDPT page, and either
one page directory per GiB with 2 MiB pages (PS=1 in the PDE, always available in IA-32e mode)
or 1 GiB pages straight in the PDPT (PS=1 in the PDPTE; needs CPUID.80000001H:EDX.Page1GB).
"""

from __future__ import annotations

import struct

from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

# Paging-structure entry bits, SDM vol. 3A §4.5, tables 4-15 to 4-19.
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_USER = 1 << 2
PTE_PAGE_SIZE = 1 << 7  # PS: this entry maps a 2 MiB (PDE) or 1 GiB (PDPTE) page

PAGE_SIZE_4K = 0x1000
PAGE_SIZE_2M = 0x200000
PAGE_SIZE_1G = 0x40000000
ENTRIES_PER_TABLE = 512
# One PDPT covers 512 GiB; the boot map never needs more than that.
MAX_IDENTITY_MAP = ENTRIES_PER_TABLE * PAGE_SIZE_1G


def identity_page_tables_size(size: int = 4 * PAGE_SIZE_1G, page_size: int = PAGE_SIZE_2M) -> int:
    """Bytes of guest memory `setup_identity_page_tables` writes for these arguments."""
    gigabytes = -(-size // PAGE_SIZE_1G)
    directories = gigabytes if page_size == PAGE_SIZE_2M else 0
    return (2 + directories) * PAGE_SIZE_4K


def setup_identity_page_tables(memory: GuestMemory, pml4_gpa: int, size: int = 4 * PAGE_SIZE_1G,
                               page_size: int = PAGE_SIZE_2M, user: bool = False) -> int:
    """Write PML4, PDPT (and page directories) at `pml4_gpa` mapping [0, size) to itself.

    The tables are contiguous 4 KiB pages: PML4, PDPT, then one page directory per GiB when
    `page_size` is 2 MiB. `user` sets the U/S bit everywhere (for test guests that run at CPL3).
    Returns the value for CR3 (`pml4_gpa`; PCD/PWT left clear).
    """
    if pml4_gpa % PAGE_SIZE_4K:
        raise BootError(f"page tables at {pml4_gpa:#x} are not 4 KiB aligned")
    if page_size not in (PAGE_SIZE_2M, PAGE_SIZE_1G):
        raise BootError(f"identity map page size must be 2 MiB or 1 GiB, not {page_size:#x}")
    if not 0 < size <= MAX_IDENTITY_MAP:
        raise BootError(f"identity map size {size:#x} is outside (0, 512 GiB]")
    total = identity_page_tables_size(size, page_size)
    if not memory.contains(pml4_gpa, total):
        raise BootError(f"page tables at {pml4_gpa:#x}+{total:#x} are outside guest RAM")

    flags = PTE_PRESENT | PTE_WRITABLE | (PTE_USER if user else 0)
    pdpt_gpa = pml4_gpa + PAGE_SIZE_4K
    gigabytes = -(-size // PAGE_SIZE_1G)

    tables = bytearray(total)
    struct.pack_into("<Q", tables, 0, pdpt_gpa | flags)
    for gigabyte in range(gigabytes):
        if page_size == PAGE_SIZE_1G:
            pdpte = gigabyte * PAGE_SIZE_1G | flags | PTE_PAGE_SIZE
        else:
            directory_offset = (2 + gigabyte) * PAGE_SIZE_4K
            pdpte = (pml4_gpa + directory_offset) | flags
            entries = [
                (gigabyte * PAGE_SIZE_1G + index * PAGE_SIZE_2M) | flags | PTE_PAGE_SIZE
                for index in range(ENTRIES_PER_TABLE)
            ]
            struct.pack_into(f"<{ENTRIES_PER_TABLE}Q", tables, directory_offset, *entries)
        struct.pack_into("<Q", tables, PAGE_SIZE_4K + gigabyte * 8, pdpte)
    memory.write(pml4_gpa, tables)
    return pml4_gpa


def translate(memory: GuestMemory, cr3: int, linear: int) -> int:
    """Walk the 4-level tables at `cr3` like the MMU does (for tests and the debugger).

    Raises BootError when the address is not mapped.
    """
    table = cr3 & ~0xFFF
    # Index bits per level, SDM vol. 3A figure 4-8: PML4 47:39, PDPT 38:30, PD 29:21, PT 20:12.
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = memory.read_u64(table + ((linear >> shift) & 0x1FF) * 8)
        if not entry & PTE_PRESENT:
            raise BootError(f"linear address {linear:#x} is not mapped (level {4 - level})")
        address = entry & 0x000FFFFFFFFFF000
        if level in (1, 2) and entry & PTE_PAGE_SIZE:
            page_mask = (1 << shift) - 1
            return (address & ~page_mask) | (linear & page_mask)
        table = address
    return table | (linear & 0xFFF)
