"""What `pyhv image info|map|compare|snapshot|resize` do, as functions that return data.

Opening rules (docs/images.md "Safety"): the image the user named is opened with its backing
chain allowed (allow_backing=True), because the user asked for that image; files named inside
an image are only ever opened as part of that chain, never on their own. Read-only commands open
read-only. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from hypervisor.block import extents
from hypervisor.block.backend import BlockBackend
from hypervisor.block.capabilities import AllocationMap, BackingChain
from hypervisor.block.open import open_disk, probe_format
from hypervisor.errors import ConfigError, ImageError

log = logging.getLogger(__name__)

# Bounded work units for whole-disk passes: large enough for few syscalls, small for memory.
COMPARE_CHUNK = 4 << 20
# QEMU's compare reports mismatches at 512-byte sector granularity.
SECTOR_SIZE = 512
# A chain deeper than this is almost surely a loop that path comparison missed.
MAX_CHAIN_DEPTH = 256


def full_backing_filename(image_path: str, backing: str) -> str:
    """QEMU's path_combine: a relative backing name is relative to the overlay's folder."""
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(image_path), backing)


def resolve_format(path: str, image_format: str | None) -> str:
    detected = probe_format(path)
    if image_format is None:
        return detected
    if image_format not in ("raw", "qcow2"):
        raise ConfigError(f"Unknown image format '{image_format}' (qcow2 or raw)")
    if image_format == "qcow2" and detected != "qcow2":
        raise ImageError(f"{path}: not a qcow2 image (no QFI\\xfb magic)")
    return image_format


def open_image(
    path: str,
    image_format: str | None = None,
    read_only: bool = True,
    allow_backing: bool = True,
    snapshot: str | None = None,
) -> BlockBackend:
    """Open the image the user named (its backing chain allowed unless told otherwise)."""
    image_format = resolve_format(path, image_format)
    if snapshot is not None:
        if image_format != "qcow2":
            raise ConfigError(f"{path}: only qcow2 images have internal snapshots")
        from hypervisor.block.qcow2 import Qcow2Image

        return Qcow2Image.open(path, read_only=True, allow_backing=allow_backing, snapshot=snapshot)
    return open_disk(path, format=image_format, read_only=read_only, allow_backing=allow_backing)


@contextlib.contextmanager
def opened(path: str, image_format: str | None = None, **kwargs: Any) -> Iterator[Any]:
    image = open_image(path, image_format, **kwargs)
    try:
        yield image
    finally:
        image.close()


def snapshot_json(snapshot: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if snapshot.icount is not None:
        entry["icount"] = snapshot.icount
    entry.update(
        {
            "vm-clock-nsec": snapshot.vm_clock_nsec % 1_000_000_000,
            "name": snapshot.name,
            "date-sec": snapshot.date_sec,
            "date-nsec": snapshot.date_nsec,
            "vm-clock-sec": snapshot.vm_clock_nsec // 1_000_000_000,
            "id": snapshot.id,
            "vm-state-size": snapshot.vm_state_size,
        }
    )
    return entry


def _bitmaps(image: Any) -> list[dict[str, Any]] | None:
    from hypervisor.block.qcow2 import bitmaps
    from hypervisor.block.qcow2 import format as fmt
    from hypervisor.block.qcow2.hostfile import HostFile

    header = image.header
    data = header.extension(fmt.EXT_BITMAPS)
    if data is None or not header.autoclear_features & fmt.AUTOCLEAR_BITMAPS:
        return None
    fd = os.open(image.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        directory = bitmaps.load_directory(HostFile(fd, image.path, True), data, image.cluster_size)
    finally:
        os.close(fd)
    result = []
    for entry in directory.entries if directory else []:
        flags = [
            name
            for bit, name in ((fmt.BITMAP_FLAG_IN_USE, "in-use"), (fmt.BITMAP_FLAG_AUTO, "auto"))
            if entry.flags & bit
        ]
        result.append({"flags": flags, "name": entry.name, "granularity": 1 << entry.granularity_bits})
    return result


def _qcow2_format_specific(image: Any) -> dict[str, Any]:
    """qemu-img's ImageInfoSpecificQCow2: v2 images carry only compat and refcount width."""
    from hypervisor.block.qcow2 import format as fmt

    header = image.header
    compression = fmt.COMPRESSION_NAMES.get(header.compression_type, str(header.compression_type))
    if header.version < 3:
        return {"compat": "0.10", "compression-type": compression, "refcount-bits": header.refcount_bits}
    data: dict[str, Any] = {
        "compat": "1.1",
        "compression-type": compression,
        "lazy-refcounts": bool(header.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS),
    }
    bitmap_list = _bitmaps(image)
    if bitmap_list is not None:
        data["bitmaps"] = bitmap_list
    data["refcount-bits"] = header.refcount_bits
    if header.incompatible_features & fmt.INCOMPAT_DATA_FILE:
        if header.data_file is not None:
            data["data-file"] = header.data_file
        data["data-file-raw"] = bool(header.autoclear_features & fmt.AUTOCLEAR_DATA_FILE_RAW)
    data["corrupt"] = bool(header.incompatible_features & fmt.INCOMPAT_CORRUPT)
    data["extended-l2"] = header.extended_l2
    return data


