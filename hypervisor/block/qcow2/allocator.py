"""Host cluster allocation for the engine: refcounts, the metadata cluster set, compressed bytes.

The allocator wraps refcount.Refcounts (the one refcount module, shared with the checker and the
creator) and is the only owner of the set of host clusters that hold metadata: a data entry that
points into one of them is corruption (QEMU's overlap checks, qcow2-refcount.c
qcow2_check_metadata_overlap). The set changes only here: clusters allocated for metadata join it,
clusters allocated for data leave it (they may have been metadata before they were freed), a
moved refcount table moves in it, and after a whole-image change the engine hands it a recount.

Compressed data is allocated byte-granular (QEMU qcow2_alloc_bytes): a host cluster shared by
several compressed clusters holds one reference per compressed cluster. The cursor is the end of
the last compressed write inside its cluster; it is dropped at every flush, after which the
cluster could be freed and reused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Set

from hypervisor.block.qcow2.geometry import Geometry
from hypervisor.block.qcow2.hostfile import HostFile
from hypervisor.block.qcow2.refcount import Refcounts


class Allocator:
    def __init__(
        self,
        hf: HostFile,
        geometry: Geometry,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        on_table_moved: Callable[[int, int], None],
        metadata_changed: Callable[[], None] = lambda: None,
    ) -> None:
        """`on_table_moved(offset, clusters)` makes the header point at a moved refcount table
        (durably) before the old one is freed. `metadata_changed()` is called whenever clusters
        join the metadata set (a data entry pointing there is no longer plain: plainmap.py)."""
        self._hf = hf
        self._geometry = geometry
        self._order = refcount_order
        self._on_table_moved = on_table_moved
        self._metadata_changed = metadata_changed
        self._metadata: set[int] = set()
        self._compressed_cursor = 0
        self._table = (table_offset, table_clusters)
        self._refs = self._load(table_offset, table_clusters)

    def _load(self, table_offset: int, table_clusters: int) -> Refcounts:
        return Refcounts(
            self._hf, self._geometry.cluster_bits, self._order, table_offset, table_clusters, self._table_moved
        )

    def reload(self, table_offset: int, table_clusters: int) -> None:
        """Forget the in-memory refcounts and read the structure at `table_offset` from the file
        (a transaction abandoned, or the structure replaced under the engine)."""
        self._metadata_changed()
        self._refs = self._load(table_offset, table_clusters)
        self._table = (table_offset, table_clusters)
        self._compressed_cursor = 0

    @property
    def refcounts(self) -> Refcounts:
        return self._refs

    # -- the metadata set --------------------------------------------------------------------
    @property
    def metadata(self) -> Set[int]:
        """Host cluster indexes holding metadata (read-only view; the same object while open, so a
        hot loop may hold it)."""
        return self._metadata

    def set_metadata(self, clusters: Iterable[int]) -> None:
        """Replace the set with a recount of the image's metadata (at open, after a commit)."""
        self._metadata_changed()
        self._metadata.clear()
        self._metadata.update(clusters)
        self._table = self._refs.table_clusters_range()

    def refcount_table_range(self) -> tuple[int, int]:
        """(offset, clusters) of the refcount table."""
        return self._refs.table_clusters_range()

    def refcount_block_offsets(self) -> Iterator[int]:
        return self._refs.block_offsets()

    def _table_moved(self, offset: int, clusters: int) -> None:
        self._metadata_changed()
        self._on_table_moved(offset, clusters)
        cb = self._geometry.cluster_bits
        old_offset, old_clusters = self._table
        self._metadata.update(range(offset >> cb, (offset >> cb) + clusters))
        self._metadata.difference_update(range(old_offset >> cb, (old_offset >> cb) + old_clusters))
        self._table = (offset, clusters)

    # -- refcounts and allocation ------------------------------------------------------------
    def refcount(self, cluster: int) -> int:
        return self._refs.get(cluster)

    def allocate_data(self, count: int) -> int:
        """`count` contiguous clusters for guest data; returns the host byte offset."""
        host = self._refs.allocate(count)
        first = host >> self._geometry.cluster_bits
        self._metadata.difference_update(range(first, first + count))
        return host

    def allocate_metadata(self, length: int) -> int:
        """Clusters for a metadata structure of `length` bytes; returns the host byte offset."""
        count = self._geometry.clusters(length)
        host = self._refs.allocate(count)
        first = host >> self._geometry.cluster_bits
        self._metadata_changed()
        self._metadata.update(range(first, first + count))
        return host

    def free_later(self, host: int, count: int = 1) -> None:
        """Drop a reference once the change that dropped it is durable (refcount.py's deferred
        decrements)."""
        self._refs.free_later(host, count)

    def free_area_later(self, offset: int, length: int) -> None:
        self._refs.free_later(offset, self._geometry.clusters(length))

    # -- compressed clusters -----------------------------------------------------------------
    def allocate_compressed(self, length: int) -> int:
        """`length` bytes of host space for one compressed cluster, packed after the previous one
        when it fits in the same host cluster."""
        cs, cb = self._geometry.cluster_size, self._geometry.cluster_bits
        cursor = self._compressed_cursor
        if cursor and (cursor & (cs - 1)) + length <= cs and self._refs.get(cursor >> cb):
            self._refs.change(cursor >> cb, +1)
            host = cursor
        else:
            host = self.allocate_data(-(-length // cs))
        end = host + length
        self._compressed_cursor = end if end & (cs - 1) else 0
        return host

    def reset_compressed_cursor(self) -> None:
        self._compressed_cursor = 0

    # -- flush (called by flush.py's order) ----------------------------------------------------
    def write_refcounts(self) -> None:
        """Make the in-memory refcounts durable (refcount.py write_back; ends with a sync)."""
        self._refs.write_back()

    @property
    def has_pending_frees(self) -> bool:
        return bool(self._refs.pending_frees)

    def apply_pending_frees(self) -> None:
        """Apply the queued decrements and write them (the flush order syncs)."""
        self._refs.apply_pending_frees()
