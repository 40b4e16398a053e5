"""Raw disk images: the file's bytes are the disk's bytes.

Reads and writes go straight between the file and the caller's buffers with preadv/pwritev.
Discard punches holes and write-zeroes uses fallocate(ZERO_RANGE), each with a fallback, so a
sparse raw image stays sparse.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence

from hypervisor.block import fileio
from hypervisor.block.locking import lock_image
from hypervisor.errors import ImageError

log = logging.getLogger(__name__)


_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISSOCK, "a socket"),
)


def _require_disk_mode(path: str, mode: int) -> None:
    """Images are regular files or block devices; anything else is refused with one line."""
    if stat.S_ISDIR(mode):
        raise ImageError(f"{path}: is a directory, not a disk image")
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    raise ImageError(f"{path}: is {kind}, not a regular file or block device")


def check_disk_path(path: str, must_exist: bool = True) -> None:
    """Refuse, without opening it, a path that is not a regular file or block device.

    os.stat never blocks on a FIFO, where open(2) would wait for a writer (fifo(7)) and every
    read would wait for data: a disk on a FIFO hangs before `--timeout` could apply. A missing
    path is an error only if `must_exist` (an output file that is about to be created is fine).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if not must_exist:
            return
        raise ImageError(f"{path}: no such file") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot open: {exc.strerror}") from None
    _require_disk_mode(path, mode)


def open_image_fd(path: str, read_only: bool, lock: bool = True) -> int:
    """Open an image file with one-line ImageErrors for the usual user mistakes, and lock it.

    The type is checked with os.stat before the open, and the open itself uses O_NONBLOCK, so a
    FIFO put in place between the two cannot block either; fstat then checks the opened file.
    """
    check_disk_path(path)
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not a disk image") from None
    except PermissionError:
        mode = "reading" if read_only else "reading and writing"
        raise ImageError(f"{path}: permission denied (cannot open for {mode})") from None
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise ImageError(f"{path}: on a read-only file system; open it read-only") from None
        raise ImageError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        _require_disk_mode(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)  # O_NONBLOCK was only for the open
        if lock:
            lock_image(fd, path, writable=not read_only)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_size(fd: int) -> int:
    """Size of a regular file or block device in bytes."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


class RawFile:
    """A raw image file as a BlockBackend."""

    def __init__(self, path: str, read_only: bool = False, lock: bool = True) -> None:
        self.path = path
        self._read_only = read_only
        self._fd = open_image_fd(path, read_only, lock)
        self._size = fd_size(self._fd)
        self._is_block_device = stat.S_ISBLK(os.fstat(self._fd).st_mode)

    @classmethod
    def open(cls, path: str, read_only: bool = False, lock: bool = True) -> RawFile:
        return cls(path, read_only=read_only, lock=lock)

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ImageError(f"{self.path}: image is closed")
        return self._fd

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"{self.path}: request [{offset}, +{length}) outside the disk ({self._size} bytes)")

    def _check_writable(self) -> None:
        if self._read_only:
            raise ImageError(f"{self.path}: image is open read-only")

    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = fileio.as_byte_views(buffers)
        self._check_range(offset, sum(v.nbytes for v in views))
        # A file that shrank under us reads as zeros past its end rather than failing.
        fileio.preadv_full(self.fd, views, offset)

    def write(self, offset: int, buffers: Sequence[memoryview | bytes]) -> None:
        self._check_writable()
        views = fileio.as_byte_views(buffers)
        self._check_range(offset, sum(v.nbytes for v in views))
        fileio.pwritev_full(self.fd, views, offset)

    def flush(self) -> None:
        if not self._read_only:
            os.fdatasync(self.fd)

    def start_writeback(self, offset: int, length: int) -> None:
        """Optional BlockBackend hint for bulk copies: begin writing the range out now."""
        if not self._read_only:
            fileio.start_writeback(self.fd, offset, length)

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        if self._is_block_device:
            return  # contents become unspecified: doing nothing is a valid discard
        fileio.punch_hole(self.fd, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        if self._is_block_device:
            fileio.write_zero_bytes(self.fd, offset, length)
        else:
            fileio.zero_range(self.fd, offset, length)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RawFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self._read_only else "rw"
        return f"RawFile({self.path!r}, {self._size} bytes, {mode})"
