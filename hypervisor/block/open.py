"""Open a disk image of any supported format as a BlockBackend: the one entry point for devices."""

from __future__ import annotations

import logging
import os

from hypervisor.block.backend import BlockBackend
from hypervisor.block.raw import RawFile, open_image_fd
from hypervisor.errors import ImageError, ImageFormatError

log = logging.getLogger(__name__)

# qcow2.rst "Header": bytes 0-3 are "QFI\xfb".
QCOW2_MAGIC = b"QFI\xfb"

FORMATS = ("raw", "qcow2")


def probe_format(path: str) -> str:
    """'qcow2' if the file starts with the qcow2 magic, else 'raw'. ImageError if unreadable.

    Opened like any image (open_image_fd: regular files and block devices only, checked before
    the open), so probing a FIFO fails at once instead of waiting for a writer.
    """
    fd = open_image_fd(path, read_only=True, lock=False)
    try:
        magic = os.pread(fd, len(QCOW2_MAGIC), 0)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    return "qcow2" if magic == QCOW2_MAGIC else "raw"


def open_disk(
    path: str, format: str | None = None, read_only: bool = False, allow_backing: bool = True
) -> BlockBackend:
    """Open `path` as a disk. `format` None probes it (qcow2 magic, else raw).

    `allow_backing` lets a qcow2 image open the backing and external data files it names; without
    it, an image that needs one is refused. Errors are one-line ImageError subclasses.
    """
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, not a disk image")
    detected = probe_format(path)
    fmt = format or detected
    if fmt not in FORMATS:
        raise ImageFormatError(f"{path}: unknown image format {fmt!r} (supported: {', '.join(FORMATS)})")
    if fmt == "qcow2":
        if detected != "qcow2":
            raise ImageFormatError(f"{path}: not a qcow2 image (no QFI\\xfb magic)")
        from hypervisor.block.qcow2 import Qcow2Image

        return Qcow2Image.open(path, read_only=read_only, allow_backing=allow_backing)
    if format is None and detected == "raw":
        log.info("%s: no format given, opening as raw", path)
    return RawFile(path, read_only=read_only)
