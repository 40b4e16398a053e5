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
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from hypervisor.block import extents
from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.header import Qcow2Header, parse_header
from hypervisor.block.qcow2.refcount import refcount_typecode

# The header cluster can be up to 2 MiB (the largest cluster size); read that much at most.
MAX_HEADER_READ = 1 << fmt.MAX_CLUSTER_BITS
SNAPSHOT_TABLE_MAX_BYTES = 64 << 20  # QEMU QCOW_MAX_SNAPSHOTS_SIZE
BITMAP_DIRECTORY_MAX_BYTES = 64 << 20  # QEMU QCOW2_MAX_BITMAP_DIRECTORY_SIZE
BITMAP_MAX_DATA_BYTES = 512 << 20  # QEMU qcow2-bitmap.c BME_MAX_PHYS_SIZE: the clusters a table maps


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

    def is_hole(self, offset: int, length: int) -> bool:
        """True if [offset, offset+length) holds no data (lseek(2) SEEK_DATA), so a table there
        reads as zeros without reading it: a hostile image can put 32 MiB tables in a hole."""
        return extents.is_hole(self.fd, offset, length)

    def read_words(self, offset: int, count: int) -> tuple[int, ...]:
        """`count` big-endian 64-bit words at `offset`; () if they are all zero."""
        if not count or self.is_hole(offset, count * 8):
            return ()
        raw = self.pread(count * 8, offset)
        if raw.count(0) == len(raw):
            return ()
        return struct.unpack(f">{count}Q", raw)


def read_image_file(fd: int, path: str) -> ImageFile:
    """Parse and validate the header of the qcow2 file open on `fd` (ImageError subclasses)."""
    file_size = os.fstat(fd).st_size
    buf = os.pread(fd, min(MAX_HEADER_READ, file_size), 0)
    header = parse_header(buf, file_size, path)
    return ImageFile(fd, path, header, file_size)


# qcow2.rst "Snapshot table" fixed part: l1_table_offset, l1_size, id_str_size, name_size,
# date_sec, date_nsec, vm_clock_nsec, vm_state_size, extra_data_size.
_SNAPSHOT_FIXED = struct.Struct(">QIHHIIQII")


def _snapshot_fixed(table: bytes, position: int) -> tuple[int, int, int, int, int]:
    """(L1 offset, L1 size, id size, name size, extra data size) of the entry at `position`."""
    fields = _SNAPSHOT_FIXED.unpack_from(table, position)
    return fields[0], fields[1], fields[2], fields[3], fields[8]


@dataclass
class CopiedFlagEntry:
    """An active L1 or standard L2 entry whose COPIED bit must say "refcount == 1" (qcow2.rst)."""

    file_offset: int  # where the entry lives, for the repair
    entry: int
    is_l1: bool
    l1_index: int
    cluster_index: int  # the host cluster whose stored refcount decides the flag


@dataclass
class FragmentationStats:
    """qemu-img check's BlockFragInfo, counted over the active L1 table only."""

    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0


