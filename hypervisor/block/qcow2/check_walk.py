"""The counting half of `pyhv image check`: every reference to every host cluster of a qcow2 file.

Walks the structures qcow2.rst names ("Host cluster management", "Cluster mapping", "Snapshots",
"Bitmaps", "Full disk encryption header pointer") and counts, per host cluster, how many
references it should have. Every reserved-bit and alignment rule of qcow2.rst is checked in every
table walked, in the words and with the counting of QEMU's qcow2-refcount.c check_refcounts_l1/l2,
check_refblocks and qcow2_check_read_snapshot_table (docs/robustness.md lists them).

One rule decides what is counted: a cluster is counted wherever qemu-img counts it, even behind an
entry pyhv reports and qemu-img accepts (a v2 zero flag, an unaligned data cluster), so a refcount
repair never frees a cluster qemu-img still sees in use. A table pyhv does not walk although
qemu-img does (an unaligned or cut-short L2 table) is recorded in `unwalked_tables`, and the
checker then lowers no refcount. Reads only; the header is parsed by the engine's `parse_header`.
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
class ZeroFix:
    """A preallocated zero cluster at an unaligned offset, to become a plain zero cluster
    (`check -r all`, QEMU's fix_l2_entry_by_zero)."""

    file_offset: int  # where the L2 entry lives
    entry: int
    bitmap: int
    extended: bool
    weight: int  # how many L1 entries name the L2 table: the corruptions the fix removes

    def replacement(self) -> bytes:
        """The new entry: a plain zero cluster; with extended L2 entries, no host offset and
        every allocated subcluster made a zero one (qcow2.rst "Extended L2 Entries")."""
        if not self.extended:
            return struct.pack(">Q", fmt.OFLAG_ZERO)
        zeros = (self.bitmap | self.bitmap << fmt.SUBCLUSTER_ZERO_SHIFT) & ~fmt.SUBCLUSTER_ALLOC_MASK
        return struct.pack(">QQ", 0, zeros & 0xFFFF_FFFF_FFFF_FFFF)


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

    def __init__(self, image: ImageFile, messages: list[str], repairing: bool = False) -> None:
        self.image = image
        self.messages = messages
        # `check -r all`: entries that can be repaired in place are worded "Repairing" and listed
        # in `zero_fixes`; the checker writes them (this class only reads).
        self.repairing = repairing
        self.zero_fixes: list[ZeroFix] = []
        # L2 tables named but not walked (unaligned): what they reference is unknown, so a repair
        # must not lower any refcount (the clusters they name would look leaked).
        self.unwalked_tables = 0
        # Refcount blocks whose cluster is also used by something else: only a rebuild fixes it.
        self.shared_refcount_blocks = 0
        header = image.header
        self.counts = ExpectedCounts(image.cluster_size * 8 // header.refcount_bits, header.refcount_bits)
        self.corruptions = 0
        self.check_errors = 0
        # The walk stopped where QEMU's check stops altogether (a snapshot table it cannot read):
        # the counts are incomplete, so nothing may be compared or repaired.
        self.aborted = False
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
        self._count_snapshots()
        self._count_bitmaps()
        # Last, as in QEMU's calculate_refcounts: a refcount block must then have exactly one
        # reference, its own, and anything else counted in its cluster shows it is shared.
        if include_refcount_structure:
            self._count_refcount_structure()

    def _count_refcount_structure(self) -> None:
        header = self.image.header
        cs = self.image.cluster_size
        table_bytes = header.refcount_table_clusters * cs
        self.add_range(header.refcount_table_offset, table_bytes)
        table = self.image.pread(table_bytes, header.refcount_table_offset)
        for index, entry in enumerate(struct.unpack(f">{table_bytes // 8}Q", table)):
            block = entry & fmt.REFT_OFFSET_MASK
            if entry & fmt.REFT_RESERVED_MASK:
                continue  # reported by the RefcountReader; QEMU does not count such a block either
            if block and not (block & (cs - 1)) and block + cs <= self.image.file_size:
                self.add_range(block, cs)
                refcount = self.counts.get(block >> self.image.cluster_bits)
                if refcount != 1:
                    # QEMU's check_refblocks: the block's cluster is named by something else too
                    # (data, a table, another refcount table entry); only a rebuild separates them.
                    self.corrupt(f"ERROR refcount block {index} refcount={refcount}")
                    self.shared_refcount_blocks += 1
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
                # Stricter than QEMU, which counts the unaligned range and walks whatever is there
                # (one flipped bit gave 129 errors from data read as entries): reported, not followed.
                self.corrupt(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
                self.unwalked_tables += self._weight
            return 0
        return l2_offset

    def _count_l1(self, l1_offset: int, l1_size: int, active: bool, what: str = "L1 table", weight: int = 1) -> None:
        if l1_size == 0:
            return
        try:
            self._walk_l1(l1_offset, l1_size, active, what, weight)
        finally:
            self._weight = 1

    def _walk_l1(self, l1_offset: int, l1_size: int, active: bool, what: str, weight: int) -> None:
        self._weight = weight
        if not self._table_ok(what, l1_offset, l1_size * 8):
            # QEMU reads what part of the table there is and walks it; the references are unknown.
            self.unwalked_tables += weight
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
                self.unwalked_tables += self._weight
                continue
            self.add_range(l2_offset, self.image.cluster_size)
            self._count_l2(l2_offset, active)

    def _read_l2(self, l2_offset: int) -> tuple[int, ...]:
        return self.image.read_words(l2_offset, self.image.cluster_size // 8)

    def _count_l2(self, l2_offset: int, active: bool) -> None:
        """One L2 table, entry by entry, in the order and words of QEMU's check_refcounts_l2
        (qcow2.rst "Standard Cluster Descriptor", "Extended L2 Entries", "Compressed Clusters
        Descriptor")."""
        header = self.image.header
        words = self._read_l2(l2_offset)
        external_data = bool(header.incompatible_features & fmt.INCOMPAT_DATA_FILE)
        step = header.l2_entry_size // 8
        extended = step == 2
        # Extended L2 entries keep zero flags in the bitmap, so bit 0 is reserved too (qcow2.rst
        # "Extended L2 Entries"); QEMU does not check it there: pyhv is stricter.
        reserved = fmt.L2E_STD_RESERVED_MASK | (fmt.OFLAG_ZERO if extended else 0)
        self._next_contiguous = 0  # QEMU measures fragmentation within each L2 table
        for index in range(0, len(words), step):
            entry = words[index]
            bitmap = words[index + 1] if extended else 0
            if not entry and not bitmap:
                continue
            if entry & fmt.OFLAG_COMPRESSED:
                self._count_compressed(index // step, entry, bitmap, active)
                continue
            if entry & reserved:
                self.corrupt(f"ERROR found l2 entry with reserved bits set: {entry:x}")
            offset = entry & fmt.L2E_OFFSET_MASK
            zero_flag = bool(entry & fmt.OFLAG_ZERO) and not extended
            if zero_flag and header.version < 3:
                # Stricter than QEMU, which reads the flag in any version: qcow2.rst reserves bit 0
                # of a version 2 entry. The entry is then counted as QEMU counts it, so a repair
                # never frees a cluster qemu-img still sees as in use.
                self.corrupt(f"ERROR zero flag in a version 2 image: l2_entry={entry:x}")
            if not offset and not (external_data and entry & fmt.OFLAG_COPIED and not zero_flag):
                # Unallocated, or a plain zero cluster. Offset 0 is a valid offset in an external
                # data file, where COPIED (always set there) disambiguates (QEMU qcow2.h).
                if extended and bitmap & fmt.SUBCLUSTER_ALLOC_MASK:
                    self.corrupt("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                continue
            self._count_allocated(l2_offset + index * 8, entry, bitmap, zero_flag, active)

    def _count_allocated(self, entry_offset: int, entry: int, bitmap: int, zero_flag: bool, active: bool) -> None:
        """A standard cluster with a host offset: data, or preallocated zeros (QEMU's
        QCOW2_CLUSTER_NORMAL and QCOW2_CLUSTER_ZERO_ALLOC)."""
        header = self.image.header
        cs = self.image.cluster_size
        extended = header.l2_entry_size == 16
        offset = entry & fmt.L2E_OFFSET_MASK
        if extended and bitmap & fmt.SUBCLUSTER_ALLOC_MASK & (bitmap >> fmt.SUBCLUSTER_ZERO_SHIFT):
            # A subcluster both allocated and zero (qcow2.rst "Extended L2 Entries").
            self.corrupt(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap")
        if offset & (cs - 1):
            contains_data = bool(bitmap & fmt.SUBCLUSTER_ALLOC_MASK) if extended else not zero_flag
            if contains_data:
                self.corrupt(f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.")
            else:
                # Only zeros to lose: `check -r all` makes it a plain zero cluster (QEMU's
                # fix_l2_entry_by_zero); version 2 has no zero clusters to turn it into.
                fixable = self.repairing and header.version >= 3
                word = "Repairing" if fixable else "ERROR"
                self.corrupt(
                    f"{word} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                )
                if fixable:
                    self.zero_fixes.append(ZeroFix(entry_offset, entry, bitmap, extended, self._weight))
                    return  # like QEMU, a repaired entry is not counted (it names no cluster now)
            # Counted where QEMU counts it (the clusters the unaligned range touches), so that a
            # refcount repair never frees a cluster qemu-img still sees as in use.
        if active:
            self.stats.allocated_clusters += self._weight
            if self._next_contiguous and offset != self._next_contiguous:
                self.stats.fragmented_clusters += self._weight
            self._next_contiguous = offset + cs
        if header.incompatible_features & fmt.INCOMPAT_DATA_FILE:
            return  # the data cluster lives in the external data file, not refcounted here
        if not self._inside_file(offset, cs):
            return
        self.add_range(offset, cs)

    def _count_compressed(self, index: int, entry: int, bitmap: int, active: bool) -> None:
        host_offset, length = fmt.compressed_span(entry, self.image.cluster_bits)
        if entry & fmt.OFLAG_COPIED:
            self.corrupt(f"ERROR: coffset=0x{host_offset:x}: copied flag must never be set for compressed clusters")
            entry &= ~fmt.OFLAG_COPIED
        # QEMU's words and order; the entry is then neither counted nor followed.
        if self.image.header.incompatible_features & fmt.INCOMPAT_DATA_FILE:
            self.corrupt(f"ERROR compressed cluster {index} with data file, entry=0x{entry:x}")
            return
        if bitmap:
            self.corrupt(
                f"ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, entry=0x{entry:x}"
            )
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
            # file, cannot be a compressed cluster (the reader refuses both too). Still counted
            # as QEMU counts it, so that a repair never frees a cluster qemu-img sees in use.
            self.corrupt(f"ERROR compressed cluster at 0x{host_offset:x} is outside the image")
        if not self._inside_file(first_sector, span):
            return
        self.add_range(first_sector, span)

    def _count_snapshots(self) -> None:
        header = self.image.header
        if not header.nb_snapshots:
            return
        if header.incompatible_features & fmt.INCOMPAT_DATA_FILE:
            # qcow2.rst "External data file": snapshots cannot be used with one (QEMU's words).
            self.corrupt(f"ERROR {header.nb_snapshots} snapshots in image with data file")
        offset = header.snapshots_offset
        if not self._table_ok("snapshot table", offset, fmt.SNAPSHOT_ENTRY_FIXED):
            return
        table_start = entry_end = offset
        # One read of at most QEMU's table limit (plus one fixed part, to report the entry that
        # crosses it); 65536 small reads, or construct's parser, take a minute on a full table.
        # QEMU reads past the end of the file as zeros and accepts a table that ends less than a
        # cluster past it (as any region, `_inside_file`); pread pads with zeros the same way.
        cs = self.image.cluster_size
        table = self.image.pread(
            min(SNAPSHOT_TABLE_MAX_BYTES + fmt.SNAPSHOT_ENTRY_FIXED, self.image.file_size + cs - table_start),
            table_start,
        )
        l1_tables: dict[tuple[int, int], list[int]] = {}  # (offset, size) -> snapshot numbers
        for number in range(header.nb_snapshots):
            position = offset - table_start
            if position + fmt.SNAPSHOT_ENTRY_FIXED > len(table):
                self.corrupt(f"ERROR snapshot table runs past the end of the image (entry {number})")
                self.unwalked_tables += 1  # the snapshots after it may name tables still in use
                break
            l1_offset, l1_size, id_size, name_size, extra_size = _snapshot_fixed(table, position)
            if extra_size > fmt.MAX_SNAPSHOT_EXTRA:
                # QEMU cannot read such a table and gives up the whole check (one check error,
                # exit 1); its `-r all` drops the extra data, which pyhv does not do.
                self.check_errors += 1
                self.aborted = True
                self.messages.append(
                    "ERROR failed to read the snapshot table: "
                    f"Too much extra metadata in snapshot table entry {number}"
                )
                return
            entry_end = offset + fmt.SNAPSHOT_ENTRY_FIXED + extra_size + id_size + name_size
            offset = fmt.align_up(entry_end, 8)  # QEMU does not write the last entry's padding
            if entry_end - table_start > SNAPSHOT_TABLE_MAX_BYTES or entry_end - self.image.file_size >= cs:
                self.corrupt(f"ERROR snapshot table runs past the end of the image (entry {number})")
                self.unwalked_tables += 1
                break
            if header.version >= 3 and extra_size < fmt.SNAPSHOT_EXTRA_V3_MIN:
                # qcow2.rst "Snapshot table": v3 entries carry at least vm_state_size_large and
                # disk_size (QEMU's qcow2_check_read_snapshot_table words).
                self.corrupt(f"ERROR snapshot table entry {number} is incomplete")
            names = position + fmt.SNAPSHOT_ENTRY_FIXED + extra_size
            snapshot_id = table[names : names + id_size].decode("utf-8", "replace")
            name = table[names + id_size : names + id_size + name_size].decode("utf-8", "replace")
            if l1_offset & (self.image.cluster_size - 1):
                self.corrupt(
                    f"ERROR snapshot {snapshot_id} ({name}) l1_offset={l1_offset:#x}: "
                    "L1 table is not cluster aligned; snapshot table entry corrupted"
                )
                continue
            if l1_size * 8 > fmt.MAX_L1_BYTES:
                self.corrupt(
                    f"ERROR snapshot {snapshot_id} ({name}) l1_size={l1_size:#x}: "
                    "L1 table is too large; snapshot table entry corrupted"
                )
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
                if entry & fmt.OFLAG_COMPRESSED:
                    continue
                # As QEMU's check_oflag_copied: every entry with a host offset, also a zero flag
                # in a version 2 image or an unaligned offset (the cluster it is counted in).
                offset = entry & fmt.L2E_OFFSET_MASK
                if not offset:
                    continue
                item = CopiedFlagEntry(l2_offset + index * 8, entry, False, first_index[l2_offset], offset >> bits)
                yield item, weight
