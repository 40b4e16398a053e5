"""Persistent dirty bitmaps (qcow2.rst "Bitmaps extension", "Bitmap directory", "Bitmap table").

pyhv does not track dirty bitmaps. To keep them valid it does what the spec allows: before the
first write it sets the `in_use` flag of every bitmap ("The bitmap was not saved correctly and may
be inconsistent"), durably, so no stale bitmap is ever taken for a consistent one. Their clusters
stay referenced, so `qemu-img check` finds no leaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.hostfile import HostFile
from hypervisor.block.qcow2.refcount import load_u64_table
from hypervisor.errors import ImageCorruptError


@dataclass
class BitmapEntry:
    directory_position: int  # byte offset of this entry inside the directory
    name: str
    flags: int
    table_offset: int
    table_size: int
    granularity_bits: int


@dataclass
class BitmapDirectory:
    offset: int
    size: int
    entries: list[BitmapEntry]


def load_directory(hf: HostFile, ext_data: bytes, cluster_size: int) -> BitmapDirectory | None:
    if len(ext_data) < fmt.BITMAPS_EXTENSION_SIZE:
        raise ImageCorruptError(f"{hf.path}: bitmaps extension too short")
    ext = fmt.BitmapsExtension.parse(ext_data[: fmt.BITMAPS_EXTENSION_SIZE])
    if ext.nb_bitmaps == 0:
        return None
    if ext.bitmap_directory_offset % cluster_size or ext.bitmap_directory_offset < cluster_size:
        raise ImageCorruptError(f"{hf.path}: bitmap directory offset is invalid")
    if ext.bitmap_directory_size > 64 << 20 or ext.bitmap_directory_offset + ext.bitmap_directory_size > hf.size:
        raise ImageCorruptError(f"{hf.path}: bitmap directory is past the end of the file")
    raw = hf.pread(ext.bitmap_directory_offset, ext.bitmap_directory_size)
    entries = []
    pos = 0
    for _ in range(ext.nb_bitmaps):
        if pos + fmt.BITMAP_DIRECTORY_ENTRY_FIXED > len(raw):
            raise ImageCorruptError(f"{hf.path}: bitmap directory truncated")
        fixed = fmt.BitmapDirectoryEntry.parse(raw[pos : pos + fmt.BITMAP_DIRECTORY_ENTRY_FIXED])
        name_start = pos + fmt.BITMAP_DIRECTORY_ENTRY_FIXED + fixed.extra_data_size
        name_end = name_start + fixed.name_size
        if name_end > len(raw):
            raise ImageCorruptError(f"{hf.path}: bitmap directory truncated")
        entries.append(
            BitmapEntry(
                directory_position=pos,
                name=raw[name_start:name_end].decode("utf-8", "replace"),
                flags=fixed.flags,
                table_offset=fixed.bitmap_table_offset,
                table_size=fixed.bitmap_table_size,
                granularity_bits=fixed.granularity_bits,
            )
        )
        pos = fmt.align_up(name_end, 8)
    return BitmapDirectory(ext.bitmap_directory_offset, ext.bitmap_directory_size, entries)


def mark_all_in_use(hf: HostFile, directory: BitmapDirectory) -> bool:
    """Set in_use on every bitmap in the directory (in place). True if anything changed; caller syncs."""
    changed = False
    for entry in directory.entries:
        if entry.flags & fmt.BITMAP_FLAG_IN_USE:
            continue
        entry.flags |= fmt.BITMAP_FLAG_IN_USE
        flags_offset = directory.offset + entry.directory_position + 12  # "12 - 15: flags"
        hf.pwrite(flags_offset, entry.flags.to_bytes(4, "big"))
        changed = True
    return changed


def referenced_clusters(hf: HostFile, directory: BitmapDirectory, cluster_size: int) -> list[tuple[int, int]]:
    """(host offset, cluster count) of everything the bitmaps use: directory, tables, data."""
    used = [(directory.offset, -(-directory.size // cluster_size))]
    for entry in directory.entries:
        table_bytes = entry.table_size * 8
        if not entry.table_size:
            continue
        used.append((entry.table_offset, -(-table_bytes // cluster_size)))
        for word in load_u64_table(hf.pread(entry.table_offset, table_bytes)):
            data_offset = word & fmt.BITMAP_TABLE_OFFSET_MASK
            if data_offset:
                used.append((data_offset, 1))
    return used
