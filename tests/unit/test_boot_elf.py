"""ELF vmlinux loading, the PVH note and entry, xz kernels, and kernel format detection."""

from __future__ import annotations

import lzma
import struct

import pytest

from hypervisor.boot import layout
from hypervisor.boot.elf import parse_elf
from hypervisor.boot.image_format import detect_kernel_format
from hypervisor.boot.linux import prepare_linux
from hypervisor.boot.loader import prepare_kernel
from hypervisor.boot.pvh import HVM_START_MAGIC, MEMMAP_ENTRY_FORMAT, START_INFO_FORMAT, pvh_entry_point
from hypervisor.boot.zero_page import read_zero_page
from hypervisor.errors import BootError
from tests.unit.test_boot_fixtures import (
    ElfSegment,
    ElfSpec,
    MiB,
    make_bzimage,
    make_elf,
    multiboot_header,
    new_guest,
)

KERNEL_VIRT = 0xFFFFFFFF81000000
KERNEL_PHYS = 0x1000000
TEXT = b"\x90" * 0x3000 + b"\xf4"


@pytest.fixture
def guest_64m():
    with new_guest(64 * MiB) as pair:
        yield pair


def vmlinux(entry: int = KERNEL_PHYS, notes=(), bss: int = 0x2000) -> bytes:
    """Like a Linux vmlinux: linked high, loaded at 16 MiB, e_entry physical."""
    segment = ElfSegment(KERNEL_PHYS, TEXT, memory_size=len(TEXT) + bss, vaddr=KERNEL_VIRT)
    return make_elf(ElfSpec(entry=entry, segments=[segment], notes=list(notes)))


def test_vmlinux_loads_at_its_physical_address_with_a_zero_page(guest_64m):
    guest, memory = guest_64m
    memory.write(KERNEL_PHYS + len(TEXT), b"\xff" * 0x2000)  # the bss must come out zeroed
    boot = prepare_linux(memory, guest, vmlinux(), "console=ttyS0 panic=-1")
    assert boot.protocol == "linux-64"
    assert boot.entry.rip == KERNEL_PHYS
    assert boot.entry.efer & (1 << 10) and boot.entry.cs.l == 1
    assert memory.read(KERNEL_PHYS, len(TEXT)) == TEXT
    assert memory.read(KERNEL_PHYS + len(TEXT), 0x2000) == bytes(0x2000)
    page = read_zero_page(memory, boot.entry.gprs["rsi"])
    assert page.get("boot_flag") == 0xAA55
    assert page.get("header") == int.from_bytes(b"HdrS", "little")
    assert page.get("version") == 0x020F
    assert page.get("type_of_loader") == 0xFF
    assert page.get("cmd_line_ptr") == layout.CMDLINE_START
    assert page.get("kernel_alignment") == 0x200000
    assert page.e820() == list(guest.e820)
    assert memory.read(layout.CMDLINE_START, 23) == b"console=ttyS0 panic=-1\0"


def test_virtual_entry_is_translated_through_its_segment(guest_64m):
    guest, memory = guest_64m
    boot = prepare_linux(memory, guest, vmlinux(entry=KERNEL_VIRT + 0x40), "")
    assert boot.entry.rip == KERNEL_PHYS + 0x40


def test_entry_outside_every_segment_is_refused(guest_64m):
    guest, memory = guest_64m
    with pytest.raises(BootError, match="entry point"):
        prepare_linux(memory, guest, vmlinux(entry=0x500000), "")


def test_vmlinux_initrd_is_above_the_kernel(guest_64m):
    guest, memory = guest_64m
    initrd = b"\x30\x37" * 5000
    boot = prepare_linux(memory, guest, vmlinux(), "", initrd=initrd)
    page = read_zero_page(memory, layout.ZERO_PAGE_START)
    assert page.get("ramdisk_size") == len(initrd)
    assert page.get("ramdisk_image") >= KERNEL_PHYS + len(TEXT) + 0x2000
    assert memory.read(page.get("ramdisk_image"), len(initrd)) == initrd
    names = {p.name for p in boot.placements}
    assert {"kernel segment 0", "initrd", "zero page", "command line", "page tables", "MP table"} <= names