class ExpectedCounts:
    """Expected refcounts, kept sparse: one array per refcount block's span that is referenced.

    A span is the `per_block` clusters one refcount block describes, so the comparison with the
    stored refcounts is one array against one decoded block. A file with a 1 TiB hole costs
    nothing here: only spans that something points into exist (QEMU keeps one uint16 per file
    cluster instead, which is cheap in C but not in Python).
    """

    def __init__(self, per_block: int, refcount_bits: int) -> None:
        self.per_block = per_block
        self.typecode = refcount_typecode(refcount_bits)
        self.maximum = (1 << refcount_bits) - 1
        self.itemsize = array(self.typecode).itemsize
        self.spans: dict[int, array[int]] = {}
        self.end = 0  # one past the highest cluster with a reference

    def span(self, block_index: int) -> array[int] | None:
        return self.spans.get(block_index)

    def get(self, cluster_index: int) -> int:
        span = self.spans.get(cluster_index // self.per_block)
        return span[cluster_index % self.per_block] if span is not None else 0

    def add(self, cluster_index: int, weight: int = 1) -> bool:
        """`weight` more references; False if the refcount width cannot hold them (the count
        then stays at the width's maximum)."""
        block_index, slot = divmod(cluster_index, self.per_block)
        span = self.spans.get(block_index)
        if span is None:
            span = self.spans[block_index] = array(self.typecode, bytes(self.per_block * self.itemsize))
        fits = span[slot] + weight <= self.maximum
        span[slot] = span[slot] + weight if fits else self.maximum
        if cluster_index >= self.end:
            self.end = cluster_index + 1
        return fits

    def items(self) -> Iterator[tuple[int, int]]:
        """(cluster index, expected refcount) of every referenced cluster, in order."""
        for block_index in sorted(self.spans):
            base = block_index * self.per_block
            span = self.spans[block_index]
            for slot, value in enumerate(span):
                if value:
                    yield base + slot, value


class ReferenceCounter:
    """Expected refcount of every host cluster, plus corruptions met while walking.

    Cost follows the metadata, not the file: tables are read once each, references go into
    `ExpectedCounts`, and nothing is kept per cluster of the file (qemu's qcow2-refcount.c
    check_refcounts_l1/l2 walk the same structures).
    """

    def __init__(self, image: ImageFile, messages: list[str]) -> None:
        self.image = image
        self.messages = messages
        header = image.header
        self.counts = ExpectedCounts(image.cluster_size * 8 // header.refcount_bits, header.refcount_bits)
        self.corruptions = 0
        self.check_errors = 0
        self.stats = FragmentationStats()
        self._next_contiguous = 0
        # How many times the table being walked is named. Tables named repeatedly (one L2 table
        # in a million L1 entries, one L1 table in every snapshot) are walked once with a weight,
        # so a hostile image cannot multiply the work; QEMU walks them each time.
        self._weight = 1

    @property
    def size(self) -> int:
        """One past the highest referenced cluster."""
        return self.counts.end

    def get(self, index: int) -> int:
        return self.counts.get(index)

    def corrupt(self, message: str) -> None:
        """One corruption, or `self._weight` of them when a table named that many times is
        walked once (the line is printed once)."""
        self.messages.append(message)
        self.corruptions += self._weight

    def add_range(self, offset: int, length: int) -> None:
        """`self._weight` more references to every host cluster touched by [offset, offset+length)."""
        if length <= 0:
            return
        bits = self.image.cluster_bits
        first, last = offset >> bits, (offset + length - 1) >> bits
        for index in range(first, last + 1):
            if not self.counts.add(index, self._weight):
                # QEMU's inc_refcounts words: the count no longer fits the refcount width.
                self.corrupt(f"ERROR: overflow cluster offset=0x{index << bits:x}")

    def _table_ok(self, what: str, offset: int, length: int) -> bool:
        """A table must be cluster aligned, not in the header cluster, and inside the file."""
        if offset & (self.image.cluster_size - 1):
            self.corrupt(f"ERROR {what} offset=0x{offset:x}: not cluster aligned")
            return False
        if offset == 0 or offset + length > self.image.file_size:
            self.corrupt(f"ERROR {what} offset=0x{offset:x}: outside the image (size {self.image.file_size})")
            return False
        return True

    def _inside_file(self, offset: int, length: int) -> bool:
        """QEMU accepts a region that ends less than one cluster past the end of the file (the
        last cluster of a file need not be complete); anything further is a corruption."""
        if offset + length - self.image.file_size >= self.image.cluster_size:
            self.corrupt(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                f"offset 0x{offset:x} size 0x{length:x}"
            )
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
            if entry & fmt.REFT_RESERVED_MASK:
                continue  # reported by the RefcountReader; QEMU does not count such a block either
            if block and not (block & (cs - 1)) and block + cs <= self.image.file_size:
                self.add_range(block, cs)
            # Unaligned or out-of-file blocks are reported by the RefcountReader.

    def _read_l1(self, l1_offset: int, l1_size: int) -> tuple[int, ...]:
        return self.image.read_words(l1_offset, l1_size)

    def _l2_offset(self, index: int, entry: int, report: bool) -> int:
        """The L2 table an L1 entry names, 0 if none or not followable (qcow2.rst "L1 table entry")."""
        l2_offset = entry & fmt.L1E_OFFSET_MASK
        if report and entry & fmt.L1E_RESERVED_MASK:
            # QEMU reports it and still follows the offset bits; so do we (the reader refuses it).
            self.corrupt(f"ERROR found L1 entry with reserved bits set: {entry:x}")
        if not l2_offset:
            return 0
        if l2_offset & (self.image.cluster_size - 1):
            if report:
                self.corrupt(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
            return 0
        return l2_offset

    def _count_l1(self, l1_offset: int, l1_size: int, active: bool, what: str = "L1 table", weight: int = 1) -> None:
        if l1_size == 0:
            return
        self._weight = weight
        if not self._table_ok(what, l1_offset, l1_size * 8):
            return
        self.add_range(l1_offset, l1_size * 8)
        tables: Counter[int] = Counter()
        first_index: dict[int, int] = {}
        for index, entry in enumerate(self._read_l1(l1_offset, l1_size)):
            if not entry:
                continue
            l2_offset = self._l2_offset(index, entry, report=True)
            if not l2_offset:
                continue
            tables[l2_offset] += 1
            first_index.setdefault(l2_offset, index)
        for l2_offset, count in tables.items():
            self._weight = weight * count
            index = first_index[l2_offset]
            if not self._inside_file(l2_offset, self.image.cluster_size):
                continue
            # Stricter than QEMU, which reads a table cut short by the end of the file as zeros:
            # the engine refuses such an image, so the checker reports it.
            if not self._table_ok(f"L2 table (L1 index {index})", l2_offset, self.image.cluster_size):
                continue
            self.add_range(l2_offset, self.image.cluster_size)
            self._count_l2(l2_offset, active)
        self._weight = 1

    def _read_l2(self, l2_offset: int) -> tuple[int, ...]:
        return self.image.read_words(l2_offset, self.image.cluster_size // 8)

    def _count_l2(self, l2_offset: int, active: bool) -> None:
        header = self.image.header
        cs = self.image.cluster_size
        words = self._read_l2(l2_offset)
        external_data = bool(header.incompatible_features & fmt.INCOMPAT_DATA_FILE)
        step = header.l2_entry_size // 8
        # Extended L2 entries keep zero flags in the bitmap, so bit 0 is reserved too (qcow2.rst
        # "Extended L2 Entries"); QEMU does not check it there: pyhv is stricter.
        reserved = fmt.L2E_STD_RESERVED_MASK | (fmt.OFLAG_ZERO if step == 2 else 0)
        self._next_contiguous = 0  # QEMU measures fragmentation within each L2 table
        weight = self._weight
        for index in range(0, len(words), step):
            entry = words[index]
            bitmap = words[index + 1] if step == 2 else 0
            if not entry and not bitmap:
                continue
            if entry & fmt.OFLAG_COMPRESSED:
                self._count_compressed(entry, bitmap, active)
                continue
            if entry & reserved:
                self.corrupt(f"ERROR found l2 entry with reserved bits set: {entry:x}")
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
                self.corrupt(f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.")
                continue
            if active:
                self.stats.allocated_clusters += weight
                if self._next_contiguous and offset != self._next_contiguous:
                    self.stats.fragmented_clusters += weight
                self._next_contiguous = offset + cs
            if external_data:
                continue  # the data cluster lives in the external data file, not refcounted here
            if not self._inside_file(offset, cs):
                continue
            self.add_range(offset, cs)

    def _count_compressed(self, entry: int, bitmap: int, active: bool) -> None:
        host_offset, length = fmt.compressed_span(entry, self.image.cluster_bits)
        if entry & fmt.OFLAG_COPIED:
            self.corrupt(f"ERROR: coffset=0x{host_offset:x}: copied flag must never be set for compressed clusters")
        if bitmap:
            self.corrupt(f"ERROR compressed cluster with a subcluster bitmap: l2_bitmap={bitmap:x}")
        if self.image.header.incompatible_features & fmt.INCOMPAT_DATA_FILE:
            self.corrupt("ERROR compressed cluster in an image with an external data file")
            return
        if active:  # QEMU counts these before checking where the data is
            self.stats.allocated_clusters += self._weight
            self.stats.compressed_clusters += self._weight
            # QEMU counts compressed clusters as fragmented by nature (sector-granular re-reads).
            self.stats.fragmented_clusters += self._weight
        # QEMU counts the whole 512-byte sectors the descriptor names (qcow2.rst "Compressed
        # Clusters Descriptor") and accepts them ending less than a cluster past the end of the file.
        first_sector = host_offset & ~(fmt.COMPRESSED_SECTOR_SIZE - 1)
        span = host_offset + length - first_sector
        if host_offset < self.image.cluster_size or (
            host_offset >= self.image.file_size and first_sector + span - self.image.file_size < self.image.cluster_size
        ):
            # Stricter than QEMU: data in the header cluster, or starting past the end of the
            # file, cannot be a compressed cluster (the reader refuses both too).
            self.corrupt(f"ERROR compressed cluster at 0x{host_offset:x} is outside the image")
            return
        if not self._inside_file(first_sector, span):
            return
        self.add_range(first_sector, span)

    def _count_snapshots(self) -> None:
        header = self.image.header
        if not header.nb_snapshots:
            return
        offset = header.snapshots_offset
        if not self._table_ok("snapshot table", offset, fmt.SNAPSHOT_ENTRY_FIXED):
            return
        table_start = entry_end = offset
        # One read of at most QEMU's table limit (plus one fixed part, to report the entry that
        # crosses it); 65536 small reads, or construct's parser, take a minute on a full table.
        table = self.image.pread(
            min(SNAPSHOT_TABLE_MAX_BYTES + fmt.SNAPSHOT_ENTRY_FIXED, self.image.file_size - table_start), table_start
        )
        l1_tables: dict[tuple[int, int], list[int]] = {}  # (offset, size) -> snapshot numbers
        for number in range(header.nb_snapshots):
            position = offset - table_start
            if position + fmt.SNAPSHOT_ENTRY_FIXED > len(table):
                self.corrupt(f"ERROR snapshot table runs past the end of the image (entry {number})")
                break
            l1_offset, l1_size, id_size, name_size, extra_size = _snapshot_fixed(table, position)
            entry_end = offset + fmt.SNAPSHOT_ENTRY_FIXED + extra_size + id_size + name_size
            offset = fmt.align_up(entry_end, 8)  # QEMU does not write the last entry's padding
            if entry_end - table_start > SNAPSHOT_TABLE_MAX_BYTES or entry_end > self.image.file_size:
                self.corrupt(f"ERROR snapshot table runs past the end of the image (entry {number})")
                break
            if l1_size * 8 > fmt.MAX_L1_BYTES:
                self.corrupt(f"ERROR snapshot {number}: L1 table too large ({l1_size} entries)")
                continue
            l1_tables.setdefault((l1_offset, l1_size), []).append(number)
        for (l1_offset, l1_size), numbers in l1_tables.items():
            what = f"snapshot {numbers[0]} L1 table"
            self._count_l1(l1_offset, l1_size, active=False, what=what, weight=len(numbers))
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
            if entry.bitmap_table_size * self.image.cluster_size > BITMAP_MAX_DATA_BYTES:
                self.corrupt(f"ERROR bitmap table too large ({entry.bitmap_table_size} entries)")
                continue
            if not self._table_ok("bitmap table", entry.bitmap_table_offset, table_bytes):
                continue
            self.add_range(entry.bitmap_table_offset, table_bytes)
            table = self.image.pread(table_bytes, entry.bitmap_table_offset)
            for word in struct.unpack(f">{entry.bitmap_table_size}Q", table):
                data_offset = word & fmt.BITMAP_TABLE_OFFSET_MASK
                # qcow2.rst "Bitmap table": bits 1-8 and 56-63 reserved; bit 0 only means
                # "all ones" when there is no offset.
                if word & fmt.BITMAP_TABLE_RESERVED_MASK or (data_offset and word & 1):
                    self.corrupt(f"ERROR bitmap table entry with reserved bits set: {word:x}")
                    continue
                if data_offset and self._table_ok("bitmap data cluster", data_offset, self.image.cluster_size):
                    self.add_range(data_offset, self.image.cluster_size)

    def copied_flag_entries(self) -> Iterator[tuple[CopiedFlagEntry, int]]:
        """(entry, weight): active L1 and standard L2 entries with the host cluster whose refcount
        decides COPIED; `weight` is how many L1 entries name the L2 table the entry is in.

        A second walk of the active L1 (as QEMU's check_oflag_copied does) rather than a list kept
        from the first one, so memory stays independent of the number of allocated clusters; each
        distinct L2 table is read once. Entries pointing past the end of the file are included:
        their refcount reads as 0, and QEMU reports the COPIED mismatch too.
        """
        header = self.image.header
        cs = self.image.cluster_size
        bits = self.image.cluster_bits
        if not header.l1_size or header.incompatible_features & fmt.INCOMPAT_DATA_FILE:
            return
        tables: Counter[int] = Counter()
        first_index: dict[int, int] = {}
        for l1_index, l1_entry in enumerate(self._read_l1(header.l1_table_offset, header.l1_size)):
            l2_offset = self._l2_offset(l1_index, l1_entry, report=False) if l1_entry else 0
            if not l2_offset:
                continue
            yield CopiedFlagEntry(header.l1_table_offset + l1_index * 8, l1_entry, True, l1_index, l2_offset >> bits), 1
            tables[l2_offset] += 1
            first_index.setdefault(l2_offset, l1_index)
        step = header.l2_entry_size // 8
        for l2_offset, weight in tables.items():
            if l2_offset + cs > self.image.file_size:
                continue
            words = self._read_l2(l2_offset)
            for index in range(0, len(words), step):
                entry = words[index]
                if entry & fmt.OFLAG_COMPRESSED or (entry & fmt.OFLAG_ZERO and header.version < 3):
                    continue
                offset = entry & fmt.L2E_OFFSET_MASK
                if not offset or offset & (cs - 1):
                    continue
                item = CopiedFlagEntry(l2_offset + index * 8, entry, False, first_index[l2_offset], offset >> bits)
                yield item, weight
