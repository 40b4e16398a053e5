"""Unpacking a bzImage's compressed kernel on the host, so the guest skips its own decompressor.

A bzImage (boot protocol 2.08+) carries the kernel as an ELF vmlinux compressed with one of the
kernel's codecs; `payload_offset`/`payload_length` in the setup header locate it inside the
protected-mode code (boot.rst "payload_offset"). Linux's build appends the uncompressed size as
a 4-byte little-endian number to every codec's output (scripts/Makefile.lib `size_append`; for
gzip it is the stream's own ISIZE field) and the kernel's decompressor trusts it
(arch/x86/boot/compressed/mkpiggy.c `z_output_len`). pyhv uses it as the exact size the payload
must unpack to, after checking it against guest RAM, so a decompression bomb stops at the
declared size instead of filling the host.

On a kvm_pvm host every guest instruction of the decompressor is emulated (PLATFORM.md: tens of
seconds for LZ4, minutes for XZ); on the host each codec takes a fraction of a second through a
maintained library: zlib, bz2 and lzma from the standard library (gzip, bzip2, legacy lzma, xz),
python-lz4's block API (LZ4 legacy frames, `lz4 -l`), zstandard (zstd), and lzokay (LZO1X inside
an lzop container, see lzop.py). When an optional library is missing the payload is left to the
guest's own decompressor, with a warning that names the package.
"""

from __future__ import annotations

import bz2
import logging
import lzma
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hypervisor.boot.lzop import LZOP_MAGIC, BlockOverrun, LzopError, LzopTruncated, lzop_decompress
from hypervisor.errors import BootError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
SIZE_TRAILER = 4  # scripts/Makefile.lib size_append: the unpacked size, u32 little-endian

# Magic numbers at the start of each compressed stream (the formats' own specifications; the
# same table is in Linux lib/decompress.c `compressed_formats`).
GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"
LZMA_ALONE_MAGIC = b"\x5d\x00\x00"
XZ_MAGIC = b"\xfd7zXZ\x00"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"  # 0x184C2102 little-endian, lz4 frame spec "Legacy frame"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# lz4 frame spec "Legacy frame": every block but the last unpacks to 8 MiB (lib/decompress_unlz4.c
# LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE); a block can be no larger than LZ4_compressBound of that.
LZ4_LEGACY_BLOCK = 8 * MiB
LZ4_MAX_BLOCK = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK // 255 + 16


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    """The stream is malformed; the message says how (one line)."""


class _MissingLibrary(Exception):
    """The optional package that decodes this codec is not installed; the message names it."""


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    def decompress(self, data: memoryview, max_length: int = ..., /) -> bytes: ...


def _stream(decompressor: _Decompressor, data: memoryview, size: int) -> bytes:
    """Run a stdlib decompressor over one stream, asking for one byte more than `size` so that
    a stream longer than declared is seen without unpacking all of it."""
    output = decompressor.decompress(data, size + 1)
    if len(output) > size:
        raise _Corrupt(f"it unpacks to more than the {size} bytes its size trailer declares")
    if not decompressor.eof:  # max_length was not reached, so the input ran out mid-stream
        raise _Truncated
    return output


def _gzip(data: memoryview, size: int) -> bytes:
    # gzip: zlib with a gzip header (wbits 16 + 15, zlib manual "inflateInit2").
    return _stream(zlib.decompressobj(16 + zlib.MAX_WBITS), data, size)


def _bzip2(data: memoryview, size: int) -> bytes:
    return _stream(bz2.BZ2Decompressor(), data, size)


def _lzma(data: memoryview, size: int) -> bytes:
    return _stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), data, size)


def _xz(data: memoryview, size: int) -> bytes:
    return _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), data, size)


def _lz4_legacy(data: memoryview, size: int) -> bytes:
    """An LZ4 legacy frame: the magic, then blocks each prefixed by its u32 LE size; a repeated
    magic starts a concatenated frame (lib/decompress_unlz4.c does the same)."""
    try:
        import lz4.block
    except ImportError:
        raise _MissingLibrary("lz4") from None
    blocks: list[bytes] = []
    produced = 0
    position = len(LZ4_LEGACY_MAGIC)
    while position < len(data):
        if position + 4 > len(data):
            raise _Truncated
        block_size = int.from_bytes(data[position : position + 4], "little")
        position += 4
        if data[position - 4 : position] == LZ4_LEGACY_MAGIC:
            continue
        if block_size > LZ4_MAX_BLOCK:
            raise _Corrupt(f"a block of {block_size} bytes is larger than an 8 MiB block can compress to")
        if position + block_size > len(data):
            raise _Truncated
        room = min(LZ4_LEGACY_BLOCK, size - produced)
        if room == 0:
            raise _Corrupt(f"it has more blocks than its declared {size} bytes need")
        try:
            block = lz4.block.decompress(data[position : position + block_size], uncompressed_size=room)
        except lz4.block.LZ4BlockError:
            raise _Corrupt("an LZ4 block is corrupt or unpacks to more than the declared size") from None
        blocks.append(block)
        produced += len(block)
        position += block_size
    return b"".join(blocks)