def test_xz_compressed_vmlinux_is_unpacked_on_the_host(guest_64m):
    guest, memory = guest_64m
    boot = prepare_kernel(memory, guest, lzma.compress(vmlinux()), "")
    assert boot.protocol == "linux-64"
    assert memory.read(KERNEL_PHYS, len(TEXT)) == TEXT


def test_corrupt_xz_is_a_boot_error(guest_64m):
    guest, memory = guest_64m
    packed = bytearray(lzma.compress(vmlinux()))
    packed[40:60] = bytes(20)
    with pytest.raises(BootError, match="xz"):
        prepare_kernel(memory, guest, bytes(packed), "")
    with pytest.raises(BootError, match="truncated"):
        prepare_kernel(memory, guest, lzma.compress(vmlinux())[:-30], "")


def test_xz_bomb_is_bounded_by_guest_ram():
    with new_guest(2 * MiB) as (guest, memory), pytest.raises(BootError, match="more than 2 MiB"):
        prepare_kernel(memory, guest, lzma.compress(bytes(3 * MiB)), "")


def pvh_note(entry: int) -> tuple[bytes, int, bytes]:
    return (b"Xen", 18, struct.pack("<I", entry))


def test_pvh_note_is_found():
    image = parse_elf(vmlinux(notes=[(b"GNU", 3, b"abcd"), pvh_note(0x1000123)]))
    assert pvh_entry_point(image) == 0x1000123
    assert pvh_entry_point(parse_elf(vmlinux(notes=[(b"Linux", 18, b"\0\0\0\0")]))) is None
    assert pvh_entry_point(parse_elf(vmlinux())) is None


def test_pvh_entry_with_start_info(guest_64m):
    guest, memory = guest_64m
    initrd = bytes(range(200)) * 50
    image = vmlinux(notes=[pvh_note(KERNEL_PHYS + 0x100)])
    boot = prepare_linux(memory, guest, image, "console=ttyS0", initrd=initrd, entry="pvh")
    assert boot.protocol == "pvh"
    state = boot.entry
    assert state.rip == KERNEL_PHYS + 0x100
    assert state.gprs["rbx"] == layout.BOOT_INFO_START
    assert state.cr0 & 1 and not state.cr0 & (1 << 31) and state.efer == 0 and state.cr4 == 0
    assert state.cs.db == 1 and state.cs.l == 0
    info = struct.unpack_from(START_INFO_FORMAT, memory.read(layout.BOOT_INFO_START, 56))
    magic, version, _flags, nr_modules, modlist, cmdline, rsdp, memmap, memmap_entries, _ = info
    assert (magic, version, rsdp) == (HVM_START_MAGIC, 1, 0)
    assert memory.read(cmdline, 14) == b"console=ttyS0\0"
    assert nr_modules == 1
    module_address, module_size = struct.unpack_from("<QQ", memory.read(modlist, 16))
    assert memory.read(module_address, module_size) == initrd
    assert memmap_entries == len(guest.e820)
    for index, entry in enumerate(guest.e820):
        fields = struct.unpack_from(MEMMAP_ENTRY_FORMAT, memory.read(memmap + 24 * index, 24))
        assert fields == (entry.address, entry.size, entry.type, 0)


@pytest.mark.parametrize(
    "note,message",
    [
        (pvh_note(0x500000), "outside every loadable segment"),  # below the kernel
        (pvh_note(KERNEL_PHYS + len(TEXT) + 0x10), "outside every loadable segment"),  # in the bss
        (pvh_note(KERNEL_PHYS + 0x100000), "outside every loadable segment"),  # beyond p_memsz
        ((b"Xen", 18, struct.pack("<Q", 0x1_0000_0000 + KERNEL_PHYS)), "above 4 GiB"),
        ((b"Xen", 18, b"\0\0"), "2-byte value"),
    ],
)
def test_pvh_entry_outside_the_kernel_is_bad_input(guest_64m, note, message):
    """Refused as bad input (BootError, exit 3) instead of an emulation failure on the vCPU."""
    guest, memory = guest_64m
    with pytest.raises(BootError, match=message):
        prepare_linux(memory, guest, vmlinux(notes=[note]), "", entry="pvh")


