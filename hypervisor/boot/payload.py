"""Unpacking a bzImage's compressed kernel on the host, so the guest skips its own decompressor.

A bzImage (boot protocol 2.08+) carries the kernel as an ELF vmlinux compressed with one of the
kernel's codecs; `payload_offset`/`payload_length` in the setup header locate it inside the
protected-mode code (boot.rst "payload_offset"). Linux's build appends the uncompressed size as
a 4-byte little-endian number (scripts/Makefile.lib `size_append`). On a kvm_pvm host every
guest instruction of the decompressor is emulated (PLATFORM.md: tens of seconds for LZ4,
minutes for XZ); on the host it takes well under a second.

Codecs: gzip, bzip2, lzma and xz through the standard library, LZ4 (the legacy frame `lz4 -l`
writes, which Linux uses) through the small decoder below. zstd and LZO payloads are left to the
guest's decompressor (the caller then boots the bzImage itself).
"""

from __future__ import annotations

import bz2
import logging
import lzma
import struct
import zlib
from collections.abc import Callable
from typing import Protocol

from hypervisor.errors import BootError

log = logging.getLogger(__name__)

# Magic numbers at the start of each compressed stream (the formats' own specifications; the
# same table is in Linux lib/decompress.c `compressed_formats`).
GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"
LZMA_ALONE_MAGIC = b"\x5d\x00\x00"
XZ_MAGIC = b"\xfd7zXZ\x00"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"  # 0x184C2102 little-endian, lz4 frame spec "Legacy frame"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LZO_MAGIC = b"\x89LZO"
LZ4_MIN_MATCH = 4  # LZ4 block format: match length field + 4


class _Truncated(Exception):
    pass


class _Decompressor(Protocol):
    eof: bool

    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


def _stream(decompressor: _Decompressor, data: bytes, limit: int) -> bytes:
    """Run a stdlib decompressor over one stream; trailing bytes (the size) are ignored."""
    output = decompressor.decompress(data, limit + 1)
    if len(output) > limit:
        raise BootError(f"the kernel payload decompresses to more than {limit >> 20} MiB")
    if not decompressor.eof:
        raise _Truncated
    return output


def _extended_length(source: bytes | memoryview, position: int, length: int) -> tuple[int, int]:
    """A 4-bit length of 15 continues in the next bytes, each added, until one is not 255
    (lz4 block format, "Token" and "Match length"). Returns the length and the new position."""
    while True:
        extra = source[position]
        position += 1
        length += extra
        if extra != 255:
            return length, position


def lz4_block(source: bytes | memoryview, output: bytearray, limit: int) -> None:
    """Decode one LZ4 block (lz4 block format: token, literals, offset, match) onto `output`."""
    position, end = 0, len(source)
    while position < end:
        token = source[position]
        position += 1
        literal_length = token >> 4
        if literal_length == 15:
            literal_length, position = _extended_length(source, position, literal_length)
        output += source[position : position + literal_length]
        position += literal_length
        if position >= end:  # the last sequence has literals only
            break
        offset = source[position] | source[position + 1] << 8
        position += 2
        match_length = token & 15
        if match_length == 15:
            match_length, position = _extended_length(source, position, match_length)
        match_length += LZ4_MIN_MATCH
        start = len(output) - offset
        if offset == 0 or start < 0:
            raise BootError("the kernel's LZ4 payload is corrupt (match offset out of range)")
        if offset >= match_length:
            output += output[start : start + match_length]
        else:  # overlapping match: the last `offset` bytes repeat
            pattern = bytes(output[start:])
            output += (pattern * (match_length // offset + 1))[:match_length]
        if len(output) > limit:
            raise BootError(f"the kernel payload decompresses to more than {limit >> 20} MiB")


def lz4_legacy(data: bytes, limit: int) -> bytes:
    """Decode an LZ4 legacy frame: the magic, then blocks each prefixed by its u32 size."""
    output = bytearray()
    position = len(LZ4_LEGACY_MAGIC)
    view = memoryview(data)
    while position + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, position)
        position += 4
        if bytes(view[position - 4 : position]) == LZ4_LEGACY_MAGIC:
            continue  # concatenated frames
        if position + size > len(data):
            if position == len(data):  # the 4-byte size Linux appends ends the stream
                break
            raise BootError("the kernel's LZ4 payload is truncated")
        try:
            lz4_block(view[position : position + size], output, limit)
        except IndexError as error:
            raise BootError("the kernel's LZ4 payload is corrupt (block overruns)") from error
        position += size
    return bytes(output)


# gzip: zlib with a gzip header (wbits 16 + 15, zlib manual "deflateInit2").
CODECS: dict[str, tuple[bytes, Callable[[bytes, int], bytes]]] = {
    "gzip": (GZIP_MAGIC, lambda data, limit: _stream(zlib.decompressobj(16 + zlib.MAX_WBITS), data, limit)),
    "bzip2": (BZIP2_MAGIC, lambda data, limit: _stream(bz2.BZ2Decompressor(), data, limit)),
    "lzma": (LZMA_ALONE_MAGIC,
             lambda data, limit: _stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), data, limit)),
    "xz": (XZ_MAGIC, lambda data, limit: _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), data, limit)),
    "lz4": (LZ4_LEGACY_MAGIC, lz4_legacy),
}
GUEST_ONLY_CODECS = {"zstd": ZSTD_MAGIC, "lzo": LZO_MAGIC}


def payload_codec(payload: bytes) -> str | None:
    for name, (magic, _) in CODECS.items():
        if payload.startswith(magic):
            return name
    for name, magic in GUEST_ONLY_CODECS.items():
        if payload.startswith(magic):
            return name
    return None


def unpack_payload(payload: bytes, limit: int) -> tuple[str, bytes] | None:
    """(codec, decompressed kernel) or None when pyhv cannot unpack this codec on the host."""
    codec = payload_codec(payload)
    if codec is None or codec not in CODECS:
        log.info("bzImage payload codec %s: left to the guest's decompressor", codec or "unknown")
        return None
    try:
        content = CODECS[codec][1](payload, limit)
    except _Truncated:
        raise BootError(f"the kernel's {codec} payload is truncated") from None
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as error:
        raise BootError(f"the kernel's {codec} payload cannot be decompressed: {error}") from error
    return codec, content
