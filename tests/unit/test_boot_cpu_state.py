"""Entry states, the boot GDT and the identity page tables (Intel SDM vol. 3A §3.4.5, §4.5)."""

from __future__ import annotations

import struct

import pytest

from hypervisor.boot.cpu_state import (
    BOOT_CS,
    BOOT_DS,
    BOOT_TSS,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    DescriptorTable,
    decode_descriptor,
    encode_descriptor,
    long_mode_state,
    protected_mode_flat_state,
    real_mode_state,
    setup_gdt,
)
from hypervisor.boot.page_tables import (
    PAGE_SIZE_1G,
    PTE_USER,
    identity_page_tables_size,
    setup_identity_page_tables,
    translate,
)
from hypervisor.errors import BootError
from hypervisor.memory import GuestMemory

GiB = 1 << 30
GDTR = DescriptorTable(0x500, 39)


@pytest.fixture
def memory():
    guest = GuestMemory.flat(1 << 20)
    yield guest
    guest.close()


def gdt_entries(memory: GuestMemory, gpa: int, count: int) -> list[int]:
    return list(struct.unpack(f"<{count}Q", memory.read(gpa, count * 8)))


def test_long_mode_gdt_holds_the_well_known_flat_descriptors(memory):
    gdtr = setup_gdt(memory, 0x500, long_mode=True)
    assert (gdtr.base, gdtr.limit) == (0x500, 5 * 8 - 1)
    entries = gdt_entries(memory, 0x500, 5)
    # The descriptors Linux itself uses for __KERNEL_CS (64-bit) and __KERNEL_DS.
    assert entries[BOOT_CS >> 3] == 0x00AF9B000000FFFF
    assert entries[BOOT_DS >> 3] == 0x00CF93000000FFFF
    assert entries[BOOT_TSS >> 3] == 0x00008B0000000067
    assert entries[0] == entries[1] == 0


def test_protected_mode_gdt_has_a_32bit_code_segment(memory):
    setup_gdt(memory, 0x500, long_mode=False)
    assert gdt_entries(memory, 0x500, 5)[BOOT_CS >> 3] == 0x00CF9B000000FFFF


@pytest.mark.parametrize("long_mode", [True, False])
def test_entry_segments_match_what_the_gdt_decodes_to(memory, long_mode):
    gdtr = setup_gdt(memory, 0x500, long_mode=long_mode)
    entries = gdt_entries(memory, 0x500, 5)
    state = (long_mode_state(0x1000, gdtr, 0x9000) if long_mode else protected_mode_flat_state(0x1000, gdtr))
    for segment in (state.cs, state.ds, state.ss, state.tr):
        decoded = decode_descriptor(segment.selector, entries[segment.selector >> 3])
        assert decoded == segment
        assert encode_descriptor(decoded) == entries[segment.selector >> 3]


def test_long_mode_state_per_boot_rst():
    state = long_mode_state(0x1000200, gdt=GDTR, pml4_gpa=0x9000, stack=0x8FF0, rsi=0x7000)
    assert state.rip == 0x1000200 and state.rsp == 0x8FF0
    assert state.gprs == {"rsi": 0x7000}
    assert state.cr0 & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG
    assert state.cr4 & CR4_PAE and state.cr3 == 0x9000
    assert state.efer == EFER_LME | EFER_LMA
    assert (state.cs.selector, state.cs.l, state.cs.db) == (BOOT_CS, 1, 0)
    assert state.ds.selector == state.ss.selector == BOOT_DS
    assert state.rflags == 0x2  # interrupts off, reserved bit 1 set


def test_protected_mode_state_has_paging_off():
    state = protected_mode_flat_state(0x100000, GDTR, rax=0x2BADB002, rbx=0x6000)
    assert state.cr0 & CR0_PE and not state.cr0 & CR0_PG
    assert state.efer == 0 and state.cr4 == 0
    assert (state.cs.db, state.cs.l, state.cs.limit) == (1, 0, 0xFFFFFFFF)
    assert state.gprs == {"rax": 0x2BADB002, "rbx": 0x6000}
    assert state.idt.limit == 0  # an early exception becomes a triple fault, not a wild jump


@pytest.mark.parametrize("entry", [0x7C00, 0x1000, 0xFFFF, 0x12345, 0x9FFF0, 0xFFFFFFF0])
def test_real_mode_state_reaches_the_entry_address(entry):
    state = real_mode_state(entry)
    assert state.cs.base + state.rip == entry
    assert state.rip <= 0xFFFF
    assert state.cr0 & CR0_PE == 0
    if entry <= 0xFFFF:
        assert state.cs.selector == 0 and state.rip == entry
    if entry < 0x100000:
        assert state.cs.selector << 4 == state.cs.base
    assert all(s.selector == 0 and s.base == 0 for s in (state.ds, state.es, state.ss))


def test_with_registers_adds_to_the_general_registers():
    state = real_mode_state(0x7C00).with_registers(rdx=0x80)
    assert state.gprs == {"rdx": 0x80}


def test_identity_map_of_4_gib_with_2_mib_pages(memory):
    cr3 = setup_identity_page_tables(memory, 0x9000)
    assert cr3 == 0x9000
    assert identity_page_tables_size() == 6 * 4096
    for address in (0, 0x7000, 0x1000200, 0x3FFFFFFF, 0x40000000, 0xC0001234, 0xFFFFFFFF):
        assert translate(memory, cr3, address) == address
    with pytest.raises(BootError, match="not mapped"):
        translate(memory, cr3, 4 * GiB)


def test_identity_map_with_1_gib_pages_and_user_bit(memory):
    cr3 = setup_identity_page_tables(memory, 0x9000, size=8 * GiB, page_size=PAGE_SIZE_1G, user=True)
    assert identity_page_tables_size(8 * GiB, PAGE_SIZE_1G) == 2 * 4096
    assert translate(memory, cr3, 7 * GiB + 0x1234) == 7 * GiB + 0x1234
    assert memory.read_u64(0x9000) & PTE_USER
    with pytest.raises(BootError):
        translate(memory, cr3, 8 * GiB)


def test_page_tables_refuse_bad_arguments(memory):
    with pytest.raises(BootError, match="aligned"):
        setup_identity_page_tables(memory, 0x9001)
    with pytest.raises(BootError, match="outside guest RAM"):
        setup_identity_page_tables(memory, 0xFF000)
    with pytest.raises(BootError, match="page size"):
        setup_identity_page_tables(memory, 0x9000, page_size=4096)