def test_entry_in_the_bss_is_refused(guest_64m):
    guest, memory = guest_64m
    with pytest.raises(BootError, match="entry point"):
        prepare_linux(memory, guest, vmlinux(entry=KERNEL_PHYS + len(TEXT) + 0x100), "")
    with pytest.raises(BootError, match="entry point"):
        prepare_linux(memory, guest, vmlinux(entry=KERNEL_VIRT + len(TEXT) + 0x100), "")


def test_pvh_requested_without_the_note_is_a_clear_error(guest_64m):
    guest, memory = guest_64m
    with pytest.raises(BootError, match="no PVH entry note"):
        prepare_linux(memory, guest, vmlinux(), "", entry="pvh")


def test_auto_entry_prefers_the_64bit_zero_page_even_with_a_pvh_note(guest_64m):
    guest, memory = guest_64m
    boot = prepare_linux(memory, guest, vmlinux(notes=[pvh_note(KERNEL_PHYS + 0x100)]), "")
    assert boot.protocol == "linux-64" and boot.entry.rip == KERNEL_PHYS


def test_segment_outside_guest_ram(guest_64m):
    guest, memory = guest_64m
    image = make_elf(ElfSpec(entry=0x8000000, segments=[ElfSegment(0x8000000, TEXT)]))
    with pytest.raises(BootError, match="outside the guest's 64 MiB"):
        prepare_linux(memory, guest, image, "")


def test_segment_over_the_boot_structures_is_refused(guest_64m):
    guest, memory = guest_64m
    image = make_elf(ElfSpec(entry=0x7000, segments=[ElfSegment(0x7000, TEXT)]))
    with pytest.raises(BootError, match="overlap"):
        prepare_linux(memory, guest, image, "")


def test_truncated_and_corrupt_elf_headers():
    good = vmlinux()
    with pytest.raises(BootError, match="truncated"):
        parse_elf(good[:40])
    with pytest.raises(BootError, match="truncated"):
        parse_elf(good[:100])  # program headers cut
    with pytest.raises(BootError, match="truncated"):
        parse_elf(good[:0x200])  # segment data cut
    bad = bytearray(good)
    struct.pack_into("<Q", bad, 64 + 32, 0x100000)  # p_filesz of segment 0 beyond p_memsz
    with pytest.raises(BootError):
        parse_elf(bytes(bad))
    no_loads = make_elf(ElfSpec(entry=0, segments=[ElfSegment(0x100000, b"x", type=6)]))
    with pytest.raises(BootError, match="no loadable"):
        parse_elf(no_loads)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (make_bzimage(), "bzimage"),
        (vmlinux(), "elf64"),
        (
            make_elf(
                ElfSpec(
                    entry=0x100000,
                    segments=[ElfSegment(0x100000, TEXT)],
                    elf_class=1,
                    machine=3,
                    prefix=multiboot_header(),
                )
            ),
            "multiboot",
        ),
    ],
)
def test_detect_kernel_format(data, expected):
    assert detect_kernel_format(data) == expected


@pytest.mark.parametrize("data", [b"", b"hello world" * 100, bytes(10000), b"\x7fELF" + bytes(60)])
def test_not_a_kernel(data):
    with pytest.raises(BootError, match="kernel"):
        detect_kernel_format(data, "disk.img")


def test_not_a_kernel_message_names_the_expected_formats(guest_64m):
    guest, memory = guest_64m
    with pytest.raises(BootError) as error:
        prepare_kernel(memory, guest, b"#!/bin/sh\necho hi\n" * 30, "", name="run.sh")
    assert str(error.value) == (
        "run.sh is not a kernel pyhv can boot (expected a bzImage, an ELF vmlinux or a multiboot ELF)"
    )


def test_elf32_linux_is_refused(guest_64m):
    guest, memory = guest_64m
    image = make_elf(ElfSpec(entry=0x100000, segments=[ElfSegment(0x100000, TEXT)], elf_class=1, machine=3))
    with pytest.raises(BootError, match="another machine or class"):
        prepare_kernel(memory, guest, image, "")
