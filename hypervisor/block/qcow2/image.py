"""Qcow2Image: open and validate an image, look up clusters, flush metadata in a crash-safe order.

The read path, the write path and the whole-image operations (snapshots, resize, rebase) are
mixins in read.py, write.py and ops.py; the state they share is declared in state.py and set up
here.

Flush order (qcow2.rst gives the structures, QEMU's qcow2 driver the ordering rules): refcount
increments, sync (this also makes data written so far durable), L2 tables, sync, L1 table, sync,
then queued refcount decrements, sync. A crash between any two steps leaves, at worst, clusters
with a refcount but no reference (leaks), never a reference to a cluster with refcount 0.
"""

from __future__ import annotations

import logging
import os
import threading
from array import array

from hypervisor.block.backend import BlockBackend
from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.backing import open_backing, open_data_file
from hypervisor.block.qcow2.bitmaps import BitmapDirectory, load_directory, referenced_clusters
from hypervisor.block.qcow2.compress import require_codec
from hypervisor.block.qcow2.header import Qcow2Header, parse_header, serialize
from hypervisor.block.qcow2.hostfile import HostFile
from hypervisor.block.qcow2.l2cache import L2Cache
from hypervisor.block.qcow2.ops import OpsMixin
from hypervisor.block.qcow2.read import ReadMixin
from hypervisor.block.qcow2.rebuild import rebuild_open_image_refcounts
from hypervisor.block.qcow2.refcount import Refcounts, dump_u64_table, load_u64_table
from hypervisor.block.qcow2.snapshot_table import SnapshotEntry, parse_snapshot_table, table_size_bound
from hypervisor.block.qcow2.write import WriteMixin
from hypervisor.block.raw import open_image_fd
from hypervisor.errors import ImageCorruptError, ImageError, ImageFormatError

log = logging.getLogger(__name__)

_PROBE_BYTES = 512


def _open_qcow2_backing(path: str, chain: tuple[str, ...]) -> BlockBackend:
    """A qcow2 backing file: read-only, opening its own backing files, with the chain down to it."""
    return Qcow2Image.open(path, read_only=True, allow_backing=True, _chain=chain)


