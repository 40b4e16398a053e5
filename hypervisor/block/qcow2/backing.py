"""Backing files and external data files named inside an image.

A relative name is resolved against the folder of the image that names it (as QEMU does). The
format comes from the backing-format extension, else from probing (qcow2 magic or raw). Loops in
the chain are detected by real path. These files are opened read-only (backing) and only when
the caller allows it: an image must not make pyhv open files the user did not agree to.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from hypervisor.block.backend import BlockBackend
from hypervisor.block.probe import probe_format
from hypervisor.block.qcow2.hostfile import HostFile
from hypervisor.block.raw import RawFile, open_image_fd
from hypervisor.errors import ImageCorruptError, ImageError, ImageFormatError

MAX_CHAIN_DEPTH = 256  # guard against absurd chains; loops are caught by path before this

# Opens a qcow2 backing file read-only, given its path and the chain down to it: Qcow2Image.open,
# handed in by image.py, so that this module (which image.py imports) need not import image.py.
Qcow2Opener = Callable[[str, tuple[str, ...]], BlockBackend]


def resolve_relative(image_path: str, name: str) -> str:
    """The path `name` (stored in `image_path`) refers to."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def open_backing(
    image_path: str, name: str, backing_format: str | None, chain: tuple[str, ...], open_qcow2: Qcow2Opener
) -> BlockBackend:
    """Open the backing file `name` of `image_path` read-only, with its own chain."""
    path = resolve_relative(image_path, name)
    real = os.path.realpath(path)
    if real in chain:
        raise ImageCorruptError(f"{image_path}: backing chain loops back to {path}")
    if len(chain) >= MAX_CHAIN_DEPTH:
        raise ImageFormatError(f"{image_path}: backing chain deeper than {MAX_CHAIN_DEPTH}")
    if not os.path.exists(path):
        raise ImageError(f"{image_path}: backing file {name} not found ({path})")
    fmt = backing_format or probe_format(path)
    try:
        if fmt == "qcow2":
            return open_qcow2(path, (*chain, real))
        if fmt == "raw":
            return RawFile(path, read_only=True)
    except ImageError as exc:
        if str(exc).startswith(path):
            raise
        raise type(exc)(f"{image_path}: backing file: {exc}") from None
    raise ImageFormatError(f"{image_path}: backing file {name} has unsupported format {fmt!r}")


def open_data_file(image_path: str, name: str, read_only: bool) -> HostFile:
    """Open the external data file `name` of `image_path` (locked like the image)."""
    path = resolve_relative(image_path, name)
    if os.path.realpath(path) == os.path.realpath(image_path):
        raise ImageCorruptError(f"{image_path}: the external data file is the image itself")
    try:
        return HostFile(open_image_fd(path, read_only), path, read_only)
    except ImageError as exc:
        raise type(exc)(f"{image_path}: external data file: {exc}") from None
