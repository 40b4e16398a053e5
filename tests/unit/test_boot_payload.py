"""Unpacking a bzImage's compressed vmlinux on the host (boot.rst payload_offset/payload_length)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import subprocess

import pytest

from hypervisor.boot import layout
from hypervisor.boot.linux import prepare_linux
from hypervisor.boot.payload import lz4_block, lz4_legacy, payload_codec, unpack_payload
from hypervisor.boot.zero_page import read_zero_page
from hypervisor.errors import BootError
from tests.unit.test_boot_fixtures import ElfSegment, ElfSpec, MiB, make_bzimage, make_elf, new_guest

TEXT = bytes(range(256)) * 32
VMLINUX = make_elf(ElfSpec(entry=0x1000000, segments=[
    ElfSegment(0x1000000, TEXT, memory_size=len(TEXT) + 0x1000, vaddr=0xFFFFFFFF81000000)]))


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


def test_lz4_literals_only():
    output = bytearray()
    lz4_block(b"\x50hello", output, 100)
    assert output == b"hello"


def test_lz4_overlapping_match_repeats_the_pattern():
    output = bytearray()
    # literals "ab", then a match at offset 2 of length 4 + 4 = 8, then a final empty sequence.
    lz4_block(b"\x24ab\x02\x00\x00", output, 100)
    assert output == b"ab" + b"abababab"


def test_lz4_extended_lengths():
    literals = bytes(range(256)) + bytes(34)  # 290 = 15 + 255 + 20
    block = bytes([0xFF]) + bytes([255, 20]) + literals + b"\x01\x00" + bytes([255, 1]) + b"\x00"
    output = bytearray()
    lz4_block(block, output, 10_000)
    # match length 15 + 255 + 1 + 4 = 275 copies of the last byte (offset 1)
    assert output == literals + literals[-1:] * 275


def test_lz4_bad_offset_is_a_boot_error():
    with pytest.raises(BootError, match="corrupt"):
        lz4_block(b"\x10a\x05\x00", bytearray(), 100)


def test_lz4_output_is_bounded():
    with pytest.raises(BootError, match="more than"):
        lz4_block(b"\x1fa\x01\x00\xff\xff\xff\x00", bytearray(), 100)


@pytest.mark.skipif(shutil.which("lz4") is None, reason="the lz4 tool (Debian package lz4) is not installed")
def test_lz4_legacy_frame_from_the_lz4_tool():
    data = VMLINUX * 3 + bytes(100_000) + bytes(range(256)) * 100
    packed = subprocess.run(["lz4", "-l", "-12", "-c"], input=data, capture_output=True, check=True).stdout
    assert payload_codec(packed) == "lz4"
    assert lz4_legacy(size_appended(packed), 1 << 24) == data


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


def test_codecs_pyhv_cannot_unpack_are_left_to_the_guest(guest_64m):
    guest, memory = guest_64m
    zstd_like = b"\x28\xb5\x2f\xfd" + bytes(100)
    boot = prepare_linux(memory, guest, make_bzimage(payload=zstd_like), "")
    assert boot.source == "bzImage" and boot.entry.rip == 0x1000200


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
    with pytest.raises(BootError, match="truncated"):
        prepare_linux(memory, guest, make_bzimage(payload=gzip.compress(VMLINUX)[:-100]), "")
