"""Compressed clusters: raw deflate and zstd (qcow2.rst "compression_type", "Compressed Clusters").

Deflate clusters are raw deflate streams with a 4 KiB window and no zlib header (QEMU
block/qcow2-threads.c: window bits -12). zstd clusters are one zstd frame; the data read from the
image may run past the frame into the next cluster's bytes, so decompression stops at the frame's
end or when a whole cluster has been produced ("decompression stops when it has produced a
cluster of data").
"""

from __future__ import annotations

import zlib

from hypervisor.block.qcow2 import format as fmt
from hypervisor.errors import ImageCorruptError, ImageFormatError

DEFLATE_WINDOW_BITS = -12  # QEMU qcow2-threads.c qcow2_zlib_compress/decompress

try:  # the `zstandard` pip package (Python 3.14 has compression.zstd; older ones need the package)
    import zstandard as _zstd
except ImportError:  # pragma: no cover - depends on the host
    # "the zstandard module or None" has no spelling as an annotation (a module's type is not a
    # class), and ModuleType would drop the package's own types from every use below.
    _zstd = None  # type: ignore[assignment]


def zstd_available() -> bool:
    return _zstd is not None


def require_codec(compression_type: int, path: str) -> None:
    """ImageFormatError at open if the image's compression needs a missing library."""
    if compression_type == fmt.COMPRESSION_ZSTD and _zstd is None:
        raise ImageFormatError(f"{path}: zstd-compressed image, but the Python 'zstandard' package is not installed")


def decompress(data: bytes, cluster_size: int, compression_type: int, path: str) -> bytes:
    """One cluster of data from its compressed bytes; ImageCorruptError if they are not valid."""
    try:
        if compression_type == fmt.COMPRESSION_DEFLATE:
            out = zlib.decompressobj(DEFLATE_WINDOW_BITS).decompress(data, cluster_size)
        elif compression_type == fmt.COMPRESSION_ZSTD:
            require_codec(compression_type, path)
            out = _zstd.ZstdDecompressor().decompressobj().decompress(data)[:cluster_size]
        else:
            raise ImageFormatError(f"{path}: unknown compression type {compression_type}")
    except (zlib.error, getattr(_zstd, "ZstdError", zlib.error)) as exc:
        raise ImageCorruptError(f"{path}: compressed cluster cannot be decompressed: {exc}") from None
    if len(out) != cluster_size:
        raise ImageCorruptError(f"{path}: compressed cluster decompresses to {len(out)} bytes, not {cluster_size}")
    return out


def compress(data: bytes, compression_type: int) -> bytes:
    """Compressed form of one cluster (the caller stores it uncompressed if this is not smaller)."""
    if compression_type == fmt.COMPRESSION_DEFLATE:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, DEFLATE_WINDOW_BITS)
        return compressor.compress(data) + compressor.flush()
    if compression_type == fmt.COMPRESSION_ZSTD:
        if _zstd is None:
            raise ImageFormatError("zstd compression needs the Python 'zstandard' package")
        return _zstd.ZstdCompressor().compress(data)
    raise ImageFormatError(f"unknown compression type {compression_type}")
