"""Vectored positional I/O on file descriptors, shared by the raw and qcow2 backends.

`os.preadv`/`os.pwritev` move data straight between the file and the caller's memoryviews (often
guest memory), so no request is copied in Python. Linux caps one call at IOV_MAX (1024) buffers and
about 2 GiB (MAX_RW_COUNT, fs/read_write.c), and may return short counts, so both helpers loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from collections.abc import Sequence

log = logging.getLogger(__name__)

# IOV_MAX from <limits.h> on Linux.
IOV_MAX = 1024

# fallocate(2) modes, <linux/falloc.h>.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_CHUNK = bytes(1 << 20)


def _advance(buffers: list[memoryview], done: int) -> list[memoryview]:
    """Drop `done` bytes from the front of a buffer list (after a short transfer)."""
    while buffers and done >= buffers[0].nbytes:
        done -= buffers[0].nbytes
        buffers = buffers[1:]
    if done and buffers:
        buffers = [buffers[0][done:], *buffers[1:]]
    return buffers


def as_byte_views(buffers: Sequence[memoryview | bytes | bytearray]) -> list[memoryview]:
    """Byte-format views of the buffers (slicing must count bytes), skipping empty ones."""
    views = []
    for buf in buffers:
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.nbytes:
            views.append(view)
    return views


def preadv_full(fd: int, buffers: Sequence[memoryview], offset: int, zero_fill: bool = True) -> int:
    """Read into `buffers` from `offset`; past end of file the rest is zero-filled (if asked).

    Returns the number of bytes that came from the file.
    """
    views = as_byte_views(buffers)
    total = 0
    while views:
        batch = views[:IOV_MAX]
        count = os.preadv(fd, batch, offset + total)
        if count == 0:
            if zero_fill:
                for view in views:
                    view[:] = bytes(view.nbytes)
            return total
        total += count
        views = _advance(views, count)
    return total


def pwritev_full(fd: int, buffers: Sequence[memoryview | bytes | bytearray], offset: int) -> int:
    """Write all of `buffers` at `offset`, looping over short writes. Returns the byte count."""
    views = as_byte_views(buffers)
    total = 0
    while views:
        batch = views[:IOV_MAX]
        count = os.pwritev(fd, batch, offset + total)
        if count <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        total += count
        views = _advance(views, count)
    return total


def write_zero_bytes(fd: int, offset: int, length: int) -> None:
    """Write explicit zeros (the fallback when fallocate cannot zero a range)."""
    while length > 0:
        chunk = min(length, len(_ZERO_CHUNK))
        pwritev_full(fd, [memoryview(_ZERO_CHUNK)[:chunk]], offset)
        offset += chunk
        length -= chunk


_libc: ctypes.CDLL | None = None
# sync_file_range(2) flag: start write-back of the dirty pages in the range, do not wait.
SYNC_FILE_RANGE_WRITE = 2


def _libc_functions() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate.restype = ctypes.c_int
        _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _libc.sync_file_range.restype = ctypes.c_int
    return _libc


def _fallocate_fn():  # type: ignore[no-untyped-def]
    return _libc_functions().fallocate


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Asks the kernel to start writing the range to disk now, without waiting (a hint).

    A long copy that ends in fdatasync otherwise leaves all its dirty pages for that one call;
    starting write-back as it goes overlaps the disk with the copy (measured on a 1 GiB copy
    here: 0.85-1.05 s instead of 1.8-2.7 s). Errors are ignored: the final flush still decides.
    """
    _libc_functions().sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with a mode (os.posix_fallocate has none). False if the file system can't."""
    if length <= 0:
        return True
    result = _fallocate_fn()(fd, mode, offset, length)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise OSError(err, os.strerror(err))


def zero_range(fd: int, offset: int, length: int, keep_size: bool = True) -> None:
    """Make [offset, offset+length) read as zeros: ZERO_RANGE, else PUNCH_HOLE, else write zeros."""
    keep = FALLOC_FL_KEEP_SIZE if keep_size else 0
    if fallocate(fd, FALLOC_FL_ZERO_RANGE | keep, offset, length):
        return
    if fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        return
    write_zero_bytes(fd, offset, length)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range (reads as zeros afterwards). False if unsupported; nothing happens then."""
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
