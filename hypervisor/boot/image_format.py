"""Recognising what kind of kernel a file is, and unpacking compressed kernels and initrds.

Compressed files are unpacked on the host because a guest decompressor runs at emulated speed on
kvm_pvm hosts (PLATFORM.md). Only xz is recognised (stdlib `lzma`); decompression is bounded by
the guest RAM size, so a hostile file cannot make the host allocate without limit.
"""

from __future__ import annotations

import lzma
import struct
from typing import Literal

from hypervisor.errors import BootError

KernelFormat = Literal["bzimage", "elf64", "multiboot"]

# xz container magic, xz-file-format-1.1.0 §2.1.1.1 "Header Magic Bytes".
XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"
EI_CLASS = 4
ELFCLASS64 = 2
E_MACHINE_OFFSET = 18
EM_X86_64 = 62
# boot.rst: boot_flag 0xAA55 at 0x1fe and "HdrS" at 0x202 mark a kernel with a setup header.
BZIMAGE_BOOT_FLAG = (0x1FE, b"\x55\xaa")
BZIMAGE_HEADER_MAGIC = (0x202, b"HdrS")
# Multiboot 0.6.96 §3.1.1: the header lies in the first 8192 bytes, 32-bit aligned.
MULTIBOOT_SEARCH_LIMIT = 8192
MULTIBOOT_HEADER_MAGIC = 0x1BADB002

NOT_A_KERNEL = "is not a kernel pyhv can boot (expected a bzImage, an ELF vmlinux or a multiboot ELF)"


def is_xz(data: bytes | memoryview) -> bool:
    return bytes(data[: len(XZ_MAGIC)]) == XZ_MAGIC


def decompress_if_xz(data: bytes, limit: int, what: str) -> bytes:
    """`data` itself, or its xz-decompressed content when it starts with the xz magic.

    `limit` bounds the decompressed size (the guest RAM it must fit in); `what` names the file
    in errors ("kernel", "initrd").
    """
    if not is_xz(data):
        return data
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        content = decompressor.decompress(data, max_length=limit + 1)
    except lzma.LZMAError as error:
        raise BootError(f"the {what} is xz-compressed but cannot be decompressed: {error}") from error
    if len(content) > limit:
        raise BootError(f"the {what} decompresses to more than {limit // (1024 * 1024)} MiB of guest RAM")
    if not decompressor.eof:
        raise BootError(f"the {what} is xz-compressed but truncated")
    return content


def multiboot_header_offset(data: bytes | memoryview) -> int | None:
    """Offset of the first multiboot v1 magic with a valid checksum in the first 8 KiB, 4-byte
    aligned (Multiboot 0.6.96 §3.1.1), or None."""
    end = min(len(data), MULTIBOOT_SEARCH_LIMIT) - 12
    for offset in range(0, end + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, offset)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return offset
    return None


def has_multiboot_header(data: bytes | memoryview) -> bool:
    return multiboot_header_offset(data) is not None


def _is_bzimage(data: bytes | memoryview) -> bool:
    return all(
        bytes(data[offset : offset + len(magic)]) == magic
        for offset, magic in (BZIMAGE_BOOT_FLAG, BZIMAGE_HEADER_MAGIC)
    )


def detect_kernel_format(data: bytes | memoryview, name: str = "the kernel") -> KernelFormat:
    """Which loader takes `data` (already decompressed): "bzimage", "elf64" or "multiboot".

    The multiboot header wins over the ELF class, since a multiboot kernel may be any ELF (or
    none, with the a.out kludge). Raises BootError naming `name` for anything else.
    """
    if _is_bzimage(data):
        return "bzimage"
    if has_multiboot_header(data):
        return "multiboot"
    if bytes(data[:4]) == ELF_MAGIC and len(data) >= 20:
        machine = struct.unpack_from("<H", data, E_MACHINE_OFFSET)[0]
        if data[EI_CLASS] == ELFCLASS64 and machine == EM_X86_64:
            return "elf64"
        raise BootError(
            f"{name} is an ELF file for another machine or class (e_machine {machine}); "
            "pyhv boots x86-64 ELF kernels or multiboot ELFs"
        )
    raise BootError(f"{name} {NOT_A_KERNEL}")
