"""The lzop container around LZO1X blocks, as Linux's `lzop -9` writes a bzImage's LZO payload.

Linux unpacks it with lib/decompress_unlzo.c; the layout is lzop 1.04's (src/lzop.c `x_header`,
`lzo_decompress`), all numbers big-endian:

    magic (9) | version u16 | lib_version u16 | [version_needed u16 if version >= 0x0940]
    | method u8 | [level u8 if version >= 0x0940] | flags u32 | [filter u32 if F_H_FILTER]
    | mode u32 | mtime_low u32 | [mtime_high u32 if version >= 0x0940] | name_len u8 | name
    | header checksum u32 (adler32, or crc32 with F_H_CRC32) | [extra field if F_H_EXTRA_FIELD]
    then blocks: dst_len u32 (0 ends the stream) | src_len u32 | [adler32 of the data, F_ADLER32_D]
    | [crc32 of the data, F_CRC32_D] | [adler32 / crc32 of the compressed bytes, F_ADLER32_C /
    F_CRC32_C, only when src_len < dst_len] | src_len bytes (stored as they are when
    src_len == dst_len, else one LZO1X stream)

The LZO1X streams are decoded by `lzokay` (a maintained, memory-safe Rust LZO1X decoder with
wheels for every platform, so no C library or compiler is needed); everything around them is
parsed here with every length checked against the input and the output bound.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"
# lzop conf.h header flags.
F_ADLER32_D = 0x0001
F_ADLER32_C = 0x0002
F_H_EXTRA_FIELD = 0x0040
F_CRC32_D = 0x0100
F_CRC32_C = 0x0200
F_H_FILTER = 0x0800
F_H_CRC32 = 0x1000
F_MULTIPART = 0x0400
VERSION_WITH_LEVEL = 0x0940  # lzop 0.94 added version_needed, level and mtime_high
# lzop methods M_LZO1X_1, M_LZO1X_1_15 and M_LZO1X_999: all three are LZO1X streams.
LZO1X_METHODS = (1, 2, 3)
# lzop's MAX_BLOCK_SIZE (64 MiB); Linux's own decoder accepts only its 256 KiB default.
MAX_BLOCK_SIZE = 64 * 1024 * 1024


class LzopError(Exception):
    """The stream is not a well-formed lzop file; the message says why (one line)."""


class LzopTruncated(LzopError):
    pass


class BlockOverrun(LzopError):
    """Raised by the LZO1X block decoder when a block needs more room than it was given."""

    def __init__(self) -> None:
        super().__init__("an LZO1X block unpacks to more than its declared size")


class _Reader:
    """Big-endian reads from `data` that raise LzopTruncated instead of running off its end."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        self.position = 0

    def take(self, count: int) -> memoryview:
        end = self.position + count
        if end > len(self.data):
            raise LzopTruncated("truncated")
        chunk = self.data[self.position : end]
        self.position = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])


def _checksum(kind: str, data: bytes | memoryview) -> int:
    return zlib.crc32(data) if kind == "crc32" else zlib.adler32(data)


def _read_header(reader: _Reader) -> int:
    """Checks the file header (and its checksum); returns the flags."""
    if bytes(reader.take(len(LZOP_MAGIC))) != LZOP_MAGIC:
        raise LzopError("no lzop magic")
    start = reader.position
    version = reader.u16()
    reader.u16()  # lib_version
    if version >= VERSION_WITH_LEVEL:
        reader.u16()  # version_needed_to_extract
    method = reader.u8()
    if version >= VERSION_WITH_LEVEL:
        reader.u8()  # level
    flags = reader.u32()
    if flags & F_H_FILTER:
        raise LzopError("uses an lzop filter, which Linux does not support")
    if flags & F_MULTIPART:
        raise LzopError("is a multi-part lzop file")
    if method not in LZO1X_METHODS:
        raise LzopError(f"uses lzop method {method}, not LZO1X")
    reader.take(8)  # mode, mtime_low
    if version >= VERSION_WITH_LEVEL:
        reader.take(4)  # mtime_high
    reader.take(reader.u8())  # the file name
    kind = "crc32" if flags & F_H_CRC32 else "adler32"
    expected = _checksum(kind, reader.data[start : reader.position])
    if reader.u32() != expected:
        raise LzopError("header checksum mismatch")
    if flags & F_H_EXTRA_FIELD:
        extra_start = reader.position
        reader.take(reader.u32())
        if reader.u32() != _checksum(kind, reader.data[extra_start : reader.position - 4]):
            raise LzopError("extra field checksum mismatch")
    return flags


def _read_checks(reader: _Reader, flags: int, adler_flag: int, crc_flag: int) -> dict[str, int]:
    """The checksums a block carries for these flags, in lzop's order: adler32, then crc32."""
    return {kind: reader.u32() for kind, flag in (("adler32", adler_flag), ("crc32", crc_flag)) if flags & flag}


def _verify(checks: dict[str, int], data: bytes | memoryview, what: str) -> None:
    for kind, expected in checks.items():
        if expected != _checksum(kind, data):
            raise LzopError(f"{kind} mismatch in the {what}")


def lzop_decompress(data: bytes | memoryview, limit: int, lzo1x: Callable[[bytes | memoryview, int], bytes]) -> bytes:
    """The content of the lzop file `data` (at most `limit` bytes; bytes after its end marker are
    ignored).

    `lzo1x(block, size)` decodes one LZO1X block into a buffer of `size` bytes and returns the
    whole buffer; it raises BlockOverrun when the block needs more room, LzopError when it is
    corrupt. A block that ends early may come back zero-padded (lzokay does that), so a block is
    proved to need its full size by its checksum, or, in a file without data checksums, by a
    second decode one byte short that must overrun (Linux compares the decoded length).
    """
    reader = _Reader(data)
    flags = _read_header(reader)
    blocks: list[bytes | memoryview] = []
    produced = 0
    while True:
        dst_len = reader.u32()
        if dst_len == 0:
            break
        if dst_len > MAX_BLOCK_SIZE:
            raise LzopError(f"a block of {dst_len} bytes is larger than lzop's 64 MiB maximum")
        src_len = reader.u32()
        if src_len == 0 or src_len > dst_len:
            raise LzopError(f"a block of {src_len} bytes claims to unpack to {dst_len}")
        if produced + dst_len > limit:
            raise LzopError(f"unpacks to more than {limit} bytes")
        data_checks = _read_checks(reader, flags, F_ADLER32_D, F_CRC32_D)
        stored = src_len == dst_len  # lzop keeps a block that does not shrink as it is
        packed_checks = {} if stored else _read_checks(reader, flags, F_ADLER32_C, F_CRC32_C)
        block = reader.take(src_len)
        _verify(packed_checks, block, "compressed block")
        content = block if stored else lzo1x(block, dst_len)
        if not stored and not data_checks:
            try:
                lzo1x(block, dst_len - 1)
            except BlockOverrun:
                pass
            else:
                raise LzopError(f"a block unpacks to fewer than the {dst_len} bytes it declares")
        _verify(data_checks, content, "unpacked block")
        blocks.append(content)
        produced += dst_len
    return b"".join(blocks)