def image_info(path: str, image_format: str | None = None) -> dict[str, Any]:
    """One qemu-img ImageInfo object (field names and presence as qemu-img 7.2 prints them)."""
    image_format = resolve_format(path, image_format)
    info: dict[str, Any] = {}
    actual_size = os.stat(path).st_blocks * 512
    if image_format == "raw":
        with opened(path, "raw") as raw:
            size = raw.size
        return {
            "virtual-size": size,
            "filename": path,
            "format": "raw",
            "actual-size": actual_size,
            "dirty-flag": False,
        }
    from hypervisor.block.qcow2 import Qcow2Image

    image = Qcow2Image.open(path, read_only=True, allow_backing=False)
    try:
        snapshots = image.snapshots()
        if snapshots:
            info["snapshots"] = [snapshot_json(s) for s in snapshots]
        backing = image.backing_filename
        if backing is not None and image.backing_format is not None:
            info["backing-filename-format"] = image.backing_format
        info.update(
            {
                "virtual-size": image.size,
                "filename": path,
                "cluster-size": image.cluster_size,
                "format": "qcow2",
                "actual-size": actual_size,
                "format-specific": {"type": "qcow2", "data": _qcow2_format_specific(image)},
            }
        )
        if backing is not None:
            info["full-backing-filename"] = full_backing_filename(path, backing)
            info["backing-filename"] = backing
        info["dirty-flag"] = bool(image.dirty)
    finally:
        image.close()
    return info


