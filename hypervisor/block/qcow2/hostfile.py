"""The image file underneath a qcow2 image: positional I/O, size tracking, and one place to sync.

Every write and every sync of qcow2 metadata and data goes through `HostFile.pwritev` and
`HostFile.sync`, so a test can record the exact write/flush sequence (crash-consistency replay).
`ImageFiles` groups the files one open image uses (itself, its data file, its backing file).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from hypervisor.block import fileio
from hypervisor.block.backend import BlockBackend


class HostFile:
    """An open image file: fd, path and the current end of the file (grows as clusters are written)."""

    def __init__(self, fd: int, path: str, read_only: bool) -> None:
        self.fd = fd
        self.path = path
        self.read_only = read_only
        self.size = os.fstat(fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`; zeros past the end of the file.

        One allocation of `length` (os.pread's own buffer), not a bytearray plus its bytes copy,
        so a large table read costs its size once.
        """
        data = os.pread(self.fd, length, offset)
        while len(data) < length:
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                return data + bytes(length - len(data))
            data += more
        return data

    def preadv(self, offset: int, views: Sequence[memoryview]) -> None:
        fileio.preadv_full(self.fd, views, offset)

    def pwritev(self, offset: int, buffers: Sequence[memoryview | bytes | bytearray]) -> None:
        written = fileio.pwritev_full(self.fd, buffers, offset)
        if offset + written > self.size:
            self.size = offset + written

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.pwritev(offset, [data])

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def refresh_size(self) -> None:
        """Take the file's size again (after another descriptor wrote to it, e.g. a repair)."""
        self.size = os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class ImageFiles:
    """The files one open image reads and writes: the image file itself, the external data file
    (only for an image with one, and only once opened) and the backing file (if named and
    opened). The backing file changes with a rebase (set_backing)."""

    image: HostFile
    data: HostFile | None = None
    backing: BlockBackend | None = None
