"""Build a new image file under a temporary name and rename it into place when it is complete.

Why: `qemu-img create` and `convert` write the header first and the tables after it; a crash in
between leaves a header that points past the end of the file, and a crash during a convert
leaves half an image under the target's name. Here the new file is written as
`.pyhv-<purpose>-<target>.<random>` in the target's folder (same file system, so rename(2) is
atomic), synced, renamed over the target, and the folder is synced. A crash leaves the old target
untouched and at most a temporary, which the next run for the same target removes.

Temporaries are only removed when they match pyhv's own pattern for that target, are regular
files, and nobody holds them: the builder keeps a BSD flock(2) on its temporary for the whole
build (independent of the QEMU-style OFD locks that opening the image takes), and QEMU's image
locks are checked as well.

In place instead (qemu-img's behaviour, without the crash safety): a target that is not a regular
file (a block device: refused later by the creators, which need a regular file), a regular file
with several hard links (a rename would split them), or a writable file in a folder where no new
file can be made. A symlinked target is followed: the new image replaces the file it points to.
The replacement keeps the old file's permission bits, and its owner and group where the caller
may set them (extended attributes and ACLs are not copied).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from hypervisor.block.locking import lock_image
from hypervisor.errors import ImageError, ImageLockedError

log = logging.getLogger(__name__)

STAGING_MARK = ".pyhv-"
# A target name longer than this is shortened to a digest in the temporary's name (NAME_MAX 255).
_MAX_TAG = 100
_DEFAULT_MODE = 0o644


@dataclass
class Stage:
    """Where to build: `path` is the temporary, or the target itself when `in_place`."""

    target: str
    path: str
    in_place: bool
    fd: int = -1  # the temporary, flocked while it is being built

    def commit(self, durable: bool = True) -> None:
        """Make the built file durable and give it the target's name (the commit point).

        With `durable` false (`convert -t unsafe`, qemu-img's default for convert) nothing is
        synced: the rename is still atomic for other processes, but after a host crash the target
        may hold the new name with data that never reached the disk, as with qemu-img."""
        if self.in_place:
            return
        try:
            if durable:
                os.fsync(self.fd)
            os.replace(self.path, self.target)
            if durable:
                _sync_folder(os.path.dirname(self.target))
        except OSError as error:
            raise ImageError(f"Could not replace '{self.target}': {error.strerror}") from error
        self.path = self.target
        self.in_place = True  # nothing left to remove


def staging_prefix(target: str, purpose: str) -> str:
    name = os.path.basename(target)
    if len(name.encode()) > _MAX_TAG or not name:
        name = hashlib.sha256(name.encode()).hexdigest()[:32]
    return f"{STAGING_MARK}{purpose}-{name}."


@contextlib.contextmanager
def staged(target: str, purpose: str, legacy: re.Pattern[str] | None = None) -> Iterator[Stage]:
    """A Stage for writing a new `target`; call `commit()` on it when the file is complete.
    On an error the temporary is removed. `legacy` matches older temporary names to clean too."""
    real = os.path.realpath(target)  # through symlinks: the link keeps pointing at the image
    folder = os.path.dirname(real)
    try:
        info: os.stat_result | None = os.stat(real)
    except FileNotFoundError:
        info = None
    except OSError as error:
        raise ImageError(f"Could not create '{target}': {error.strerror}") from error
    if info is not None and (not stat.S_ISREG(info.st_mode) or info.st_nlink > 1):
        log.info("%s: written in place (not a regular file with one name)", target)
        yield Stage(target=real, path=real, in_place=True)
        return
    guard = _lock_existing(real, target) if info is not None else -1
    stage = None
    try:
        remove_stale(folder, staging_prefix(real, purpose), legacy)
        try:
            stage = _new_temporary(real, purpose, info)
        except PermissionError:
            if info is None or not os.access(real, os.W_OK):
                raise ImageError(f"Could not create '{target}': Permission denied") from None
            # A writable file in a folder we may not add to: qemu-img overwrites it in place.
            log.warning("%s: folder not writable, so the image is written in place", target)
            os.close(guard)  # the in-place writer takes the target's lock itself
            guard = -1
            yield Stage(target=real, path=real, in_place=True)
            return
        yield stage
    finally:
        try:
            if stage is not None and not stage.in_place:
                with contextlib.suppress(OSError):
                    os.unlink(stage.path)
        finally:
            if stage is not None:
                os.close(stage.fd)
            if guard >= 0:
                os.close(guard)


def _lock_existing(real: str, target: str) -> int:
    """Hold the existing target the way a writer would, so one in use is refused and kept."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise ImageError(f"Could not create '{target}': {error.strerror}") from error
    try:
        lock_image(fd, target, writable=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _new_temporary(real: str, purpose: str, info: os.stat_result | None) -> Stage:
    folder = os.path.dirname(real)
    while True:
        try:
            fd, path = tempfile.mkstemp(prefix=staging_prefix(real, purpose), dir=folder)
        except PermissionError:
            raise
        except OSError as error:
            raise ImageError(f"Could not create '{real}': {error.strerror}") from error
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False  # a concurrent cleanup took it before the flock: make another
        if same:
            break
        os.close(fd)
    try:
        os.fchmod(fd, stat.S_IMODE(info.st_mode) if info is not None else _DEFAULT_MODE & ~_umask())
        if info is not None and (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
            with contextlib.suppress(PermissionError):  # keep the owner where we may (root, own groups)
                os.fchown(fd, info.st_uid if os.geteuid() == 0 else -1, info.st_gid)
    except OSError as error:
        os.close(fd)
        os.unlink(path)
        raise ImageError(f"Could not create '{real}': {error.strerror}") from error
    return Stage(target=real, path=path, in_place=False, fd=fd)


def remove_stale(folder: str, prefix: str, legacy: re.Pattern[str] | None = None) -> list[str]:
    """Remove temporaries pyhv left for one target after a crash; returns the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if name.startswith(prefix) or (legacy is not None and legacy.fullmatch(name)):
            path = os.path.join(folder, name)
            if _remove_if_unused(path):
                log.warning("removed %s, left by an interrupted pyhv run", path)
                removed.append(name)
    return removed


def _remove_if_unused(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock_image(fd, path, writable=True)
        except (OSError, ImageLockedError):
            log.info("%s is in use; left alone", path)
            return False
        if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            return False
        os.unlink(path)
        return True
    except OSError as error:
        if error.errno != errno.ENOENT:
            log.warning("could not remove %s: %s", path, error.strerror)
        return False
    finally:
        os.close(fd)


def _sync_folder(folder: str) -> None:
    fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
