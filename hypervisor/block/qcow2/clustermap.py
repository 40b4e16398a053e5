"""The cluster map: the active L1 table, the bounded L2 cache, and entry validation.

qcow2.rst "Cluster mapping": an L1 entry points at an L2 table, an L2 entry at a data cluster (or
says zero, compressed, unallocated). Entries are validated when met: an L1 entry with reserved
bits, an unaligned L2 table or one over other metadata, a data cluster past the end of the file or
inside metadata (the allocator's set) is corruption, raised as ImageCorruptError, never read as
zeros. For writes the map hands out L2 tables the active image owns alone (COPIED, refcount 1),
allocating a new table or copying a shared one first (qcow2.rst: a table is modified in place only
if its refcount is one).

What is dirty here (changed L2 tables, a changed or moved L1 table) is written by the flush order
(flush.py), after the refcounts it depends on.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.allocator import Allocator
from hypervisor.block.qcow2.geometry import Geometry
from hypervisor.block.qcow2.header import Qcow2Header
from hypervisor.block.qcow2.hostfile import HostFile
from hypervisor.block.qcow2.l2cache import L2Cache
from hypervisor.block.qcow2.refcount import dump_u64_table, load_u64_table
from hypervisor.errors import ImageCorruptError, ImageError


def load_l1(hf: HostFile, offset: int, size: int) -> array[int]:
    """An L1 table (`size` entries at `offset`) as a native array."""
    return load_u64_table(hf.pread(offset, size * 8))


class ClusterMap:
    def __init__(
        self,
        hf: HostFile,
        geometry: Geometry,
        allocator: Allocator,
        header: Qcow2Header,
        l1: array[int],
        l1_offset: int,
        tables_wanted: int,
        mapping_changed: Callable[[], None] = lambda: None,
    ) -> None:
        """`l1` is the active table (or, read-only, a snapshot's); `header` names where the active
        L1 lives, which an L2 table must not overlap. `mapping_changed()` is called before any L1
        or L2 entry may change (plainmap.py: what caches host offsets hears of it here)."""
        self._hf = hf
        self._geo = geometry
        self._alloc = allocator
        self._metadata = allocator.metadata  # the same set for as long as the image is open
        self._header = header
        self._l1 = l1
        self._l1_offset = l1_offset
        self._l1_dirty = False
        self._l1_moved = False
        self._l2 = L2Cache(hf, geometry.cluster_size, tables_wanted)
        self._mapping_changed = mapping_changed

    @property
    def path(self) -> str:
        return self._hf.path

    # -- the L1 table ------------------------------------------------------------------------
    @property
    def l1(self) -> array[int]:
        """The L1 table in use (entries as stored). Change it only through this class."""
        return self._l1

    @property
    def l1_offset(self) -> int:
        return self._l1_offset

    def set_l1_entry(self, l1_index: int, entry: int) -> None:
        if self._l1[l1_index] != entry:
            self._mapping_changed()
            self._l1[l1_index] = entry
            self._l1_dirty = True

    def replace_l1(self, l1: array[int], offset: int) -> None:
        """A new L1 table that is already in the file at `offset` (a committed transaction); the
        cached L2 tables may be stale and are dropped."""
        self._mapping_changed()
        self._l1, self._l1_offset = l1, offset
        self._l1_dirty = self._l1_moved = False
        self._l2.clear()

    def move_l1(self, l1: array[int], offset: int) -> None:
        """Use `l1` from now on, stored at `offset` (freshly allocated) at the next flush, which
        then also points the header at it."""
        self._mapping_changed()
        self._l1, self._l1_offset = l1, offset
        self._l1_dirty = self._l1_moved = True

    # -- lookup ------------------------------------------------------------------------------
    def l2_table(self, l1_index: int) -> array[int] | None:
        """The L2 table for `l1_index` (validated L1 entry), or None if unallocated."""
        l1 = self._l1
        if l1_index >= len(l1):
            return None
        entry = l1[l1_index]
        offset = entry & fmt.L1E_OFFSET_MASK
        if not offset:
            if entry & fmt.L1E_RESERVED_MASK:
                raise ImageCorruptError(f"{self.path}: L1 entry {l1_index} has reserved bits set (0x{entry:x})")
            return None
        table = self._l2.tables.get(offset)
        if table is not None:
            return table
        return self._load_l2(l1_index, entry, offset)

    def l2_for_walk(self, l1: array[int], l1_index: int) -> array[int]:
        """The L2 table of entry `l1_index` of `l1` (the active or a snapshot's L1 table), for a
        caller that knows the entry has an offset."""
        entry = l1[l1_index]
        offset = entry & fmt.L1E_OFFSET_MASK
        table = self._l2.tables.get(offset)
        if table is not None:
            return table
        return self._load_l2(l1_index, entry, offset)

    def cached_l2(self, offset: int) -> array[int] | None:
        """The L2 table at `offset` if it is cached (possibly newer than the file)."""
        return self._l2.tables.get(offset)

    def _load_l2(self, l1_index: int, entry: int, offset: int) -> array[int]:
        """Validate an L1 entry whose table is not cached, then load the table into the cache."""
        cs = self._geo.cluster_size
        if entry & fmt.L1E_RESERVED_MASK:
            raise ImageCorruptError(f"{self.path}: L1 entry {l1_index} has reserved bits set (0x{entry:x})")
        if offset & (cs - 1):
            raise ImageCorruptError(f"{self.path}: L2 table at 0x{offset:x} (L1 entry {l1_index}) is not aligned")
        if offset + cs > self._hf.size:
            raise ImageCorruptError(f"{self.path}: L2 table at 0x{offset:x} is past the end of the file")
        if offset < cs or self._overlaps_table_metadata(offset):
            raise ImageCorruptError(f"{self.path}: L2 table at 0x{offset:x} overlaps other metadata")
        return self._l2.load(offset)

    def _overlaps_table_metadata(self, offset: int) -> bool:
        """An L2 offset landing on the L1 table, refcount table or a refcount block."""
        hdr = self._header
        if hdr.l1_table_offset <= offset < hdr.l1_table_offset + max(hdr.l1_size * 8, 1):
            return True
        reft_offset, reft_clusters = self._alloc.refcount_table_range()
        if reft_offset <= offset < reft_offset + reft_clusters * self._geo.cluster_size:
            return True
        return offset in set(self._alloc.refcount_block_offsets())

    def entry_words(self, guest_cluster: int) -> tuple[int, int]:
        """(L2 entry, subcluster bitmap) of a guest cluster; (0, 0) if it has no L2 table."""
        geo = self._geo
        table = self.l2_table(guest_cluster >> geo.l2_bits)
        if table is None:
            return 0, 0
        index = (guest_cluster & geo.l2_mask) << geo.ext_shift
        if geo.extended_l2:
            return table[index], table[index + 1]
        return table[index], 0

    def check_data_offset(self, host: int, guest_cluster: int, entry: int) -> None:
        """Validate a standard cluster's host offset (qcow2.rst "Standard Cluster Descriptor")."""
        geo = self._geo
        if host & (geo.cluster_size - 1):
            raise ImageCorruptError(f"{self.path}: L2 entry 0x{entry:x} (guest cluster {guest_cluster}) is not aligned")
        if geo.has_data_file:
            if host != guest_cluster << geo.cluster_bits:
                raise ImageCorruptError(
                    f"{self.path}: data file offset of guest cluster {guest_cluster} != guest offset"
                )
            return
        if host >= self._hf.size:
            raise ImageCorruptError(
                f"{self.path}: L2 entry for guest cluster {guest_cluster} points past the end of the file (0x{host:x})"
            )
        if host >> geo.cluster_bits in self._metadata:
            raise ImageCorruptError(
                f"{self.path}: L2 entry for guest cluster {guest_cluster} points into metadata (0x{host:x})"
            )

    def check_compressed(self, entry: int, guest_cluster: int) -> None:
        """Validate a compressed cluster descriptor (inside the file, not over metadata)."""
        geo = self._geo
        if geo.has_data_file:
            raise ImageCorruptError(f"{self.path}: compressed cluster in an image with an external data file")
        host, _ = fmt.compressed_span(entry, geo.cluster_bits)
        if host < geo.cluster_size or host >= self._hf.size:
            raise ImageCorruptError(
                f"{self.path}: compressed cluster for guest cluster {guest_cluster} at 0x{host:x} is outside the file"
            )
        if host >> geo.cluster_bits in self._metadata:
            raise ImageCorruptError(f"{self.path}: compressed cluster at 0x{host:x} overlaps metadata")

    # -- changes -----------------------------------------------------------------------------
    def l2_for_write(self, guest_cluster: int) -> tuple[array[int], int]:
        """The L2 table for a guest cluster and the entry's word index, allocated or copied so
        that the active image owns the table alone. Every change of an L2 entry starts here (the
        caller then sets words of the table returned), so this is where the mapping changes."""
        self._mapping_changed()
        geo = self._geo
        l1_index = guest_cluster >> geo.l2_bits
        index = (guest_cluster & geo.l2_mask) << geo.ext_shift
        if l1_index >= len(self._l1):
            raise ImageError(f"{self.path}: guest cluster {guest_cluster} beyond the L1 table")
        l1_entry = self._l1[l1_index]
        offset = l1_entry & fmt.L1E_OFFSET_MASK
        if offset and l1_entry & fmt.OFLAG_COPIED:
            return self.l2_for_walk(self._l1, l1_index), index
        if offset:
            old = self.l2_for_walk(self._l1, l1_index)
            if self._alloc.refcount(offset >> geo.cluster_bits) == 1:
                self.set_l1_entry(l1_index, offset | fmt.OFLAG_COPIED)  # the flag was stale
                return old, index
            table = array("Q", old)
            for i in range(0, len(table), geo.words_per_entry):  # copied entries are shared now
                table[i] &= ~fmt.OFLAG_COPIED
            self._alloc.free_later(offset, 1)
        else:
            table = array("Q", bytes(geo.cluster_size))
        new_offset = self._alloc.allocate_metadata(geo.cluster_size)
        self._l2.install(new_offset, table)
        self.set_l1_entry(l1_index, new_offset | fmt.OFLAG_COPIED)
        return table, index

    def mark_dirty(self, guest_cluster: int) -> None:
        """The L2 table of `guest_cluster` (present, owned) was changed in memory."""
        self._l2.mark_dirty(self._l1[guest_cluster >> self._geo.l2_bits] & fmt.L1E_OFFSET_MASK)

    def mark_table_dirty(self, l2_offset: int) -> None:
        self._l2.mark_dirty(l2_offset)

    def clear_cache(self) -> None:
        """Drop every cached L2 table (unwritten changes are lost: flush first)."""
        self._mapping_changed()
        self._l2.clear()

    # -- flush (called by flush.py's order) ----------------------------------------------------
    @property
    def needs_flush(self) -> bool:
        """Every cached table is dirty: the owner must flush before the cache can take more."""
        return self._l2.needs_flush

    @property
    def l2_dirty(self) -> bool:
        return bool(self._l2.dirty)

    @property
    def l1_dirty(self) -> bool:
        return self._l1_dirty

    @property
    def l1_moved(self) -> bool:
        """The L1 table moved since the header was last written."""
        return self._l1_moved

    def write_l2_tables(self) -> None:
        """Write every dirty L2 table (the flush order syncs)."""
        self._l2.write_dirty()

    def write_l1(self) -> None:
        """Write the L1 table to its offset (the flush order syncs)."""
        self._hf.pwrite(self._l1_offset, dump_u64_table(self._l1))
        self._l1_dirty = False

    def l1_location_written(self) -> None:
        """The header now points at the L1 table (written by the flush order)."""
        self._l1_moved = False
