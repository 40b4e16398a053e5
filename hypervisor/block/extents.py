"""Data and holes of a host file: the one SEEK_DATA/SEEK_HOLE walker.

lseek(2): SEEK_DATA from `pos` returns the next offset holding data, or fails with ENXIO when only
a hole remains up to the end of the file; SEEK_HOLE returns the next hole, and the end of the file
counts as one. A file system that cannot tell (EINVAL, or an old kernel) is treated as all data,
which is always correct, only slower to copy or map.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


def file_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_data) runs covering [start, end) of the file open on `fd`, in order,
    alternating, none empty. Bytes past the file's end are a hole (they read as zeros)."""
    position = start
    while position < end:
        try:
            data_start = os.lseek(fd, position, SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # only a hole (or the file's end) remains
                yield position, end - position, False
            else:  # the file system cannot tell: all data
                yield position, end - position, True
            return
        data_start = min(data_start, end)
        if data_start > position:
            yield position, data_start - position, False
            position = data_start
            if position >= end:
                return
        try:
            hole_start = os.lseek(fd, position, SEEK_HOLE)
        except OSError:
            hole_start = end
        stop = min(max(hole_start, position + 1), end)
        yield position, stop - position, True
        position = stop


def data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data runs in [start, end) of the file open on `fd`."""
    for offset, length, is_data in file_extents(fd, start, end):
        if is_data:
            yield offset, length


def is_hole(fd: int, offset: int, length: int) -> bool:
    """True if [offset, offset+length) of the file holds no data, so it reads as zeros unread;
    False also when the file system cannot tell."""
    try:
        data_start = os.lseek(fd, offset, SEEK_DATA)
    except OSError as error:
        return error.errno == errno.ENXIO
    return data_start >= offset + length
