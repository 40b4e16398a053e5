"""Which format a disk image file is in: the one probe shared by open.py and backing-file opening.

Its own module, below both open.py (which opens any format, qcow2 included) and the qcow2 engine
(whose backing files are probed), so neither has to import the other to probe.
"""

from __future__ import annotations

import os

from hypervisor.block.raw import open_image_fd
from hypervisor.errors import ImageError

# qcow2.rst "Header": bytes 0-3 are "QFI\xfb".
QCOW2_MAGIC = b"QFI\xfb"


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