def backing_chain_info(path: str, image_format: str | None = None) -> list[dict[str, Any]]:
    """info --backing-chain: the named image, then each backing file it (transitively) names."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: str | None = path
    current_format = image_format
    while current is not None:
        real = os.path.realpath(current)
        if real in seen or len(chain) >= MAX_CHAIN_DEPTH:
            raise ImageError(f"{path}: backing chain loops back to {current}")
        seen.add(real)
        info = image_info(current, current_format)
        chain.append(info)
        current = info.get("full-backing-filename")
        current_format = info.get("backing-filename-format")
    return chain


def _chain_files(path: str, image: Any, holes_visible: list[bool]) -> list[str]:
    """Per layer of an open chain, the file holding its data (the external data file if it has
    one), named as qemu-img map prints it. `holes_visible` gets, per layer, whether QEMU would
    report holes of that file as zeros (not for external data files)."""
    layers = [path]
    files = []
    layer = image
    while True:
        data_file = layer.data_file_name if isinstance(layer, BackingChain) else None
        files.append(full_backing_filename(layers[-1], data_file) if data_file else layers[-1])
        holes_visible.append(not data_file)
        if not isinstance(layer, BackingChain) or layer.backing is None or not layer.backing_filename:
            break
        layers.append(full_backing_filename(layers[-1], layer.backing_filename))
        layer = layer.backing
    return files


def _split_by_holes(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Like QEMU's block status, report stored ranges that are holes in the host file as zero."""
    try:
        fd = os.open(entry["filename"], os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return [entry]
    try:
        pieces = list(extents.file_extents(fd, entry["offset"], entry["offset"] + entry["length"]))
    finally:
        os.close(fd)
    result = []
    for host_offset, length, is_data in pieces:
        piece = dict(entry)
        piece.update(
            start=entry["start"] + host_offset - entry["offset"], length=length, zero=not is_data, offset=host_offset
        )
        piece["offset"] = piece.pop("offset")  # keep qemu-img's key order: offset last
        result.append(piece)
    return result or [entry]


def map_entries(path: str, image_format: str | None = None) -> list[dict[str, Any]]:
    """qemu-img map's entries: start, length, depth, present, zero, data, compressed, offset."""
    entries: list[dict[str, Any]] = []
    with opened(path, image_format) as image:
        holes_visible: list[bool] = []
        files = _chain_files(path, image, holes_visible)
        has_map = isinstance(image, AllocationMap)
        if has_map:
            runs = [
                (e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed, e.host_offset)
                for e in image.map_extents()
            ]
        else:
            runs = [(0, image.size, 0, True, False, True, False, 0)] if image.size else []
        for start, length, depth, present, zero, data, compressed, host_offset in runs:
            entry: dict[str, Any] = {
                "start": start,
                "length": length,
                "depth": depth,
                "present": present,
                "zero": zero,
                "data": data,
                "compressed": compressed,
            }
            entry["filename"] = files[depth] if depth < len(files) else path
            pieces = [entry]
            if data and host_offset is not None and not compressed:
                entry["offset"] = host_offset
                if depth < len(holes_visible) and holes_visible[depth]:
                    pieces = _split_by_holes(entry)
                if not has_map:
                    for piece in pieces:  # a hole in a raw file stores nothing: QEMU says data false
                        piece["data"] = not piece["zero"]
            for piece in pieces:
                if entries and _continues(entries[-1], piece):
                    entries[-1]["length"] += piece["length"]
                else:
                    entries.append(piece)
    return entries


def _continues(previous: dict[str, Any], entry: dict[str, Any]) -> bool:
    keys = ("depth", "present", "zero", "data", "compressed", "filename")
    if any(previous[key] != entry[key] for key in keys) or ("offset" in previous) != ("offset" in entry):
        return False
    if previous["start"] + previous["length"] != entry["start"]:
        return False
    return "offset" not in entry or previous["offset"] + previous["length"] == entry["offset"]


_ZEROS = memoryview(bytes(COMPARE_CHUNK))  # allocated once: fresh zero pages cost a fault each


def _is_zero(view: memoryview) -> bool:
    return view == _ZEROS[: len(view)]


def compare_images(
    path_a: str, path_b: str, format_a: str | None = None, format_b: str | None = None, strict: bool = False
) -> tuple[bool, str]:
    """(identical, message) as qemu-img compare prints it; ImageError if either cannot be read."""
    with opened(path_a, format_a) as a, opened(path_b, format_b) as b:
        common = min(a.size, b.size)
        if strict and a.size != b.size:
            return False, "Strict mode: Image size mismatch!"
        buf_a, buf_b = bytearray(COMPARE_CHUNK), bytearray(COMPARE_CHUNK)
        offset = 0
        while offset < common:
            n = min(COMPARE_CHUNK, common - offset)
            view_a, view_b = memoryview(buf_a)[:n], memoryview(buf_b)[:n]
            a.readinto(offset, [view_a])
            b.readinto(offset, [view_b])
            if view_a != view_b:
                return False, f"Content mismatch at offset {offset + _first_difference(view_a, view_b)}!"
            offset += n
        longer = a if a.size > b.size else b
        while offset < longer.size:
            n = min(COMPARE_CHUNK, longer.size - offset)
            view = memoryview(buf_a)[:n]
            longer.readinto(offset, [view])
            if not _is_zero(view):
                nonzero = next(i for i, byte in enumerate(view) if byte)
                return False, f"Content mismatch at offset {offset + nonzero // SECTOR_SIZE * SECTOR_SIZE}!"
            offset += n
    message = "Images are identical."
    if a.size != b.size:
        message = "Warning: Image size mismatch!\n" + message
    return True, message


def _first_difference(a: memoryview, b: memoryview) -> int:
    """Offset of the first differing 512-byte sector."""
    for start in range(0, len(a), SECTOR_SIZE):
        if a[start : start + SECTOR_SIZE] != b[start : start + SECTOR_SIZE]:
            return start
    return 0


def resize_image(path: str, image_format: str | None, sign: str, amount: int, shrink: bool) -> int:
    """Grow or (with `shrink`) shrink an image; returns the new size. Refuses to drop qcow2 data."""
    image_format = resolve_format(path, image_format)
    with opened(path, image_format, read_only=False, allow_backing=False) as image:
        old = image.size
        new = old + amount if sign == "+" else old - amount if sign == "-" else amount
        if new < 0:
            raise ConfigError(f"New image size {new} is negative")
        if image_format == "qcow2":
            new = (new + SECTOR_SIZE - 1) // SECTOR_SIZE * SECTOR_SIZE
        if new < old and not shrink:
            raise ConfigError("Use the --shrink option to perform a shrink operation.")
        if new < old and image_format == "qcow2":
            for extent in image.map_extents():
                if extent.depth == 0 and extent.data and extent.start + extent.length > new:
                    raise ConfigError(
                        f"{path}: cannot shrink to {new} bytes: data is stored at offset "
                        f"{max(extent.start, new)} (discard it first)"
                    )
        if new == old:
            return new
        if image_format == "raw":
            _resize_raw(path, image, new)
        else:
            image.resize(new)
            image.flush()
    return new


def _resize_raw(path: str, image: Any, new: int) -> None:
    try:
        os.ftruncate(image.fd, new)
    except OSError as error:
        raise ImageError(f"{path}: cannot resize: {error.strerror}") from error
