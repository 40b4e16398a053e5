"""Builders of synthetic kernels for the boot tests (bzImage, ELF, multiboot), written with struct.

No tests here; the test_boot_* files import these. Layouts follow boot.rst, the ELF gABI and
Multiboot 0.6.96 independently of hypervisor.boot, so the tests check the loaders against the
formats rather than against themselves.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from hypervisor.boot.layout import GuestLayout, guest_layout
from hypervisor.memory import GuestMemory

MiB = 1024 * 1024
PAYLOAD_OFFSET = 0x200


@contextmanager
def new_guest(ram_size: int = 64 * MiB) -> Iterator[tuple[GuestLayout, GuestMemory]]:
    """A guest layout and the GuestMemory built from it, closed afterwards."""
    guest = guest_layout(ram_size)
    memory = GuestMemory(list(guest.memory_regions))
    try:
        yield guest, memory
    finally:
        memory.close()


def make_bzimage(
    *,
    version: int = 0x020F,
    setup_sects: int = 4,
    kernel: bytes | None = None,
    xloadflags: int = 0x1,
    loadflags: int = 0x01,
    relocatable: int = 1,
    pref_address: int = 0x1000000,
    init_size: int = 0x800000,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFFFFFF,
    header_end_byte: int = 0x6A,
    syssize: int | None = None,
    payload: bytes | None = None,
) -> bytes:
    """A bzImage: boot sector + setup sectors with a setup header, then the protected-mode code.

    With `payload`, the protected-mode code is 0x200 bytes of "decompressor" followed by the
    payload, which payload_offset/payload_length point at (boot.rst, protocol 2.08).
    """
    kernel = kernel if kernel is not None else bytes(range(256)) * 64
    if payload is not None:
        kernel = b"\x90" * PAYLOAD_OFFSET + payload + bytes(16)
    kernel += bytes(-len(kernel) % 16)  # arch/x86/boot/tools/build.c pads to whole paragraphs
    setup_size = ((setup_sects or 4) + 1) * 512
    image = bytearray(setup_size)
    image[0x1EF] = 0xFF  # a real image has a non-zero sentinel; loaders must not copy it
    fields = [
        (0x1F1, "B", setup_sects),
        (0x1F4, "I", syssize if syssize is not None else -(-len(kernel) // 16)),
        (0x1FE, "H", 0xAA55),
        (0x200, "B", 0xEB),  # jmp short ...
        (0x201, "B", header_end_byte),  # ... to 0x202 + this: the end of the header
        (0x202, "4s", b"HdrS"),
        (0x206, "H", version),
        (0x211, "B", loadflags),
        (0x214, "I", 0x100000),
        (0x22C, "I", initrd_addr_max),
        (0x230, "I", 0x200000),
        (0x234, "B", relocatable),
        (0x236, "H", xloadflags),
        (0x238, "I", cmdline_size),
        (0x248, "I", PAYLOAD_OFFSET if payload is not None else 0),
        (0x24C, "I", len(payload) if payload is not None else 0),
        (0x258, "Q", pref_address),
        (0x260, "I", init_size),
    ]
    for offset, fmt, value in fields:
        struct.pack_into("<" + fmt, image, offset, value)
    return bytes(image) + kernel


@dataclass
class ElfSegment:
    paddr: int
    data: bytes
    memory_size: int = 0  # 0: same as len(data)
    vaddr: int | None = None  # None: same as paddr
    type: int = 1  # PT_LOAD


@dataclass
class ElfSpec:
    entry: int
    segments: Sequence[ElfSegment]
    notes: Sequence[tuple[bytes, int, bytes]] = field(default_factory=list)  # (name, type, desc)
    elf_class: int = 2
    machine: int = 62
    prefix: bytes = b""  # bytes placed right after the headers (e.g. a multiboot header)


def _note_blob(notes: Sequence[tuple[bytes, int, bytes]]) -> bytes:
    blob = b""
    for name, note_type, desc in notes:
        name_z = name + b"\0"
        blob += struct.pack("<III", len(name_z), len(desc), note_type)
        blob += name_z + bytes(-len(name_z) % 4) + desc + bytes(-len(desc) % 4)
    return blob


def make_elf(spec: ElfSpec) -> bytes:
    """An ELF executable with the given PT_LOAD segments and a PT_NOTE for the notes."""
    is64 = spec.elf_class == 2
    header_size, phentsize = (64, 56) if is64 else (52, 32)
    segments = list(spec.segments)
    note_blob = _note_blob(spec.notes)
    phnum = len(segments) + (1 if note_blob else 0)
    offset = header_size + phnum * phentsize
    body = bytearray(spec.prefix)  # file offset of body[i] is offset + i
    program_headers = b""
    for segment in segments:
        vaddr = segment.paddr if segment.vaddr is None else segment.vaddr
        memsz = segment.memory_size or len(segment.data)
        file_offset = offset + len(body)
        if is64:
            program_headers += struct.pack(
                "<IIQQQQQQ", segment.type, 7, file_offset, vaddr, segment.paddr, len(segment.data), memsz, 0x1000
            )
        else:
            program_headers += struct.pack(
                "<IIIIIIII", segment.type, file_offset, vaddr, segment.paddr, len(segment.data), memsz, 7, 0x1000
            )
        body += segment.data
    if note_blob:
        file_offset, size = offset + len(body), len(note_blob)
        if is64:
            program_headers += struct.pack("<IIQQQQQQ", 4, 4, file_offset, 0, 0, size, size, 4)
        else:
            program_headers += struct.pack("<IIIIIIII", 4, file_offset, 0, 0, size, size, 4, 4)
        body += note_blob
    ident = b"\x7fELF" + bytes([spec.elf_class, 1, 1]) + bytes(9)
    if is64:
        header = ident + struct.pack(
            "<HHIQQQIHHHHHH", 2, spec.machine, 1, spec.entry, header_size, 0, 0, header_size, phentsize, phnum, 64, 0, 0
        )
    else:
        header = ident + struct.pack(
            "<HHIIIIIHHHHHH", 2, spec.machine, 1, spec.entry, header_size, 0, 0, header_size, phentsize, phnum, 40, 0, 0
        )
    return header + program_headers + bytes(body)


def multiboot_header(flags: int = 0x3, aout: tuple[int, int, int, int, int] | None = None) -> bytes:
    """A multiboot v1 header (magic, flags, checksum [, a.out kludge addresses])."""
    magic = 0x1BADB002
    if aout is not None:
        flags |= 1 << 16
    header = struct.pack("<III", magic, flags, -(magic + flags) & 0xFFFFFFFF)
    if aout is not None:
        header += struct.pack("<IIIII", *aout)
    return header
