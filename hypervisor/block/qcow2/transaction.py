"""All-or-nothing metadata changes committed by one header write (internal snapshots).

Why: creating or deleting a snapshot moves refcounts of data clusters between 1 and 2 and, with
them, the COPIED flags of the active L1/L2 entries. qcow2.rst ("Cluster mapping", bit 63: "1 for
standard clusters whose refcount is exactly one. This information is only accurate in L2 tables
that are reachable from the active L1 table") makes the flag a function of the refcount, and
`qemu-img check` counts a mismatch in *either* direction as corruption (QEMU check_oflag_copied).
A refcount and the flag that depends on it live in different clusters, so no order of in-place
writes keeps them in step at every write point; QEMU has the same window.

The order used here (a shadow update, as the checker's rebuild does for whole refcount structures):

1. Everything the new state needs that differs from the old one is written to clusters that are
   free in the old state: copied L2 tables with exact COPIED flags, a new active L1 table, the new
   snapshot table, a copy of every refcount block whose counts change, and a new refcount table
   pointing at those copies. Freed clusters are counted as free only in the copies, and nothing
   is allocated after the frees are counted, so no cluster live in the old state is overwritten.
2. sync: the new structures are durable.
3. The header's first sector is rewritten with the new L1, refcount table and snapshot table
   pointers at once (qcow2.rst "Header": l1_table_offset, refcount_table_offset, nb_snapshots and
   snapshots_offset all lie in bytes 0..71). This is the commit point.
4. sync.

A crash before 3 leaves the old image untouched (the new clusters are past every reference and
have refcount 0 in the old structure: not even leaks); after it, the new image with exact
refcounts. Both states pass `qemu-img check` at every write point and in any order of the
writes inside step 1.
"""

from __future__ import annotations

import logging
from array import array
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.flush import DATA, FlushOrder
from hypervisor.block.qcow2.header import Qcow2Header
from hypervisor.block.qcow2.refcount import Refcounts, dump_u64_table
from hypervisor.errors import ImageFormatError

if TYPE_CHECKING:
    from hypervisor.block.qcow2.engine import Engine

log = logging.getLogger(__name__)


