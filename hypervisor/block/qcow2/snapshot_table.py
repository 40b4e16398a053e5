"""The snapshot table (qcow2.rst "Snapshots"): parse and build its entries, unknown extra data kept."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.types import SnapshotInfo
from hypervisor.errors import ImageCorruptError

# QEMU block/qcow2.h QCOW_MAX_SNAPSHOTS_SIZE: "an average of 1k per snapshot table entry" (64 MiB).
MAX_TABLE_BYTES = 1024 * fmt.MAX_SNAPSHOTS


@dataclass
class SnapshotEntry:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None = None
    icount: int | None = None
    # Extra data beyond the three fields this code knows, preserved verbatim.
    unknown_extra: bytes = b""

    def info(self) -> SnapshotInfo:
        return SnapshotInfo(
            id=self.id,
            name=self.name,
            vm_state_size=self.vm_state_size,
            date_sec=self.date_sec,
            date_nsec=self.date_nsec,
            vm_clock_nsec=self.vm_clock_nsec,
            icount=self.icount,
            disk_size=self.disk_size,
            l1_table_offset=self.l1_table_offset,
            l1_size=self.l1_size,
        )


def parse_snapshot_table(raw: bytes, count: int, cluster_size: int, file_size: int, path: str) -> list[SnapshotEntry]:
    """Parse `count` entries from `raw` (the table's bytes, read from snapshots_offset)."""
    entries: list[SnapshotEntry] = []
    offset = 0
    for index in range(count):
        if offset + fmt.SNAPSHOT_ENTRY_FIXED > len(raw):
            raise ImageCorruptError(_truncated(path, index, len(raw)))
        fixed = fmt.SnapshotEntryFixed.parse(raw[offset : offset + fmt.SNAPSHOT_ENTRY_FIXED])
        if fixed.extra_data_size > fmt.MAX_SNAPSHOT_EXTRA:
            raise ImageCorruptError(f"{path}: snapshot {index} has too much extra data")
        pos = offset + fmt.SNAPSHOT_ENTRY_FIXED
        extra = raw[pos : pos + fixed.extra_data_size]
        pos += fixed.extra_data_size
        end = pos + fixed.id_str_size + fixed.name_size
        if end > len(raw):
            raise ImageCorruptError(_truncated(path, index, len(raw)))
        snap_id = raw[pos : pos + fixed.id_str_size].decode("utf-8", "replace")
        name = raw[pos + fixed.id_str_size : end].decode("utf-8", "replace")
        vm_state_size = fixed.vm_state_size
        disk_size = icount = None
        if len(extra) >= 8:
            vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if len(extra) >= 24:
            value = struct.unpack_from(">Q", extra, 16)[0]
            icount = None if value == 0xFFFF_FFFF_FFFF_FFFF else value
        l1_offset, l1_size = fixed.l1_table_offset, fixed.l1_size
        if l1_offset % cluster_size or (l1_size and l1_offset < cluster_size):
            raise ImageCorruptError(f"{path}: snapshot {snap_id!r} L1 table at 0x{l1_offset:x} is invalid")
        if l1_size * 8 > fmt.MAX_L1_BYTES or l1_offset + l1_size * 8 > file_size:
            raise ImageCorruptError(f"{path}: snapshot {snap_id!r} L1 table is past the end of the file")
        entries.append(
            SnapshotEntry(
                l1_table_offset=l1_offset,
                l1_size=l1_size,
                id=snap_id,
                name=name,
                date_sec=fixed.date_sec,
                date_nsec=fixed.date_nsec,
                vm_clock_nsec=fixed.vm_clock_nsec,
                vm_state_size=vm_state_size,
                disk_size=disk_size,
                icount=icount,
                unknown_extra=bytes(extra[fmt.SNAPSHOT_EXTRA_SIZE :]),
            )
        )
        offset = fmt.align_up(end, 8)
    return entries


def _truncated(path: str, index: int, available: int) -> str:
    if available >= MAX_TABLE_BYTES:
        return f"{path}: snapshot table larger than QEMU's {MAX_TABLE_BYTES >> 20} MiB limit (at entry {index})"
    return f"{path}: snapshot table truncated at entry {index}"


def stored_table_size(raw: bytes, count: int, path: str) -> int:
    """Bytes the first `count` entries take in `raw` as stored (QEMU's snapshots_size): each is
    40 fixed bytes, its extra data, id and name, padded to 8 (qcow2.rst "Snapshot table"). This,
    not the size of a rebuilt table, is what the old table's clusters are: extra data written by
    other versions (16 bytes before QEMU 5.0) differs in length from what build_snapshot_table
    writes."""
    offset = 0
    for index in range(count):
        if offset + fmt.SNAPSHOT_ENTRY_FIXED > len(raw):
            raise ImageCorruptError(f"{path}: snapshot table truncated at entry {index}")
        fixed = fmt.SnapshotEntryFixed.parse(raw[offset : offset + fmt.SNAPSHOT_ENTRY_FIXED])
        end = offset + fmt.SNAPSHOT_ENTRY_FIXED + fixed.extra_data_size + fixed.id_str_size + fixed.name_size
        offset = fmt.align_up(end, 8)
    return min(offset, len(raw)) if count else 0


def table_size_bound(count: int) -> int:
    """Upper bound of a table's size, for reading it: ids and names are at most 64 KiB each, and
    the whole table at most QEMU's QCOW_MAX_SNAPSHOTS_SIZE (qcow2_read_snapshots refuses more),
    so a header claiming 65536 snapshots cannot make an open read gigabytes."""
    return min(MAX_TABLE_BYTES, count * (fmt.SNAPSHOT_ENTRY_FIXED + fmt.MAX_SNAPSHOT_EXTRA + 2 * 65535 + 8))


def build_snapshot_table(entries: list[SnapshotEntry]) -> bytes:
    out = bytearray()
    for entry in entries:
        snap_id = entry.id.encode("utf-8")
        name = entry.name.encode("utf-8")
        icount = 0xFFFF_FFFF_FFFF_FFFF if entry.icount is None else entry.icount
        extra = struct.pack(">QQQ", entry.vm_state_size, entry.disk_size or 0, icount) + entry.unknown_extra
        out += fmt.SnapshotEntryFixed.build(
            dict(
                l1_table_offset=entry.l1_table_offset,
                l1_size=entry.l1_size,
                id_str_size=len(snap_id),
                name_size=len(name),
                date_sec=entry.date_sec,
                date_nsec=entry.date_nsec,
                vm_clock_nsec=entry.vm_clock_nsec,
                vm_state_size=min(entry.vm_state_size, 0xFFFF_FFFF),
                extra_data_size=len(extra),
            )
        )
        out += extra + snap_id + name
        out += bytes(fmt.align_up(len(out), 8) - len(out))
    return bytes(out)
