"""One open qcow2 image as composed parts: geometry, allocator, cluster map, flush order, reader
and writer, over the image's files and header.

The parts depend on each other in one direction (format -> tables -> engine): the geometry is a
value from the header; the allocator owns refcounts and the metadata cluster set; the cluster map
owns the L1 table and the L2 cache and asks the allocator for clusters; the flush order (flush.py)
writes what the allocator and the map hold dirty; the reader and the writer work on all of them.
The engine builds them from the file, owns the header (written here only) and the snapshot
table, and is what the whole-image operations (ops.py) and the Qcow2Image facade (image.py) use.

Opening validates as it loads; an image whose dirty bit is set (qcow2.rst "Header": "refcounts
may be inconsistent, make sure to scan L1/L2 tables to repair refcounts before accessing the
image") is repaired by the checker first when opened read-write, as QEMU's qcow2_open runs
qcow2_check with BDRV_FIX_ERRORS | BDRV_FIX_LEAKS; the parts then load the repaired file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from hypervisor.block.backend import BlockBackend
from hypervisor.block.qcow2 import bitmaps
from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.allocator import Allocator
from hypervisor.block.qcow2.backing import open_backing, open_data_file
from hypervisor.block.qcow2.bitmaps import BitmapDirectory, load_directory, referenced_clusters
from hypervisor.block.qcow2.check import check_image
from hypervisor.block.qcow2.clustermap import ClusterMap, load_l1
from hypervisor.block.qcow2.compress import require_codec
from hypervisor.block.qcow2.flush import DATA, FlushOrder
from hypervisor.block.qcow2.geometry import Geometry
from hypervisor.block.qcow2.header import Qcow2Header, parse_header, serialize
from hypervisor.block.qcow2.hostfile import HostFile, ImageFiles
from hypervisor.block.qcow2.plainmap import MappingWatch
from hypervisor.block.qcow2.read import Reader
from hypervisor.block.qcow2.snapshot_table import SnapshotEntry, parse_snapshot_table, table_size_bound
from hypervisor.block.qcow2.write import Writer
from hypervisor.errors import ImageCorruptError, ImageError, ImageFormatError

log = logging.getLogger(__name__)

_PROBE_BYTES = 512

# Opens a qcow2 backing file read-only given its path and the chain of real paths down to it.
BackingOpener = Callable[[str, tuple[str, ...]], BlockBackend]


def read_header(hf: HostFile) -> Qcow2Header:
    """Parse the header (and its extensions, which fill at most the first cluster)."""
    first = hf.pread(0, min(_PROBE_BYTES, hf.size))
    if len(first) >= 24 and first[:4] == fmt.MAGIC:
        cluster_bits = int.from_bytes(first[20:24], "big")
        if fmt.MIN_CLUSTER_BITS <= cluster_bits <= fmt.MAX_CLUSTER_BITS:
            first = hf.pread(0, min(1 << cluster_bits, hf.size))
    return parse_header(first, hf.size, hf.path)


class _OpenImagePath:
    """What check_image takes for an image this process already holds open and locked."""

    def __init__(self, path: str) -> None:
        self.path = path


def repair_dirty_image(hf: HostFile) -> None:
    """Recount and repair the refcounts of a dirty image through the checker (`check -r all`),
    which also clears the dirty bit once the image is consistent. Raises ImageCorruptError if
    the image stays inconsistent."""
    log.warning("%s: image was not closed cleanly; repairing refcounts", hf.path)
    result = check_image(_OpenImagePath(hf.path), repair="all")
    hf.refresh_size()
    if result.corruptions or result.check_errors:
        raise ImageCorruptError(
            f"{hf.path}: image was not closed cleanly and could not be repaired "
            f"({result.corruptions} corruptions, {result.check_errors} check errors left)"
        )
    log.info(
        "%s: refcounts repaired (%d leaks, %d corruptions fixed)", hf.path, result.leaks_fixed, result.corruptions_fixed
    )


class Engine:
    """The parts of one open qcow2 image. Not thread-safe: the facade holds the lock."""

    def __init__(
        self,
        hf: HostFile,
        read_only: bool,
        allow_backing: bool,
        snapshot: str | None,
        chain: tuple[str, ...],
        open_qcow2_backing: BackingOpener,
    ) -> None:
        self.path = hf.path
        self.read_only = read_only
        self.allow_backing = allow_backing
        self._chain = chain
        self._open_qcow2_backing = open_qcow2_backing
        self.files = ImageFiles(hf)
        self.prepared_for_write = False  # bitmaps marked in use, unknown autoclear bits cleared
        # Told of every change of L1/L2 entries and of the metadata set (plainmap.py).
        self.mapping_watch = watch = MappingWatch()

        hdr = read_header(hf)
        if hdr.incompatible_features & fmt.INCOMPAT_CORRUPT and not read_only:
            raise ImageCorruptError(
                f"{self.path}: image is marked corrupt; open it read-only or repair it (pyhv image check -r all)"
            )
        require_codec(hdr.compression_type, self.path)
        if hdr.incompatible_features & fmt.INCOMPAT_DIRTY and not read_only:
            repair_dirty_image(hf)
            hdr = read_header(hf)
        self.header = hdr
        self.geometry = geo = Geometry.from_header(hdr)
        self.allocator = Allocator(
            hf,
            geo,
            hdr.refcount_order,
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters,
            self._table_moved,
            watch.changed,
        )
        l1 = load_l1(hf, hdr.l1_table_offset, hdr.l1_size)
        self.snapshots = self._load_snapshots()
        self.bitmaps = self._load_bitmaps()
        self.size = hdr.size  # virtual disk size in bytes
        self.snapshot: SnapshotEntry | None = None  # the snapshot opened read-only, if any
        if snapshot is not None:
            self.snapshot = self.find_snapshot(snapshot)
            l1 = load_l1(hf, self.snapshot.l1_table_offset, self.snapshot.l1_size)
            self.size = self.snapshot.disk_size or hdr.size
        self.cmap = ClusterMap(
            hf, geo, self.allocator, hdr, l1, hdr.l1_table_offset, hdr.l1_entries_needed(self.size), watch.changed
        )
        self.allocator.set_metadata(self.collect_metadata_clusters())
        self.reader = Reader(geo, self.cmap, self.allocator, self.files, hdr)
        self.writer = Writer(geo, self.cmap, self.allocator, self.files, hdr, self.reader)
        self._flush_order = self._build_flush_order()
        try:
            self._open_external_files()
        except BaseException:
            self.close_external()
            raise

    # -- loading -----------------------------------------------------------------------------
    def _load_snapshots(self) -> list[SnapshotEntry]:
        hdr, hf = self.header, self.files.image
        if not hdr.nb_snapshots:
            return []
        if self.geometry.has_data_file:
            raise ImageCorruptError(f"{self.path}: internal snapshots are not allowed with an external data file")
        bound = min(table_size_bound(hdr.nb_snapshots), max(0, hf.size - hdr.snapshots_offset))
        raw = hf.pread(hdr.snapshots_offset, bound)
        return parse_snapshot_table(raw, hdr.nb_snapshots, self.geometry.cluster_size, hf.size, self.path)

    def _load_bitmaps(self) -> BitmapDirectory | None:
        data = self.header.extension(fmt.EXT_BITMAPS)
        if data is None or not self.header.autoclear_features & fmt.AUTOCLEAR_BITMAPS:
            return None
        return load_directory(self.files.image, data, self.geometry.cluster_size)

    def find_snapshot(self, name_or_id: str) -> SnapshotEntry:
        for entry in self.snapshots:
            if entry.id == name_or_id:
                return entry
        for entry in self.snapshots:
            if entry.name == name_or_id:
                return entry
        raise ImageError(f"{self.path}: no snapshot {name_or_id!r}")

    def collect_metadata_clusters(self) -> set[int]:
        """Host clusters holding metadata, so a data entry pointing into one is caught as corrupt."""
        geo, hdr = self.geometry, self.header
        clusters = {0}
        clusters.update(geo.cluster_range(hdr.l1_table_offset, hdr.l1_size * 8))
        clusters.update(geo.cluster_range(hdr.refcount_table_offset, hdr.refcount_table_clusters * geo.cluster_size))
        for block in self.allocator.refcount_block_offsets():
            clusters.add(block >> geo.cluster_bits)
        if hdr.nb_snapshots:
            clusters.update(geo.cluster_range(hdr.snapshots_offset, len(self.snapshots) * fmt.SNAPSHOT_ENTRY_FIXED))
        for snap in self.snapshots:
            clusters.update(geo.cluster_range(snap.l1_table_offset, snap.l1_size * 8))
        for entry in self.cmap.l1:
            if entry & fmt.L1E_OFFSET_MASK:
                clusters.add((entry & fmt.L1E_OFFSET_MASK) >> geo.cluster_bits)
        if self.bitmaps is not None:
            for offset, count in referenced_clusters(self.files.image, self.bitmaps, geo.cluster_size):
                clusters.update(range(offset >> geo.cluster_bits, (offset >> geo.cluster_bits) + count))
        return clusters

    def _open_external_files(self) -> None:
        hdr = self.header
        if self.geometry.has_data_file:
            name = hdr.data_file
            if name is None:
                raise ImageFormatError(f"{self.path}: image uses an external data file but does not name it")
            if self.allow_backing:
                self.files.data = open_data_file(self.path, name, self.read_only)
        if hdr.backing_file and self.allow_backing:
            self.files.backing = self.open_backing(hdr.backing_file, hdr.backing_format)

    def open_backing(self, name: str, backing_format: str | None) -> BlockBackend:
        """Open the backing file `name` (as this image would store it) read-only."""
        return open_backing(self.path, name, backing_format, self._chain, self._open_qcow2_backing)

    def close_external(self) -> None:
        files = self.files
        if files.backing is not None:
            files.backing.close()
            files.backing = None
        if files.data is not None:
            files.data.close()
            files.data = None

    # -- header ------------------------------------------------------------------------------
    def write_header(self) -> None:
        """Rewrite the header cluster from `self.header` (extensions preserved); caller syncs."""
        self.files.image.pwrite(0, serialize(self.header))

    def write_header_durably(self) -> None:
        self.write_header()
        self.files.image.sync()

    def _table_moved(self, offset: int, clusters: int) -> None:
        """The refcount table moved (refcount.py write_back): the header points at the new one
        durably before the old one is freed."""
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        self.write_header_durably()

    def prepare_for_write(self) -> None:
        """Before the first change: bitmaps marked in use and unknown autoclear bits cleared (both
        durable), as qcow2.rst requires of a writer that does not maintain them."""
        if self.prepared_for_write:
            return
        hdr = self.header
        changed = False
        if self.bitmaps is not None and bitmaps.mark_all_in_use(self.files.image, self.bitmaps):
            changed = True
        unknown_autoclear = hdr.autoclear_features & ~fmt.AUTOCLEAR_KNOWN
        if unknown_autoclear:
            hdr.autoclear_features &= ~unknown_autoclear
            self.write_header()
            changed = True
        if changed:
            self.files.image.sync()
        self.prepared_for_write = True

    # -- flush -------------------------------------------------------------------------------
    def _build_flush_order(self) -> FlushOrder:
        """The dependencies (qcow2.rst "Host cluster management"; QEMU qcow2-cache.c): refcount
        increments before any L2 or L1 entry that needs them, guest data before the L2 entry that
        points at it, L2 tables before the L1 entries that point at them, the L1 table before a
        header pointing at its new place, and every queued decrement last, once the references
        it drops are gone durably."""
        cmap, alloc = self.cmap, self.allocator
        order = FlushOrder(self.files.image, lambda: self.files.data)
        order.add("refcounts", lambda: alloc.refcounts.dirty, alloc.write_refcounts, syncs_itself=True)
        order.add("l2", lambda: cmap.l2_dirty, cmap.write_l2_tables, after=("refcounts", DATA))
        order.add("l1", lambda: cmap.l1_dirty, cmap.write_l1, after=("refcounts", "l2", DATA))
        order.add("header", lambda: cmap.l1_moved, self._write_l1_location, after=("l1",))
        order.add(
            "frees", lambda: alloc.has_pending_frees, alloc.apply_pending_frees, after=(DATA, "l2", "l1", "header")
        )
        return order

    def _write_l1_location(self) -> None:
        self.header.l1_table_offset = self.cmap.l1_offset
        self.header.l1_size = len(self.cmap.l1)
        self.write_header()
        self.cmap.l1_location_written()

    def flush(self) -> None:
        """Make everything written so far durable, metadata in the order above."""
        self.allocator.reset_compressed_cursor()  # its cluster could be freed and reused after this
        self._flush_order.flush()

    def flush_if_full(self) -> None:
        """Flush when the L2 cache holds nothing but dirty tables (it cannot evict any)."""
        if self.cmap.needs_flush:
            self.flush()
