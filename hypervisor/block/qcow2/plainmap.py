"""What a fast path outside the engine may cache of the guest-to-host mapping: plain clusters.

A guest cluster is *plainly mapped* when its bytes are one whole standard cluster of the image
file at a host offset (qcow2.rst "Standard Cluster Descriptor": bits 9-55 the host offset, not
compressed (bit 62), not reading as zeros (bit 0), reserved bits 1-8 and 56-61 clear), in an image
without extended L2 entries ("Extended L2 Entries": a subcluster bitmap decides per 1/32 of the
cluster) and without an external data file. Such a cluster reads with one pread at `host +
offset in cluster`, as the Reader's hot loop does; it is *writable in place* when its L2 entry
has COPIED set (bit 63: "refcount is exactly one", qcow2.rst "Cluster mapping"), the image is
open read-write and already prepared for writing: then the Writer too would just pwritev at that
offset, with no metadata change. Everything else (unallocated and backing file reads, zeros,
compressed, shared clusters, allocation) stays the engine's.

The cache holds offsets, not tables: it goes stale only when an L1 or L2 entry changes, or when
the set of metadata clusters a data entry must not point into changes. `MappingWatch` is how the
engine's parts say so: the cluster map calls it wherever an entry can change (a table handed out
for writing, an L1 entry set, an L1 table replaced or moved, the L2 cache dropped) and the
allocator wherever the metadata set changes, so a new way of changing the mapping goes through
one of those and cannot forget the cache. All of it happens under the Qcow2Image's lock.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Set
from typing import TYPE_CHECKING, NamedTuple

from hypervisor.block.qcow2 import format as fmt

if TYPE_CHECKING:
    from hypervisor.block.qcow2.clustermap import ClusterMap
    from hypervisor.block.qcow2.geometry import Geometry

# Marks a writable entry in the returned words; host offsets are cluster aligned (>= 512).
WRITABLE = 1
# Clusters looked at around a request that missed: the aligned window holding it (a fill of a
# whole 8192-entry table costs milliseconds of Python, paid again after every mapping change).
FILL_WINDOW = 1024
MAX_FILL_WINDOWS = 4  # at most this many windows for one request
MAX_FILL = MAX_FILL_WINDOWS * FILL_WINDOW


class MappingWatch:
    """The listeners told of every change of the mapping (see the module docstring)."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []

    def add(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener()` on every change from now on; returns the function that stops it."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def changed(self) -> None:
        for listener in self._listeners:
            listener()


class PlainRun(NamedTuple):
    """Guest clusters first, first+1, ...: hosts[i] is the host offset of first+i (| WRITABLE),
    or 0 when that cluster is not plainly mapped."""

    first: int
    hosts: array[int]


def plain_runs(
    geometry: Geometry,
    cmap: ClusterMap,
    metadata: Set[int],
    file_size: int,
    disk_size: int,
    offset: int,
    length: int,
    writable: bool,
) -> list[PlainRun]:
    """The plain clusters of the windows around guest bytes [offset, offset+length), one run per
    L2 table, each entry validated as the Reader's hot loop validates it (aligned, inside the
    file, not metadata). Raises ImageCorruptError from the L1 entry check like a read would."""
    if geometry.extended_l2 or geometry.has_data_file:
        return []
    cb, in_mask, not_plain = geometry.cluster_bits, geometry.cluster_size - 1, fmt.L2E_NOT_PLAIN_DATA
    clusters = -(-disk_size >> cb) if disk_size else 0
    first = (offset >> cb) // FILL_WINDOW * FILL_WINDOW
    last = (offset + max(length, 1) - 1) >> cb
    stop = min(clusters, (last // FILL_WINDOW + 1) * FILL_WINDOW, first + MAX_FILL)
    runs = []
    cluster = first
    while cluster < stop:
        table_end = min(stop, (cluster | geometry.l2_mask) + 1)
        table = cmap.l2_table(cluster >> geometry.l2_bits)
        if table is not None:
            hosts = array("Q", bytes(8 * (table_end - cluster)))
            base = cluster & geometry.l2_mask
            for i in range(table_end - cluster):
                entry = table[base + i]
                host = entry & fmt.L2E_OFFSET_MASK
                if entry & not_plain or not host or host & in_mask or host >= file_size or host >> cb in metadata:
                    continue
                hosts[i] = host | WRITABLE if writable and entry & fmt.OFLAG_COPIED else host
            runs.append(PlainRun(cluster, hosts))
        cluster = table_end
    return runs
