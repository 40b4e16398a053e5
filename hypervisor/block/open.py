"""Open a disk image of any supported format as a BlockBackend: the one entry point for devices.

probe_format and QCOW2_MAGIC live in probe.py (the qcow2 engine probes backing files with it) and
are importable from here as before.
"""

from __future__ import annotations

import logging
import os

from hypervisor.block.backend import BlockBackend
from hypervisor.block.probe import QCOW2_MAGIC, probe_format
from hypervisor.block.raw import RawFile
from hypervisor.errors import ImageError, ImageFormatError

__all__ = ["FORMATS", "QCOW2_MAGIC", "open_disk", "probe_format"]

log = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2")


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
