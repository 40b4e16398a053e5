"""The counting half of `pyhv image check`: every reference to every host cluster of a qcow2 file.

Walks the structures qcow2.rst names ("Host cluster management", "Cluster mapping", "Snapshots",
"Bitmaps", "Full disk encryption header pointer") and counts, per host cluster, how many
references it should have. Entries that cannot be followed (unaligned, past the end of the file,
reserved bits, zero flags in a v2 image) are reported as corruptions, in QEMU's words where QEMU
has them, and not followed. Reads only; the header is parsed by the engine's `parse_header`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.header import Qcow2Header, parse_header

# The header cluster can be up to 2 MiB (the largest cluster size); read that much at most.
MAX_HEADER_READ = 1 << fmt.MAX_CLUSTER_BITS
SNAPSHOT_TABLE_MAX_BYTES = 64 << 20  # QEMU QCOW_MAX_SNAPSHOTS_SIZE
BITMAP_DIRECTORY_MAX_BYTES = 64 << 20  # QEMU QCOW2_MAX_BITMAP_DIRECTORY_SIZE


@dataclass
class ImageFile:
    """An open qcow2 file and its parsed header (what the checker and the repair need)."""

    fd: int
    path: str
    header: Qcow2Header
    file_size: int

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    @property
    def cluster_bits(self) -> int:
        return self.header.cluster_bits

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def incompatible_features(self) -> int:
        return self.header.incompatible_features

    @incompatible_features.setter
    def incompatible_features(self, value: int) -> None:
        self.header.incompatible_features = value

    @property
    def refcount_table_offset(self) -> int:
        return self.header.refcount_table_offset

    @refcount_table_offset.setter
    def refcount_table_offset(self, value: int) -> None:
        self.header.refcount_table_offset = value

    @property
    def refcount_table_clusters(self) -> int:
        return self.header.refcount_table_clusters

    @refcount_table_clusters.setter
    def refcount_table_clusters(self, value: int) -> None:
        self.header.refcount_table_clusters = value

    def pread(self, length: int, offset: int) -> bytes:
        """Read exactly `length` bytes; bytes past the end of the file read as zeros."""
        data = os.pread(self.fd, length, offset)
        return data if len(data) == length else data.ljust(length, b"\0")


def read_image_file(fd: int, path: str) -> ImageFile:
    """Parse and validate the header of the qcow2 file open on `fd` (ImageError subclasses)."""
    file_size = os.fstat(fd).st_size
    buf = os.pread(fd, min(MAX_HEADER_READ, file_size), 0)
    header = parse_header(buf, file_size, path)
    return ImageFile(fd, path, header, file_size)


@dataclass
class EntrySlot:
    """Where an active L1 or L2 entry lives in the file (for COPIED flag checks and fixes)."""

    file_offset: int
    is_l1: bool


@dataclass
class FragmentationStats:
    """qemu-img check's BlockFragInfo, counted over the active L1 table only."""

    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0