class Qcow2Image(ReadMixin, WriteMixin, OpsMixin):
    """A qcow2 image as a BlockBackend. Thread-safe: every public call takes the image's lock."""

    @classmethod
    def open(
        cls,
        path: str,
        read_only: bool = False,
        allow_backing: bool = True,
        snapshot: str | None = None,
        _chain: tuple[str, ...] = (),
    ) -> Qcow2Image:
        if snapshot is not None:
            read_only = True  # a snapshot is opened like qemu-img -l: read-only
        fd = open_image_fd(path, read_only)
        try:
            return cls(fd, path, read_only, allow_backing, snapshot, _chain or (os.path.realpath(path),))
        except BaseException:
            os.close(fd)
            raise

    def __init__(
        self,
        fd: int,
        path: str,
        read_only: bool,
        allow_backing: bool,
        snapshot: str | None,
        chain: tuple[str, ...],
    ) -> None:
        self._lock = threading.RLock()
        self._closed = False
        self._hf = HostFile(fd, path, read_only)
        self.path = path
        self._read_only = read_only
        self._allow_backing = allow_backing
        self._chain = chain
        self._backing: BlockBackend | None = None
        self._data: HostFile | None = None
        self._prepared_for_write = False
        self._decompressed: tuple[int, bytes] | None = None
        self._compressed_cursor = 0

        self._header = self._read_header()
        hdr = self._header
        if hdr.incompatible_features & fmt.INCOMPAT_CORRUPT and not read_only:
            raise ImageCorruptError(
                f"{path}: image is marked corrupt; open it read-only or repair it (pyhv image check -r all)"
            )
        require_codec(hdr.compression_type, path)
        self._init_geometry()
        self._refs = Refcounts(
            self._hf,
            hdr.cluster_bits,
            hdr.refcount_order,
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters,
            self._on_refcount_table_moved,
        )
        self._l1_offset = hdr.l1_table_offset
        self._l1 = self._load_l1(hdr.l1_table_offset, hdr.l1_size)
        self._l1_dirty = False
        self._snapshots = self._load_snapshots()
        self._bitmaps = self._load_bitmaps()
        self._size = hdr.size
        self._snapshot: SnapshotEntry | None = None
        if snapshot is not None:
            self._snapshot = self._find_snapshot(snapshot)
            self._l1 = self._load_l1(self._snapshot.l1_table_offset, self._snapshot.l1_size)
            self._size = self._snapshot.disk_size or hdr.size
        self._l2 = L2Cache(self._hf, self._cs, hdr.l1_entries_needed(self._size))
        self._metadata = self._collect_metadata_clusters()
        try:
            self._open_external_files()
            if hdr.incompatible_features & fmt.INCOMPAT_DIRTY and not read_only:
                log.warning("%s: image was not closed cleanly; rebuilding refcounts", path)
                rebuild_open_image_refcounts(self)
        except BaseException:
            self._close_external()
            raise

    # -- open helpers ------------------------------------------------------------------------
    def _read_header(self) -> Qcow2Header:
        first = self._hf.pread(0, min(_PROBE_BYTES, self._hf.size))
        if len(first) >= 24 and first[:4] == fmt.MAGIC:
            cluster_bits = int.from_bytes(first[20:24], "big")
            if fmt.MIN_CLUSTER_BITS <= cluster_bits <= fmt.MAX_CLUSTER_BITS:
                first = self._hf.pread(0, min(1 << cluster_bits, self._hf.size))
        return parse_header(first, self._hf.size, self.path)

    def _init_geometry(self) -> None:
        hdr = self._header
        self._cb = hdr.cluster_bits
        self._cs = 1 << self._cb
        self._extl2 = hdr.extended_l2
        self._l2_entries = hdr.l2_entries
        self._l2_bits = self._l2_entries.bit_length() - 1
        self._l2_mask = self._l2_entries - 1
        self._ext_shift = 1 if self._extl2 else 0  # words per entry = 1 << ext_shift
        self._sc_bits = self._cb - 5  # 32 subclusters per cluster
        self._v3 = hdr.version >= 3
        self._has_data_file = bool(hdr.incompatible_features & fmt.INCOMPAT_DATA_FILE)

    def _load_l1(self, offset: int, size: int) -> array[int]:
        return load_u64_table(self._hf.pread(offset, size * 8))

    def _load_snapshots(self) -> list[SnapshotEntry]:
        hdr = self._header
        if not hdr.nb_snapshots:
            return []
        if self._has_data_file:
            raise ImageCorruptError(f"{self.path}: internal snapshots are not allowed with an external data file")
        bound = min(table_size_bound(hdr.nb_snapshots), max(0, self._hf.size - hdr.snapshots_offset))
        raw = self._hf.pread(hdr.snapshots_offset, bound)
        return parse_snapshot_table(raw, hdr.nb_snapshots, self._cs, self._hf.size, self.path)

    def _load_bitmaps(self) -> BitmapDirectory | None:
        data = self._header.extension(fmt.EXT_BITMAPS)
        if data is None or not self._header.autoclear_features & fmt.AUTOCLEAR_BITMAPS:
            return None
        return load_directory(self._hf, data, self._cs)

    def _find_snapshot(self, name_or_id: str) -> SnapshotEntry:
        for entry in self._snapshots:
            if entry.id == name_or_id:
                return entry
        for entry in self._snapshots:
            if entry.name == name_or_id:
                return entry
        raise ImageError(f"{self.path}: no snapshot {name_or_id!r}")

    def _collect_metadata_clusters(self) -> set[int]:
        """Host clusters holding metadata, so a data entry pointing into one is caught as corrupt."""
        cb, cs, hdr = self._cb, self._cs, self._header
        clusters = {0}

        def add(offset: int, length: int) -> None:
            clusters.update(range(offset >> cb, (offset + max(length, 1) + cs - 1) >> cb))

        add(hdr.l1_table_offset, hdr.l1_size * 8)
        add(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs)
        for block in self._refs.block_offsets():
            clusters.add(block >> cb)
        if hdr.nb_snapshots:
            add(hdr.snapshots_offset, len(self._snapshots) * fmt.SNAPSHOT_ENTRY_FIXED)
        for snap in self._snapshots:
            add(snap.l1_table_offset, snap.l1_size * 8)
        for entry in self._l1:
            if entry & fmt.L1E_OFFSET_MASK:
                clusters.add((entry & fmt.L1E_OFFSET_MASK) >> cb)
        if self._bitmaps is not None:
            for offset, count in referenced_clusters(self._hf, self._bitmaps, cs):
                clusters.update(range(offset >> cb, (offset >> cb) + count))
        return clusters

    def _open_external_files(self) -> None:
        hdr = self._header
        if self._has_data_file:
            name = hdr.data_file
            if name is None:
                raise ImageFormatError(f"{self.path}: image uses an external data file but does not name it")
            if self._allow_backing:
                self._data = open_data_file(self.path, name, self._read_only)
        if hdr.backing_file and self._allow_backing:
            self._backing = self._open_backing(hdr.backing_file, hdr.backing_format)

    def _open_backing(self, name: str, backing_format: str | None) -> BlockBackend:
        """Open the backing file `name` (as this image would store it) read-only."""
        return open_backing(self.path, name, backing_format, self._chain, _open_qcow2_backing)

    def _close_external(self) -> None:
        if self._backing is not None:
            self._backing.close()
            self._backing = None
        if self._data is not None:
            self._data.close()
            self._data = None

    # -- lookup ------------------------------------------------------------------------------
    def _l2_table(self, l1_index: int) -> array[int] | None:
        """The L2 table for `l1_index` (validated L1 entry), or None if unallocated."""
        if l1_index >= len(self._l1):
            return None
        entry = self._l1[l1_index]
        offset = entry & fmt.L1E_OFFSET_MASK
        if not offset:
            if entry & fmt.L1E_RESERVED_MASK:
                raise ImageCorruptError(f"{self.path}: L1 entry {l1_index} has reserved bits set (0x{entry:x})")
            return None
        table = self._l2.tables.get(offset)
        if table is not None:
            return table
        return self._load_l2(l1_index, entry, offset)

    def _l2_for_walk(self, l1: array[int], l1_index: int) -> array[int]:
        """The L2 table of entry `l1_index` of `l1` (the active or a snapshot's L1 table), for a
        caller that knows the entry has an offset."""
        entry = l1[l1_index]
        offset = entry & fmt.L1E_OFFSET_MASK
        table = self._l2.tables.get(offset)
        if table is not None:
            return table
        return self._load_l2(l1_index, entry, offset)

    def _load_l2(self, l1_index: int, entry: int, offset: int) -> array[int]:
        """Validate an L1 entry whose table is not cached, then load the table into the cache."""
        if entry & fmt.L1E_RESERVED_MASK:
            raise ImageCorruptError(f"{self.path}: L1 entry {l1_index} has reserved bits set (0x{entry:x})")
        if offset & (self._cs - 1):
            raise ImageCorruptError(f"{self.path}: L2 table at 0x{offset:x} (L1 entry {l1_index}) is not aligned")
        if offset + self._cs > self._hf.size:
            raise ImageCorruptError(f"{self.path}: L2 table at 0x{offset:x} is past the end of the file")
        if offset < self._cs or self._overlaps_table_metadata(offset):
            raise ImageCorruptError(f"{self.path}: L2 table at 0x{offset:x} overlaps other metadata")
        return self._l2.load(offset)

    def _overlaps_table_metadata(self, offset: int) -> bool:
        """An L2 offset landing on the L1 table, refcount table or a refcount block."""
        hdr, cs = self._header, self._cs
        if hdr.l1_table_offset <= offset < hdr.l1_table_offset + max(hdr.l1_size * 8, 1):
            return True
        reft_offset, reft_clusters = self._refs.table_clusters_range()
        if reft_offset <= offset < reft_offset + reft_clusters * cs:
            return True
        return offset in set(self._refs.block_offsets())

    def _check_data_offset(self, host: int, guest_cluster: int, entry: int) -> None:
        """Validate a standard cluster's host offset (qcow2.rst "Standard Cluster Descriptor")."""
        if host & (self._cs - 1):
            raise ImageCorruptError(f"{self.path}: L2 entry 0x{entry:x} (guest cluster {guest_cluster}) is not aligned")
        if self._has_data_file:
            if host != guest_cluster << self._cb:
                raise ImageCorruptError(
                    f"{self.path}: data file offset of guest cluster {guest_cluster} != guest offset"
                )
            return
        if host >= self._hf.size:
            raise ImageCorruptError(
                f"{self.path}: L2 entry for guest cluster {guest_cluster} points past the end of the file (0x{host:x})"
            )
        if host >> self._cb in self._metadata:
            raise ImageCorruptError(
                f"{self.path}: L2 entry for guest cluster {guest_cluster} points into metadata (0x{host:x})"
            )

    # -- properties --------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def cluster_size(self) -> int:
        return self._cs

    @property
    def header(self) -> Qcow2Header:
        return self._header

    @property
    def version(self) -> int:
        return self._header.version

    @property
    def backing(self) -> BlockBackend | None:
        return self._backing

    @property
    def backing_filename(self) -> str | None:
        return self._header.backing_file

    @property
    def backing_format(self) -> str | None:
        return self._header.backing_format

    @property
    def data_file_name(self) -> str | None:
        return self._header.data_file

    @property
    def dirty(self) -> bool:
        return bool(self._header.incompatible_features & fmt.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self._header.incompatible_features & fmt.INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self._header.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS)

    @property
    def file_size(self) -> int:
        return self._hf.size

    @property
    def l1_table(self) -> list[int]:
        return list(self._l1)

    @property
    def refcount_table(self) -> list[int]:
        return list(self._refs.table)

    def get_refcount(self, cluster_index: int) -> int:
        with self._lock:
            return self._refs.get(cluster_index)

    def read_cluster_raw(self, host_offset: int, n: int) -> bytes:
        with self._lock:
            return self._hf.pread(host_offset, n)

    def read_l2_table(self, l2_offset: int) -> list[int]:
        with self._lock:
            table = self._l2.tables.get(l2_offset)
            if table is None:
                table = load_u64_table(self._hf.pread(l2_offset, self._cs))
            return list(table)

    # -- header and flush --------------------------------------------------------------------
    def _write_header(self) -> None:
        """Rewrite the header cluster from `self._header` (extensions preserved); caller syncs."""
        self._hf.pwrite(0, serialize(self._header))

    def _on_refcount_table_moved(self, offset: int, clusters: int) -> None:
        old = self._header.refcount_table_offset, self._header.refcount_table_clusters
        self._header.refcount_table_offset = offset
        self._header.refcount_table_clusters = clusters
        self._write_header()
        self._hf.sync()
        self._metadata.update(range(offset >> self._cb, (offset >> self._cb) + clusters))
        self._metadata.difference_update(range(old[0] >> self._cb, (old[0] >> self._cb) + old[1]))

    def _check_open(self) -> None:
        if self._closed:
            raise ImageError(f"{self.path}: image is closed")

    def flush(self) -> None:
        with self._lock:
            self._check_open()
            if self._read_only:
                return
            self._flush_metadata()

    def _flush_metadata(self) -> None:
        refs, hf = self._refs, self._hf
        self._compressed_cursor = 0  # its cluster could be freed and reused after this flush
        wrote_refs = refs.dirty
        refs.write_back()  # syncs: refcounts and all data written so far are durable
        if self._l2.dirty or self._l1_dirty:
            if not wrote_refs:
                hf.sync()
            if self._data is not None:
                self._data.sync()
            self._l2.write_dirty()
            if self._l1_dirty:
                hf.sync()
                hf.pwrite(self._l1_offset, dump_u64_table(self._l1))
                self._l1_dirty = False
            hf.sync()
        elif not wrote_refs:
            hf.sync()
        if refs.apply_pending_frees():
            hf.sync()
        if self._data is not None:
            self._data.sync()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                if not self._read_only:
                    self._flush_metadata()
            finally:
                self._closed = True
                self._close_external()
                self._hf.close()

    def __enter__(self) -> Qcow2Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Qcow2Image({self.path!r}, v{self.version}, {self._size} bytes, cluster {self._cs})"

    def _read_guest(self, offset: int, length: int) -> bytes:
        """Current guest content (for copy-on-write); past the virtual end it reads zeros."""
        buf = bytearray(length)
        self._read_views(offset, [memoryview(buf)], length)
        return bytes(buf)