def _zstd(data: memoryview, size: int) -> bytes:
    import zstandard  # a core dependency (the qcow2 engine's compression)

    try:
        frame = zstandard.get_frame_parameters(data)
        # A frame that states its size is unpacked into a buffer of that size whatever
        # max_output_size says, so a bomb's stated size is checked first.
        if frame.content_size != zstandard.CONTENTSIZE_UNKNOWN and frame.content_size > size:
            raise _Corrupt(f"its frame declares {frame.content_size} bytes, more than the {size} of its size trailer")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as error:
        raise _Corrupt(f"zstd: {error}") from None


def _lzo1x_block(block: bytes | memoryview, size: int) -> bytes:
    try:
        import lzokay
    except ImportError:
        raise _MissingLibrary("lzokay") from None
    try:
        return bytes(lzokay.decompress(bytes(block), size))
    except lzokay.OutputOverrunError:
        raise BlockOverrun from None
    except lzokay.LzokayError as error:
        raise LzopError(f"an LZO1X block is corrupt ({error})") from None


def _lzo(data: memoryview, size: int) -> bytes:
    try:
        return lzop_decompress(data, size, _lzo1x_block)
    except LzopTruncated:
        raise _Truncated from None
    except LzopError as error:
        raise _Corrupt(f"lzop: {error}") from None


@dataclass(frozen=True)
class Codec:
    name: str
    magic: bytes
    decode: Callable[[memoryview, int], bytes]  # (stream, declared size) -> content
    # gzip's last 4 bytes are its own ISIZE field (RFC 1952 section 2.3), which Linux's build
    # relies on instead of appending one; every other codec's stream ends before the trailer.
    trailer_in_stream: bool = False


CODECS = (
    Codec("gzip", GZIP_MAGIC, _gzip, trailer_in_stream=True),
    Codec("bzip2", BZIP2_MAGIC, _bzip2),
    Codec("lzma", LZMA_ALONE_MAGIC, _lzma),
    Codec("xz", XZ_MAGIC, _xz),
    Codec("lz4", LZ4_LEGACY_MAGIC, _lz4_legacy),
    Codec("zstd", ZSTD_MAGIC, _zstd),
    Codec("lzo", LZOP_MAGIC, _lzo),
)


def _find_codec(payload: bytes | memoryview) -> Codec | None:
    head = bytes(payload[:16])
    return next((codec for codec in CODECS if head.startswith(codec.magic)), None)


def payload_codec(payload: bytes | memoryview) -> str | None:
    codec = _find_codec(payload)
    return codec.name if codec else None


def declared_size(payload: bytes | memoryview) -> int:
    """The unpacked size Linux's build appended to the payload (its last 4 bytes)."""
    (size,) = struct.unpack("<I", payload[-SIZE_TRAILER:])
    return int(size)


def unpack_payload(payload: bytes | memoryview, limit: int) -> tuple[str, bytes] | None:
    """(codec, decompressed kernel), or None when the guest must unpack it (unknown codec, or
    the library for it is not installed). `limit` is the guest RAM the kernel must fit in.
    Raises BootError (one line) for a payload that is truncated, corrupt or too large."""
    codec = _find_codec(payload)
    if codec is None:
        log.info("bzImage payload codec unknown: left to the guest's decompressor")
        return None
    what = f"the kernel's {codec.name} payload"
    if len(payload) <= len(codec.magic) + SIZE_TRAILER:
        raise BootError(f"{what} is truncated ({len(payload)} bytes)")
    size = declared_size(payload)
    if size == 0:
        raise BootError(f"{what} is corrupt: its size trailer says it unpacks to 0 bytes")
    if size > limit:
        raise BootError(f"{what} declares {-(-size // MiB)} MiB unpacked, more than the guest's "
                        f"{limit // MiB} MiB of RAM")  # fmt: skip
    stream = memoryview(payload) if codec.trailer_in_stream else memoryview(payload)[:-SIZE_TRAILER]
    try:
        content = codec.decode(stream, size)
    except _MissingLibrary as missing:
        log.warning("the Python package %s is not installed, so the guest unpacks its own %s kernel "
                    "(slow on a kvm_pvm host): pip install %s", missing, codec.name, missing)  # fmt: skip
        return None
    except _Truncated:
        raise BootError(f"{what} is truncated") from None
    except _Corrupt as error:
        raise BootError(f"{what} is corrupt: {error}") from None
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as error:
        raise BootError(f"{what} cannot be decompressed: {error}") from None
    if len(content) != size:
        raise BootError(f"{what} is corrupt: it unpacks to {len(content)} bytes, its size trailer says {size}")
    return codec.name, content