class ReferenceCounter:
    """Expected refcount of every host cluster, plus corruptions met while walking."""

    def __init__(self, image: ImageFile, messages: list[str]) -> None:
        self.image = image
        self.messages = messages
        self.counts: list[int] = [0] * (-(-image.file_size // image.cluster_size))
        self.corruptions = 0
        self.check_errors = 0
        self.stats = FragmentationStats()
        # (slot, entry, host cluster index whose refcount must be 1 for COPIED) of the active image.
        self._copied_slots: list[tuple[EntrySlot, int, int]] = []
        self._next_contiguous = 0

    @property
    def size(self) -> int:
        return len(self.counts)

    def get(self, index: int) -> int:
        return self.counts[index] if index < len(self.counts) else 0

    def corrupt(self, message: str) -> None:
        self.messages.append(message)
        self.corruptions += 1

    def add_range(self, offset: int, length: int) -> None:
        """One more reference to every host cluster touched by [offset, offset+length)."""
        if length <= 0:
            return
        bits = self.image.cluster_bits
        first, last = offset >> bits, (offset + length - 1) >> bits
        if last >= len(self.counts):
            self.counts.extend([0] * (last + 1 - len(self.counts)))
        for index in range(first, last + 1):
            self.counts[index] += 1

    def _table_ok(self, what: str, offset: int, length: int) -> bool:
        """A table must be cluster aligned, not in the header cluster, and inside the file."""
        if offset & (self.image.cluster_size - 1):
            self.corrupt(f"ERROR {what} offset=0x{offset:x}: not cluster aligned")
            return False
        if offset == 0 or offset + length > self.image.file_size:
            self.corrupt(f"ERROR {what} offset=0x{offset:x}: outside the image (size {self.image.file_size})")
            return False
        return True

    def count_everything(self, include_refcount_structure: bool = True) -> None:
        """Count every reference; without the refcount table and blocks when rebuilding them."""
        header = self.image.header
        cs = self.image.cluster_size
        self.stats.total_clusters = -(-header.size // cs)
        self.add_range(0, cs)  # the header cluster
        self._count_l1(header.l1_table_offset, header.l1_size, active=True)
        if include_refcount_structure:
            self._count_refcount_structure()
        self._count_snapshots()
        self._count_bitmaps()

    def _count_refcount_structure(self) -> None:
        header = self.image.header
        cs = self.image.cluster_size
        table_bytes = header.refcount_table_clusters * cs
        self.add_range(header.refcount_table_offset, table_bytes)
        table = self.image.pread(table_bytes, header.refcount_table_offset)
        for entry in struct.unpack(f">{table_bytes // 8}Q", table):
            block = entry & fmt.REFT_OFFSET_MASK
            if block and not (block & (cs - 1)) and block + cs <= self.image.file_size:
                self.add_range(block, cs)
            # Unaligned or out-of-file blocks are reported by the RefcountReader.

    def _count_l1(self, l1_offset: int, l1_size: int, active: bool, what: str = "L1 table") -> None:
        if l1_size == 0:
            return
        if not self._table_ok(what, l1_offset, l1_size * 8):
            return
        self.add_range(l1_offset, l1_size * 8)
        entries = struct.unpack(f">{l1_size}Q", self.image.pread(l1_size * 8, l1_offset))
        for index, entry in enumerate(entries):
            l2_offset = entry & fmt.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            if not self._table_ok(f"L2 table (L1 index {index})", l2_offset, self.image.cluster_size):
                continue
            self.add_range(l2_offset, self.image.cluster_size)
            if active:
                slot = EntrySlot(l1_offset + index * 8, is_l1=True)
                self._copied_slots.append((slot, entry, l2_offset >> self.image.cluster_bits))
            self._count_l2(l2_offset, active)

    def _count_l2(self, l2_offset: int, active: bool) -> None:
        header = self.image.header
        cs = self.image.cluster_size
        entry_size = header.l2_entry_size
        raw = self.image.pread(cs, l2_offset)
        words = struct.unpack(f">{cs // 8}Q", raw)
        external_data = bool(header.incompatible_features & fmt.INCOMPAT_DATA_FILE)
        step = entry_size // 8
        self._next_contiguous = 0  # QEMU measures fragmentation within each L2 table
        for index in range(0, len(words), step):
            entry = words[index]
            bitmap = words[index + 1] if step == 2 else 0
            if not entry and not bitmap:
                continue
            slot_offset = l2_offset + index * 8
            if entry & fmt.OFLAG_COMPRESSED:
                self._count_compressed(entry, bitmap, active)
                continue
            offset = entry & fmt.L2E_OFFSET_MASK
            if step == 2 and bitmap & fmt.SUBCLUSTER_ALLOC_MASK & (bitmap >> fmt.SUBCLUSTER_ZERO_SHIFT):
                self.corrupt(f"ERROR invalid subcluster bitmap: l2_entry={entry:x} l2_bitmap={bitmap:x}")
            if entry & fmt.OFLAG_ZERO and header.version < 3:
                self.corrupt(f"ERROR zero flag in a version 2 image: l2_entry={entry:x}")
                continue
            if not offset and not (external_data and entry & fmt.OFLAG_COPIED):
                # Offset 0 means unallocated, except in an external data file where 0 is a
                # valid offset and COPIED (always set there) disambiguates (QEMU qcow2.h).
                if step == 2 and bitmap & fmt.SUBCLUSTER_ALLOC_MASK:
                    self.corrupt(f"ERROR unallocated cluster with allocated subclusters: l2_bitmap={bitmap:x}")
                continue
            if offset & (cs - 1):
                self.corrupt(f"ERROR offset={offset:x}: Cluster is not properly aligned; L2 entry corrupted.")
                continue
            if active:
                self.stats.allocated_clusters += 1
                if self._next_contiguous and offset != self._next_contiguous:
                    self.stats.fragmented_clusters += 1
                self._next_contiguous = offset + cs
            if external_data:
                continue  # the data cluster lives in the external data file, not refcounted here
            if offset >= fmt.align_up(self.image.file_size, cs):
                self.corrupt(f"ERROR offset={offset:x}: data cluster is outside the image")
                continue
            self.add_range(offset, cs)
            if active:
                slot = EntrySlot(slot_offset, is_l1=False)
                self._copied_slots.append((slot, entry, offset >> self.image.cluster_bits))

    def _count_compressed(self, entry: int, bitmap: int, active: bool) -> None:
        host_offset, length = fmt.compressed_span(entry, self.image.cluster_bits)
        if entry & fmt.OFLAG_COPIED:
            self.corrupt(f"ERROR: coffset=0x{host_offset:x}: copied flag must never be set for compressed clusters")
        if bitmap:
            self.corrupt(f"ERROR compressed cluster with a subcluster bitmap: l2_bitmap={bitmap:x}")
        if self.image.header.incompatible_features & fmt.INCOMPAT_DATA_FILE:
            self.corrupt("ERROR compressed cluster in an image with an external data file")
            return
        if (
            host_offset < self.image.cluster_size
            or host_offset + length
            > fmt.align_up(self.image.file_size, fmt.COMPRESSED_SECTOR_SIZE) + self.image.cluster_size
        ):
            self.corrupt(f"ERROR compressed cluster at 0x{host_offset:x} is outside the image")
            return
        if active:
            self.stats.allocated_clusters += 1
            self.stats.compressed_clusters += 1
            # QEMU counts compressed clusters as fragmented by nature (sector-granular re-reads).
            self.stats.fragmented_clusters += 1
        self.add_range(host_offset, length)

    def _count_snapshots(self) -> None:
        header = self.image.header
        if not header.nb_snapshots:
            return
        offset = header.snapshots_offset
        if not self._table_ok("snapshot table", offset, fmt.SNAPSHOT_ENTRY_FIXED):
            return
        table_start = entry_end = offset
        for number in range(header.nb_snapshots):
            fixed = fmt.SnapshotEntryFixed.parse(self.image.pread(fmt.SNAPSHOT_ENTRY_FIXED, offset))
            entry_length = fmt.SNAPSHOT_ENTRY_FIXED + fixed.extra_data_size + fixed.id_str_size + fixed.name_size
            entry_end = offset + entry_length  # QEMU does not write the last entry's padding
            offset = fmt.align_up(entry_end, 8)
            if entry_end - table_start > SNAPSHOT_TABLE_MAX_BYTES or entry_end > self.image.file_size:
                self.corrupt(f"ERROR snapshot table runs past the end of the image (entry {number})")
                break
            if fixed.l1_size * 8 > fmt.MAX_L1_BYTES:
                self.corrupt(f"ERROR snapshot {number}: L1 table too large ({fixed.l1_size} entries)")
                continue
            self._count_l1(fixed.l1_table_offset, fixed.l1_size, active=False, what=f"snapshot {number} L1 table")
        self.add_range(table_start, entry_end - table_start)

    def _count_bitmaps(self) -> None:
        """Persistent dirty bitmaps (qcow2.rst "Bitmaps"), valid only with the autoclear bit set."""
        header = self.image.header
        data = header.extension(fmt.EXT_BITMAPS)
        if data is None or not header.autoclear_features & fmt.AUTOCLEAR_BITMAPS:
            return
        if len(data) < fmt.BITMAPS_EXTENSION_SIZE:
            self.corrupt("ERROR bitmaps header extension too short")
            return
        ext = fmt.BitmapsExtension.parse(data[: fmt.BITMAPS_EXTENSION_SIZE])
        size, offset = ext.bitmap_directory_size, ext.bitmap_directory_offset
        if size > BITMAP_DIRECTORY_MAX_BYTES or not self._table_ok("bitmap directory", offset, size):
            return
        self.add_range(offset, size)
        directory = self.image.pread(size, offset)
        position = 0
        for _ in range(ext.nb_bitmaps):
            if position + fmt.BITMAP_DIRECTORY_ENTRY_FIXED > size:
                self.corrupt("ERROR bitmap directory entry runs past the directory")
                return
            entry = fmt.BitmapDirectoryEntry.parse(directory[position : position + fmt.BITMAP_DIRECTORY_ENTRY_FIXED])
            position = fmt.align_up(
                position + fmt.BITMAP_DIRECTORY_ENTRY_FIXED + entry.extra_data_size + entry.name_size, 8
            )
            table_bytes = entry.bitmap_table_size * 8
            if not self._table_ok("bitmap table", entry.bitmap_table_offset, table_bytes):
                continue
            self.add_range(entry.bitmap_table_offset, table_bytes)
            table = self.image.pread(table_bytes, entry.bitmap_table_offset)
            for word in struct.unpack(f">{entry.bitmap_table_size}Q", table):
                data_offset = word & fmt.BITMAP_TABLE_OFFSET_MASK
                if data_offset and self._table_ok("bitmap data cluster", data_offset, self.image.cluster_size):
                    self.add_range(data_offset, self.image.cluster_size)

    def copied_flag_slots(self) -> Iterator[tuple[EntrySlot, int, int]]:
        """Active L1 and standard L2 entries with the host cluster whose refcount decides COPIED."""
        return iter(self._copied_slots)
