"""Multiboot v1 kernels (Multiboot Specification 0.6.96 §3): header search, loading, info, entry."""

from __future__ import annotations

import struct

import pytest

from hypervisor.boot import layout
from hypervisor.boot.loader import prepare_kernel
from hypervisor.boot.multiboot import find_multiboot_header, prepare_multiboot
from hypervisor.errors import BootError
from tests.unit.test_boot_fixtures import ElfSegment, ElfSpec, MiB, make_elf, multiboot_header, new_guest

LOAD = 0x400000  # where kvm-unit-tests link their x86 tests
CODE = b"\xfa\xf4" * 0x800


@pytest.fixture
def guest_64m():
    with new_guest(64 * MiB) as pair:
        yield pair


def multiboot_elf(flags: int = 0x3, elf_class: int = 1, bss: int = 0x1000, paddr: int = LOAD) -> bytes:
    return make_elf(ElfSpec(
        entry=paddr, segments=[ElfSegment(paddr, CODE, memory_size=len(CODE) + bss)],
        elf_class=elf_class, machine=3 if elf_class == 1 else 62, prefix=multiboot_header(flags),
    ))


def info_fields(memory, gpa=layout.BOOT_INFO_START) -> dict[str, int]:
    names = ["flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count", "mods_addr"]
    values = struct.unpack_from("<7I", memory.read(gpa, 28))
    fields = dict(zip(names, values, strict=True))
    fields["mmap_length"], fields["mmap_addr"] = struct.unpack_from("<II", memory.read(gpa + 44, 8))
    fields["boot_loader_name"] = memory.read_u32(gpa + 64)
    return fields


def read_c_string(memory, gpa: int) -> bytes:
    data = memory.read(gpa, 256)
    return data[: data.index(b"\0")]


def test_header_search_needs_alignment_and_checksum():
    header = multiboot_header()
    assert find_multiboot_header(bytes(64) + header).offset == 64
    assert find_multiboot_header(bytes(62) + header + bytes(2)) is None  # not 4-aligned
    assert find_multiboot_header(bytes(8192) + header) is None  # beyond the first 8 KiB
    assert find_multiboot_header(bytes(8192 - 12) + header).offset == 8180
    broken = bytearray(header)
    broken[8] ^= 1
    assert find_multiboot_header(bytes(broken)) is None


def test_elf32_multiboot_kernel_entry_state_and_info(guest_64m):
    guest, memory = guest_64m
    memory.write(LOAD + len(CODE), b"\xff" * 0x1000)
    boot = prepare_multiboot(memory, guest, multiboot_elf(), "verbose=1", kernel_name="vmexit.flat", cpus=2)
    assert boot.protocol == "multiboot"
    state = boot.entry
    assert state.rip == LOAD
    assert state.gprs["rax"] == 0x2BADB002 and state.gprs["rbx"] == layout.BOOT_INFO_START
    assert state.cr0 & 1 and not state.cr0 & (1 << 31) and state.efer == 0
    assert state.cs.db == 1 and state.cs.limit == 0xFFFFFFFF and state.ds.limit == 0xFFFFFFFF
    assert state.rflags == 0x2
    assert memory.read(LOAD, len(CODE)) == CODE
    assert memory.read(LOAD + len(CODE), 0x1000) == bytes(0x1000)

    info = info_fields(memory)
    assert info["flags"] & 0x1 and info["flags"] & 0x4 and info["flags"] & 0x40 and info["flags"] & 0x200
    assert not info["flags"] & 0x8  # no modules without an initrd
    assert info["mem_lower"] == 639
    assert info["mem_upper"] == 63 * 1024
    assert read_c_string(memory, info["cmdline"]) == b"vmexit.flat verbose=1"
    assert read_c_string(memory, info["boot_loader_name"]) == b"pyhv"
    entries = []
    for offset in range(0, info["mmap_length"], 24):
        size, base, length, kind = struct.unpack_from("<IQQI", memory.read(info["mmap_addr"] + offset, 24))
        assert size == 20
        entries.append((base, length, kind))
    assert entries == [(e.address, e.size, e.type) for e in guest.e820]


def test_initrd_becomes_a_page_aligned_module(guest_64m):
    guest, memory = guest_64m
    initrd = b"TESTNAME=vmexit\n" * 100
    prepare_multiboot(memory, guest, multiboot_elf(), "", initrd=initrd)
    info = info_fields(memory)
    assert info["flags"] & 0x8 and info["mods_count"] == 1
    start, end, string, _ = struct.unpack_from("<IIII", memory.read(info["mods_addr"], 16))
    assert start % 4096 == 0 and end - start == len(initrd)
    assert start >= LOAD + len(CODE)
    assert memory.read(start, len(initrd)) == initrd
    assert read_c_string(memory, string) == b"initrd"


def test_prepare_kernel_dispatches_multiboot_and_names_the_program(guest_64m):
    guest, memory = guest_64m
    boot = prepare_kernel(memory, guest, multiboot_elf(), "x", name="/tmp/emulator.elf",
                          program_name="emulator.elf")
    assert boot.protocol == "multiboot" and boot.cmdline == "emulator.elf x"


def test_elf64_multiboot_kernel_below_4_gib_is_accepted(guest_64m):
    guest, memory = guest_64m
    assert prepare_multiboot(memory, guest, multiboot_elf(elf_class=2), "").entry.rip == LOAD


def test_aout_kludge_addresses(guest_64m):
    guest, memory = guest_64m
    # File: 32 bytes of code, the header at offset 32, more code; loaded at 0x200000 from offset 0.
    header_offset = 32
    body = b"\x90" * header_offset
    load_addr = 0x200000
    image_len = header_offset + 32 + 64
    aout = (load_addr + header_offset, load_addr, load_addr + image_len, load_addr + image_len + 0x100,
            load_addr + 4)
    image = body + multiboot_header(aout=aout) + b"\xcc" * 64
    memory.write(load_addr + image_len, b"\xff" * 0x100)
    boot = prepare_kernel(memory, guest, image, "")
    assert boot.protocol == "multiboot" and boot.entry.rip == load_addr + 4
    assert memory.read(load_addr, image_len) == image
    assert memory.read(load_addr + image_len, 0x100) == bytes(0x100)


def test_aout_kludge_beyond_the_file_is_refused(guest_64m):
    guest, memory = guest_64m
    aout = (0x200000, 0x200000, 0x300000, 0, 0x200000)
    with pytest.raises(BootError, match="truncated"):
        prepare_kernel(memory, guest, multiboot_header(aout=aout) + bytes(100), "")


def test_video_mode_requirement_is_refused(guest_64m):
    guest, memory = guest_64m
    with pytest.raises(BootError, match="video mode"):
        prepare_multiboot(memory, guest, multiboot_elf(flags=0x7), "")
    with pytest.raises(BootError, match="does not know"):
        prepare_multiboot(memory, guest, multiboot_elf(flags=0x8), "")


def test_kernel_over_the_loader_structures_is_refused(guest_64m):
    guest, memory = guest_64m
    with pytest.raises(BootError, match="overlap"):
        prepare_multiboot(memory, guest, multiboot_elf(paddr=0x6000), "")


def test_kernel_beyond_ram_is_refused(guest_64m):
    guest, memory = guest_64m
    with pytest.raises(BootError, match="outside"):
        prepare_multiboot(memory, guest, multiboot_elf(paddr=0x8000000), "")
