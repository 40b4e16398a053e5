"""Image locking compatible with QEMU's (block/file-posix.c, "image locking").

QEMU takes open-file-description (OFD) byte-range locks: byte 100+i (LOCK_BASE_PERM) for each
permission bit i it holds, byte 200+i (LOCK_BASE_SHARED) for each permission it refuses to share,
all as shared (read) locks, and then tests for conflicts: another holder of 200+i for a permission
we want, or of 100+i for a permission we do not share. Using the same bytes means pyhv, qemu-img
and a running QEMU all see each other: a second writer is refused, and so is a reader while a writer
is active (as with qemu-img without -U).

OFD locks belong to the open file description, so they are released when the fd is closed and do
not conflict with the same process's own locks on that fd.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

from hypervisor.errors import ImageLockedError

log = logging.getLogger(__name__)

# <fcntl.h> on Linux (F_OFD_GETLK 36, F_OFD_SETLK 37); Python's fcntl module lacks them before 3.12
# on some builds.
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)

# QEMU block/file-posix.c.
LOCK_BASE_PERM = 100
LOCK_BASE_SHARED = 200

# QEMU include/block/block-common.h BLK_PERM_* bit numbers, with the names QEMU prints.
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = {
    PERM_CONSISTENT_READ: "consistent read",
    PERM_WRITE: "write",
    PERM_WRITE_UNCHANGED: "write unchanged",
    PERM_RESIZE: "resize",
}

# What a read-write and a read-only open hold and refuse to share, as QEMU's qcow2/raw drivers do.
WRITER_PERMS = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE)
READER_PERMS = (PERM_CONSISTENT_READ,)
UNSHARED_PERMS = (PERM_WRITE, PERM_RESIZE)

# struct flock on x86-64 / aarch64 Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (+ padding). l_pid must be 0 for OFD locks.
_FLOCK = struct.Struct("hhqqi4x")


def _flock(lock_type: int, start: int) -> bytes:
    return _FLOCK.pack(lock_type, os.SEEK_SET, start, 1, 0)


def _set_lock(fd: int, start: int) -> bool:
    """Take a shared lock on one byte; False if this file system has no OFD locks."""
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, _flock(fcntl.F_RDLCK, start))
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.ENOLCK):
            return False
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise _LockConflict(start) from exc
        raise
    return True


def _held_by_other(fd: int, start: int) -> bool:
    """True if another open file description holds a lock on the byte (F_OFD_GETLK)."""
    result = fcntl.fcntl(fd, F_OFD_GETLK, _flock(fcntl.F_WRLCK, start))
    lock_type = _FLOCK.unpack(result)[0]
    return lock_type != fcntl.F_UNLCK


class _LockConflict(Exception):
    def __init__(self, byte: int) -> None:
        self.byte = byte


def lock_image(fd: int, path: str, writable: bool) -> None:
    """Take QEMU-compatible locks on `fd`; ImageLockedError if another process conflicts.

    On a file system without OFD locks, logs a warning and goes on unlocked (QEMU does the same
    with locking=auto).
    """
    perms = WRITER_PERMS if writable else READER_PERMS
    try:
        for perm in perms:
            if not _set_lock(fd, LOCK_BASE_PERM + perm):
                log.warning("%s: file system does not support OFD locks; image not locked", path)
                return
        for perm in UNSHARED_PERMS:
            _set_lock(fd, LOCK_BASE_SHARED + perm)
        # Another writer first (byte 101), so the common case gets the plain message.
        for perm in UNSHARED_PERMS:
            if _held_by_other(fd, LOCK_BASE_PERM + perm):
                raise _LockConflict(LOCK_BASE_PERM + perm)
        for perm in perms:
            if _held_by_other(fd, LOCK_BASE_SHARED + perm):
                raise _LockConflict(LOCK_BASE_SHARED + perm)
    except _LockConflict as conflict:
        unlock_image(fd)
        if conflict.byte >= LOCK_BASE_SHARED:
            perm_name = PERM_NAMES.get(conflict.byte - LOCK_BASE_SHARED, "?")
            how = f"open by a reader that does not share the {perm_name} permission"
        elif conflict.byte == LOCK_BASE_PERM + PERM_WRITE:
            how = "locked for writing"
        else:
            how = f"locked for {PERM_NAMES.get(conflict.byte - LOCK_BASE_PERM, '?')}"
        raise ImageLockedError(f"{path} is in use by another process ({how})") from None


def unlock_image(fd: int) -> None:
    """Drop every lock this open file description holds (closing the fd does it too)."""
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
    except OSError:
        pass