class MetadataTransaction:
    """Collects a new metadata state for `image` and commits it with one header write.

    `net` holds the refcount change each existing cluster gets (references added minus removed);
    clusters for new structures come from `allocate`. The image must be flushed before (its
    in-memory refcounts then equal the disk) and its lock held.
    """

    def __init__(self, image: Engine) -> None:
        self.image = image
        self.geometry = image.geometry
        self.hf = image.files.image
        self.refs: Refcounts = image.allocator.refcounts
        # Blocks changed for the new state go to copies (_shadow_refcounts); the cache must not
        # write them over the old state's blocks before the commit point, so they stay cached.
        self.refs.hold_dirty_blocks(True)
        self.net: Counter[int] = Counter()
        self._old_blocks = {index: offset for index, offset in enumerate(self.refs.table) if offset}
        self._old_table = (self.refs.table_offset, self.refs.table_clusters)
        header: Qcow2Header = image.header
        self._saved_header = {name: getattr(header, name) for name in _SWITCHED_FIELDS}
        self.committed = False

    def __enter__(self) -> MetadataTransaction:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is not None and not self.committed:
            self.abandon()
        self.refs.hold_dirty_blocks(False)

    # -- building the new state ---------------------------------------------------------------
    def after(self, cluster: int) -> int:
        """The refcount `cluster` will have once committed."""
        return self.refs.get(cluster) + self.net[cluster]

    def allocate(self, length: int) -> int:
        """Clusters for `length` bytes that are free in the old state (refcount 1 in the new)."""
        return self.refs.allocate(self.geometry.clusters(length))

    def add_area(self, offset: int, length: int, sign: int) -> None:
        """Count the clusters of a byte range (a table) as referenced once more or once less."""
        for cluster in self.geometry.cluster_range(offset, length):
            self.net[cluster] += sign

    def write(self, offset: int, data: bytes) -> None:
        """Write part of the new state now (memory stays bounded): `offset` came from `allocate`,
        so no reference of the old state reaches it."""
        self.hf.pwrite(offset, data)

    def exact_l2(self, table: array) -> array:
        """`table` with every COPIED flag equal to (refcount after commit == 1)."""
        geo = self.geometry
        exact = array("Q", table)
        for i in range(0, len(exact), geo.words_per_entry):
            entry = exact[i]
            host = entry & fmt.L2E_OFFSET_MASK
            if entry & fmt.OFLAG_COMPRESSED or not host:
                continue
            copied = fmt.OFLAG_COPIED if self.after(host >> geo.cluster_bits) == 1 else 0
            exact[i] = (entry & ~fmt.OFLAG_COPIED) | copied
        return exact

    def active_tree(self, l1: array) -> array:
        """The new active L1 for the L2 tables `l1` points to, whose references (one per L2 table,
        and their data clusters) must already be in `net`. An L2 table whose flags would change is
        copied (the old one stays as it is for the old state and for snapshots sharing it)."""
        cmap, cb = self.image.cmap, self.geometry.cluster_bits
        new_l1 = array("Q", bytes(8 * len(l1)))
        for l1_index, l1_entry in enumerate(l1):
            l2_offset = l1_entry & fmt.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            table = cmap.l2_for_walk(l1, l1_index)
            exact = self.exact_l2(table)
            if exact != table:
                self.net[l2_offset >> cb] -= 1  # the active L1 now points at the copy
                l2_offset = self.allocate(self.geometry.cluster_size)
                self.write(l2_offset, dump_u64_table(exact))
            copied = fmt.OFLAG_COPIED if self.after(l2_offset >> cb) == 1 else 0
            new_l1[l1_index] = l2_offset | copied
        return new_l1

    # -- commit -------------------------------------------------------------------------------
    def commit(self, update_header: Callable[[Qcow2Header], None]) -> None:
        """Write the new state, sync, switch the header (the commit point), sync. On any failure
        the in-memory state goes back to the old image (`abandon`) and the error propagates."""
        image, refs = self.image, self.refs
        header = image.header
        shadow: list[tuple[int, int]] = []

        def write_refcounts() -> None:
            self._apply_increments()
            table_offset, table_clusters = self._shadow_refcounts()
            refs.table_offset, refs.table_clusters = table_offset, table_clusters
            shadow.append((table_offset, table_clusters))

        def switch_header() -> None:  # the commit point
            update_header(header)
            header.refcount_table_offset, header.refcount_table_clusters = shadow[0]
            image.write_header()

        # Steps 1-4 of the module doc in flush.py's terms: what `write` put in new clusters is the
        # DATA the header switch waits for, with the shadow refcount structure.
        order = FlushOrder(self.hf, lambda: None)  # no external data file: snapshots exclude one
        order.add("shadow refcounts", lambda: True, write_refcounts)
        order.add("header", lambda: True, switch_header, after=("shadow refcounts", DATA))
        try:
            order.flush()
        except BaseException:
            self.abandon()
            raise
        self.committed = True
        refs.hold_dirty_blocks(False)  # the written state is the image now
        refs.trim_cache()
        log.debug("%s: metadata committed (refcount table at 0x%x)", image.path, shadow[0][0])

    def _apply_increments(self) -> None:
        refs = self.refs
        limit = refs.max_refcount
        for cluster, delta in self.net.items():
            if delta > 0 and refs.get(cluster) + delta > limit:
                raise ImageFormatError(
                    f"{self.image.path}: refcount_bits={refs.codec.bits} is too narrow for this snapshot"
                )
        for cluster, delta in self.net.items():
            if delta > 0:
                refs.change(cluster, delta)

    def _shadow_refcounts(self) -> tuple[int, int]:
        """Copy-on-write of the refcount structure: every block that changes goes to a new cluster,
        the table to new clusters; decrements (including the old copies) are applied last so that
        no allocation can reuse a cluster the old state still uses. Writes blocks and table."""
        refs = self.refs
        cb, cs = self.geometry.cluster_bits, self.geometry.cluster_size
        per_block = refs.codec.entries
        frees = Counter({cluster: -delta for cluster, delta in self.net.items() if delta < 0})
        self.add_frees_of_area(frees, *self._old_table)
        shadows: dict[int, int] = {}
        table: tuple[int, int] | None = None
        while True:
            changing = set(refs.dirty_blocks) | {cluster // per_block for cluster in frees}
            missing = sorted(index for index in changing if index in self._old_blocks and index not in shadows)
            for index in missing:
                shadows[index] = refs.allocate(1)
                frees[self._old_blocks[index] >> cb] += 1
            table_clusters = max(self._old_table[1], -(-len(refs.table) * 8 // cs))
            if table is None or table[1] < table_clusters:
                if table is not None:  # allocated in this transaction: safe to give back at once
                    for i in range(table[1]):
                        refs.change((table[0] >> cb) + i, -1)
                table = (refs.allocate(table_clusters), table_clusters)
                continue
            if not missing:
                break
        for cluster, count in frees.items():
            refs.change(cluster, -count)
        for index in sorted(refs.dirty_blocks):
            if index in shadows:
                refs.table[index] = shadows[index]
            self.hf.pwrite(refs.table[index], refs.codec.encode(refs.blocks[index]))
        refs.dirty_blocks.clear()
        refs.changed_table_entries.clear()
        refs.table_relocation_needed = False
        words = array("Q", refs.table)
        words.extend([0] * (table[1] * cs // 8 - len(words)))
        self.hf.pwrite(table[0], dump_u64_table(words))
        return table

    def add_frees_of_area(self, frees: Counter[int], offset: int, clusters: int) -> None:
        first = offset >> self.geometry.cluster_bits
        for cluster in range(first, first + clusters):
            frees[cluster] += 1

    def abandon(self) -> None:
        """Forget the in-memory changes and reload the old state from disk (nothing live was
        overwritten before the commit point). Called on any failure; safe to call twice."""
        image = self.image
        header = image.header
        for name, value in self._saved_header.items():
            setattr(header, name, value)
        image.allocator.reload(*self._old_table)
        self.refs = image.allocator.refcounts
        image.cmap.clear_cache()


_SWITCHED_FIELDS = (
    "l1_table_offset",
    "l1_size",
    "refcount_table_offset",
    "refcount_table_clusters",
    "nb_snapshots",
    "snapshots_offset",
    "size",
)
