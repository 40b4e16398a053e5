"""Unpacking a bzImage's compressed vmlinux on the host (boot.rst payload_offset/payload_length)."""

from __future__ import annotations

import bz2
import gzip
import lzma

import pytest

from hypervisor.boot import layout
from hypervisor.boot.linux import prepare_linux
from hypervisor.boot.payload import payload_codec, unpack_payload
from hypervisor.boot.zero_page import read_zero_page
from hypervisor.errors import BootError
from tests.unit.test_boot_fixtures import ElfSegment, ElfSpec, MiB, make_bzimage, make_elf, new_guest

TEXT = bytes(range(256)) * 32
VMLINUX = make_elf(
    ElfSpec(
        entry=0x1000000,
        segments=[ElfSegment(0x1000000, TEXT, memory_size=len(TEXT) + 0x1000, vaddr=0xFFFFFFFF81000000)],
    )
)


def size_appended(data: bytes) -> bytes:
    """What Linux's size_append adds after the compressed stream: the size, u32 little-endian."""
    return data + len(VMLINUX).to_bytes(4, "little")


COMPRESSORS = {
    "gzip": lambda data: gzip.compress(data),  # gzip carries its own size trailer
    "bzip2": lambda data: size_appended(bz2.compress(data)),
    "lzma": lambda data: size_appended(lzma.compress(data, format=lzma.FORMAT_ALONE)),
    "xz": lambda data: size_appended(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
}


@pytest.fixture
def guest_64m():
    with new_guest(64 * MiB) as pair:
        yield pair


@pytest.mark.parametrize("codec", sorted(COMPRESSORS))
def test_stdlib_codecs(codec):
    packed = COMPRESSORS[codec](VMLINUX)
    assert payload_codec(packed) == codec
    assert unpack_payload(packed, 1 << 24) == (codec, VMLINUX)


@pytest.mark.parametrize("codec", sorted(COMPRESSORS))
def test_bzimage_with_payload_boots_its_vmlinux(guest_64m, codec):
    guest, memory = guest_64m
    image = make_bzimage(payload=COMPRESSORS[codec](VMLINUX), cmdline_size=100)
    boot = prepare_linux(memory, guest, image, "console=ttyS0")
    assert boot.source == f"bzImage ({codec} payload unpacked on the host)"
    assert boot.protocol == "linux-64"
    assert boot.entry.rip == 0x1000000
    assert memory.read(0x1000000, len(TEXT)) == TEXT
    page = read_zero_page(memory, layout.ZERO_PAGE_START)
    assert page.get("cmdline_size") == 100  # the bzImage's own header went into the zero page
    assert page.get("type_of_loader") == 0xFF
    assert page.get("cmd_line_ptr") == layout.CMDLINE_START
    with pytest.raises(BootError, match="limit of 100"):
        prepare_linux(memory, guest, image, "x" * 101)


def test_unpacking_can_be_turned_off(guest_64m):
    guest, memory = guest_64m
    boot = prepare_linux(memory, guest, make_bzimage(payload=gzip.compress(VMLINUX)), "", unpack_bzimage=False)
    assert boot.source == "bzImage" and boot.entry.rip == 0x1000200


def test_unknown_codecs_are_left_to_the_guest(guest_64m):
    guest, memory = guest_64m
    boot = prepare_linux(memory, guest, make_bzimage(payload=b"\x12\x34" + bytes(100)), "")
    assert boot.source == "bzImage" and boot.entry.rip == 0x1000200


def test_payload_that_is_not_an_elf_is_left_to_the_guest(guest_64m):
    guest, memory = guest_64m
    boot = prepare_linux(memory, guest, make_bzimage(payload=gzip.compress(b"not an ELF" * 100)), "")
    assert boot.source == "bzImage" and boot.entry.rip == 0x1000200


def test_init_size_is_checked_when_the_payload_is_unpacked_on_the_host(guest_64m):
    """docs/booting.md: too little memory for the kernel's init_size is refused, whichever path."""
    guest, memory = guest_64m
    for init_size in (0xFFFFFFFF, 64 * MiB):
        image = make_bzimage(payload=gzip.compress(VMLINUX), init_size=init_size)
        with pytest.raises(BootError, match=f"init_size \\({init_size:#x}\\)"):
            prepare_linux(memory, guest, image, "")


def test_32bit_only_bzimage_is_not_unpacked(guest_64m):
    guest, memory = guest_64m
    image = make_bzimage(payload=gzip.compress(VMLINUX), version=0x020B, xloadflags=0)
    assert prepare_linux(memory, guest, image, "").protocol == "linux-32"


def test_corrupt_payload_is_a_boot_error(guest_64m):
    guest, memory = guest_64m
    packed = bytearray(gzip.compress(VMLINUX))
    packed[20:40] = b"\xff" * 20
    with pytest.raises(BootError, match="gzip payload"):
        prepare_linux(memory, guest, make_bzimage(payload=bytes(packed)), "")
    # Cut short, the payload's last 4 bytes are no longer its size; whatever they say, one line.
    with pytest.raises(BootError, match="gzip payload (is truncated|declares)"):
        prepare_linux(memory, guest, make_bzimage(payload=gzip.compress(VMLINUX)[:-100]), "")
