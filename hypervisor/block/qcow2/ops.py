"""Whole-image operations: internal snapshots, resize (with L1 growth), rebase, compressed writes.

Each one flushes first. Snapshot create, delete and apply change refcounts and COPIED flags
together, which no in-place order keeps consistent at every write (qcow2.rst "Snapshots": "the
refcount of all L2 tables and clusters reachable from this L1 table must be increased"); they build
the new metadata beside the old and switch to it with one header write (transaction.py). Resize
and rebase order their writes so that a crash leaves leaks at worst: references are added
(refcounts up, synced) before anything points at them, and removed (the pointing structure
rewritten, synced) before refcounts go down.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter
from typing import TYPE_CHECKING

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.compress import compress
from hypervisor.block.qcow2.refcount import dump_u64_table, load_u64_table
from hypervisor.block.qcow2.snapshot_table import (
    SnapshotEntry,
    build_snapshot_table,
    stored_table_size,
    table_size_bound,
)
from hypervisor.block.qcow2.state import ImageState
from hypervisor.block.qcow2.transaction import MetadataTransaction
from hypervisor.block.qcow2.types import SnapshotInfo
from hypervisor.errors import ImageError, ImageFormatError

if TYPE_CHECKING:
    from hypervisor.block.qcow2.header import Qcow2Header


class OpsMixin(ImageState):
    # -- helpers -----------------------------------------------------------------------------
    def _check_writable_image(self) -> None:
        self._check_open()
        if self._read_only:
            raise ImageError(f"{self.path}: image is open read-only")
        if not self._prepared_for_write:
            self._prepare_first_write()

    def _tree_references(self, l1: array) -> Counter[int]:
        """Host clusters referenced through one L1 table (L2 tables and data), with multiplicity."""
        refs: Counter[int] = Counter()
        cb = self._cb
        step = 1 << self._ext_shift
        for l1_index, l1_entry in enumerate(l1):
            l2_offset = l1_entry & fmt.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            refs[l2_offset >> cb] += 1
            table = self._l2_for_walk(l1, l1_index)
            for i in range(0, len(table), step):
                entry = table[i]
                if entry & fmt.OFLAG_COMPRESSED:
                    for host, _ in self._compressed_clusters(entry):
                        refs[host >> cb] += 1
                elif entry & fmt.L2E_OFFSET_MASK and not self._has_data_file:
                    refs[(entry & fmt.L2E_OFFSET_MASK) >> cb] += 1
        return refs

    def _set_copied_flags(self) -> None:
        """Make COPIED exact in the active L1 and its L2 tables (refcount == 1)."""
        step = 1 << self._ext_shift
        get = self._refs.get
        for l1_index, l1_entry in enumerate(self._l1):
            l2_offset = l1_entry & fmt.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            want = l2_offset | (fmt.OFLAG_COPIED if get(l2_offset >> self._cb) == 1 else 0)
            if want != l1_entry:
                self._l1[l1_index] = want
                self._l1_dirty = True
            table = self._l2_for_walk(self._l1, l1_index)
            changed = False
            for i in range(0, len(table), step):
                entry = table[i]
                host = entry & fmt.L2E_OFFSET_MASK
                if entry & fmt.OFLAG_COMPRESSED or not host or self._has_data_file:
                    continue
                new = entry & ~fmt.OFLAG_COPIED
                if get(host >> self._cb) == 1:
                    new |= fmt.OFLAG_COPIED
                if new != entry:
                    table[i] = new
                    changed = True
            if changed:
                self._l2.mark_dirty(l2_offset)

    def _allocate_bytes(self, length: int) -> int:
        clusters = max(1, -(-length // self._cs))
        offset = self._refs.allocate(clusters)
        self._metadata.update(range(offset >> self._cb, (offset >> self._cb) + clusters))
        return offset

    def _free_area(self, offset: int, length: int) -> None:
        clusters = max(1, -(-length // self._cs))
        self._refs.free_later(offset, clusters)

    def _commit_tree(
        self,
        txn: MetadataTransaction,
        logical_l1: array,
        snapshots: list[SnapshotEntry],
        move_l1: bool,
        size: int | None = None,
    ) -> tuple[array, int]:
        """Shared tail of the snapshot operations: the new active L1 (exact COPIED flags), a new
        snapshot table, and the transaction's commit. Returns the new L1 and its offset."""
        new_l1 = txn.active_tree(logical_l1)
        l1_offset = self._l1_offset
        if len(new_l1) and (move_l1 or new_l1 != self._l1):
            if len(self._l1):
                txn.add_area(self._l1_offset, len(self._l1) * 8, -1)
            l1_offset = txn.allocate(len(new_l1) * 8)
            txn.write(l1_offset, dump_u64_table(new_l1))
        hdr = self._header
        if hdr.nb_snapshots:
            bound = min(table_size_bound(hdr.nb_snapshots), max(0, self._hf.size - hdr.snapshots_offset))
            stored = self._hf.pread(hdr.snapshots_offset, bound)
            txn.add_area(hdr.snapshots_offset, stored_table_size(stored, hdr.nb_snapshots, self.path), -1)
        raw = build_snapshot_table(snapshots)
        table_offset = txn.allocate(len(raw)) if snapshots else 0
        if snapshots:
            txn.write(table_offset, raw)

        def switch(header: Qcow2Header) -> None:
            header.l1_table_offset = l1_offset
            header.l1_size = len(new_l1)
            header.nb_snapshots = len(snapshots)
            header.snapshots_offset = table_offset
            if size is not None:
                header.size = size

        txn.commit(switch)
        self._l1, self._l1_offset, self._l1_dirty = new_l1, l1_offset, False
        self._snapshots = snapshots
        self._l2.clear()
        self._compressed_cursor = 0
        self._metadata = self._collect_metadata_clusters()
        if size is not None:
            self._size = size
        return new_l1, l1_offset

    # -- snapshots ---------------------------------------------------------------------------
    # Each operation is one MetadataTransaction (transaction.py states the order and why): the
    # old image stays intact until the header switch, the new one is exact from it on.
    def snapshots(self) -> list[SnapshotInfo]:
        with self._lock:
            return [entry.info() for entry in self._snapshots]

    def create_snapshot(self, name: str) -> SnapshotInfo:
        with self._lock:
            self._check_writable_image()
            if self._has_data_file:
                raise ImageFormatError(f"{self.path}: internal snapshots are not possible with an external data file")
            if any(s.name == name or s.id == name for s in self._snapshots):
                raise ImageError(f"{self.path}: a snapshot named {name!r} already exists")
            self._flush_metadata()
            now = time.time_ns()
            numeric_ids = [int(s.id) for s in self._snapshots if s.id.isdigit()]
            entry = SnapshotEntry(
                l1_table_offset=self._l1_offset if len(self._l1) else 0,
                l1_size=len(self._l1),
                id=str(max(numeric_ids, default=0) + 1),
                name=name,
                date_sec=now // 1_000_000_000,
                date_nsec=now % 1_000_000_000,
                vm_clock_nsec=0,
                vm_state_size=0,
                disk_size=self._size,
                icount=None,
            )
            with MetadataTransaction(self) as txn:
                # The snapshot keeps the current L1 and L2 tables; the new active L1 references
                # them (or flag-exact copies) once more, and every data cluster once more.
                txn.net.update(self._tree_references(self._l1))
                if len(self._l1):
                    txn.add_area(self._l1_offset, len(self._l1) * 8, +1)  # now the snapshot's L1
                logical = array("Q", (e & fmt.L1E_OFFSET_MASK for e in self._l1))
                self._commit_tree(txn, logical, [*self._snapshots, entry], move_l1=True)
            return entry.info()

    def delete_snapshot(self, name_or_id: str) -> None:
        with self._lock:
            self._check_writable_image()
            target = self._find_snapshot(name_or_id)
            self._flush_metadata()
            with MetadataTransaction(self) as txn:
                snap_l1 = self._load_l1(target.l1_table_offset, target.l1_size)
                for cluster, count in self._tree_references(snap_l1).items():
                    txn.net[cluster] -= count
                if target.l1_size:
                    txn.add_area(target.l1_table_offset, target.l1_size * 8, -1)
                logical = array("Q", (e & fmt.L1E_OFFSET_MASK for e in self._l1))
                self._commit_tree(txn, logical, [s for s in self._snapshots if s is not target], move_l1=False)

    def apply_snapshot(self, name_or_id: str) -> None:
        with self._lock:
            self._check_writable_image()
            target = self._find_snapshot(name_or_id)
            self._flush_metadata()
            with MetadataTransaction(self) as txn:
                snap_l1 = self._load_l1(target.l1_table_offset, target.l1_size)
                txn.net.update(self._tree_references(snap_l1))
                for cluster, count in self._tree_references(self._l1).items():
                    txn.net[cluster] -= count
                size = target.disk_size or self._header.size
                entries = max(len(self._l1), target.l1_size, self._header.l1_entries_needed(size))
                logical = array("Q", (e & fmt.L1E_OFFSET_MASK for e in snap_l1))
                logical.extend([0] * (entries - len(logical)))
                self._commit_tree(txn, logical, list(self._snapshots), move_l1=True, size=size)

    # -- resize ------------------------------------------------------------------------------
    def _relocate_l1(self, new_l1: array) -> None:
        """Write `new_l1` to new clusters, point the header at it, free the old table."""
        old_offset, old_len = self._l1_offset, len(self._l1) * 8
        offset = self._allocate_bytes(len(new_l1) * 8)
        self._refs.write_back()
        self._hf.pwrite(offset, dump_u64_table(new_l1))
        self._hf.sync()
        self._header.l1_table_offset = offset
        self._header.l1_size = len(new_l1)
        self._write_header()
        self._hf.sync()
        self._l1_offset = offset
        self._l1 = new_l1
        if old_len:
            self._free_area(old_offset, old_len)

    def resize(self, new_size: int) -> None:
        with self._lock:
            self._check_writable_image()
            if new_size < 0 or new_size % 512:
                raise ImageError(f"{self.path}: new size {new_size} is not a multiple of 512")
            old_size = self._size
            self._flush_metadata()
            if new_size > old_size:
                needed = self._header.l1_entries_needed(new_size)
                if needed > len(self._l1):
                    if needed * 8 > fmt.MAX_L1_BYTES:
                        raise ImageError(f"{self.path}: {new_size} bytes needs an L1 table over QEMU's 32 MiB limit")
                    grown = array("Q", self._l1)
                    grown.extend([0] * (needed - len(grown)))
                    self._relocate_l1(grown)
                self._header.size = new_size
                self._write_header()
                self._hf.sync()
                self._size = new_size
                # Stale bytes past the old end (partial last cluster, or a longer backing file) must
                # not show through: the new area reads as zeros, as with qemu-img resize.
                stale_end = -(-old_size // self._cs) * self._cs
                if self._backing is not None:
                    stale_end = max(stale_end, self._backing.size)
                stale_end = min(stale_end, new_size)
                if stale_end > old_size:
                    self._zero_range(old_size, stale_end - old_size, discard=False)
            elif new_size < old_size:
                self._header.size = new_size
                self._write_header()
                self._hf.sync()
                self._size = new_size
                first_gone = -(-new_size // self._cs)
                for guest_cluster in range(first_gone, -(-old_size // self._cs)):
                    if self._l2_table(guest_cluster >> self._l2_bits) is None:
                        continue
                    entry, _ = self._entry_words(guest_cluster)
                    if entry or self._extl2:
                        table, index = self._l2_for_write(guest_cluster)
                        self._drop_cluster_reference(entry)
                        table[index] = 0
                        if self._extl2:
                            table[index + 1] = 0
                        self._l2.mark_dirty(self._l1[guest_cluster >> self._l2_bits] & fmt.L1E_OFFSET_MASK)
            self._flush_metadata()

    # -- rebase ------------------------------------------------------------------------------
    def set_backing(self, filename: str | None, fmt_name: str | None = None) -> None:
        """Rewrite the backing file name and format in the header (no data is copied)."""
        with self._lock:
            self._check_writable_image()
            if filename and self._header.autoclear_features & fmt.AUTOCLEAR_DATA_FILE_RAW:
                raise ImageFormatError(f"{self.path}: a raw external data file excludes a backing file")
            self._flush_metadata()
            new_backing = None
            if filename and self._allow_backing:  # refuse a name that cannot be opened, before writing
                new_backing = self._open_backing(filename, fmt_name)
            hdr = self._header
            old_name, old_format = hdr.backing_file, hdr.extension(fmt.EXT_BACKING_FORMAT)
            hdr.backing_file = filename or None
            hdr.set_extension(fmt.EXT_BACKING_FORMAT, fmt_name.encode() if filename and fmt_name else None)
            try:
                self._write_header()
            except ImageError:
                hdr.backing_file = old_name
                hdr.set_extension(fmt.EXT_BACKING_FORMAT, old_format)
                if new_backing is not None:
                    new_backing.close()
                raise
            self._hf.sync()
            if self._backing is not None:
                self._backing.close()
            self._backing = new_backing

    # -- compressed writes -------------------------------------------------------------------
    def write_compressed(self, offset: int, data: bytes) -> None:
        """Store one whole guest cluster compressed (for `convert -c`); the cluster must be
        unallocated. Data that does not shrink is stored uncompressed."""
        with self._lock:
            self._check_writable_image()
            cs = self._cs
            if offset % cs or offset >= self._size or len(data) != min(cs, self._size - offset):
                raise ImageError(f"{self.path}: compressed writes take one whole cluster at a cluster boundary")
            if self._has_data_file:
                raise ImageFormatError(f"{self.path}: no compressed clusters with an external data file")
            guest_cluster = offset >> self._cb
            entry, bitmap = self._entry_words(guest_cluster)
            if entry & ~fmt.OFLAG_ZERO or bitmap & fmt.SUBCLUSTER_ALLOC_MASK:
                raise ImageError(f"{self.path}: compressed write to an allocated cluster")
            full = bytes(data).ljust(cs, b"\0")
            packed = compress(full, self._header.compression_type)
            if len(packed) >= cs - fmt.COMPRESSED_SECTOR_SIZE:
                self._write_views(offset, [memoryview(data)], len(data))
                return
            host = self._compressed_cursor_take(len(packed))
            self._hf.pwrite(host, packed)
            table, index = self._l2_for_write(guest_cluster)
            table[index] = fmt.compressed_entry(host, len(packed), self._cb)
            if self._extl2:
                table[index + 1] = 0
            self._l2.mark_dirty(self._l1[guest_cluster >> self._l2_bits] & fmt.L1E_OFFSET_MASK)

    def _compressed_cursor_take(self, length: int) -> int:
        """Byte-granular space for compressed data; a host cluster shared by several compressed
        clusters holds one reference per compressed cluster (QEMU qcow2_alloc_bytes)."""
        cursor = getattr(self, "_compressed_cursor", 0)
        if cursor and (cursor & (self._cs - 1)) + length <= self._cs and self._refs.get(cursor >> self._cb):
            self._refs.change(cursor >> self._cb, +1)
            host = cursor
        else:
            clusters = -(-length // self._cs)
            host = self._refs.allocate(clusters)
            self._note_allocated(host)
        end = host + length
        self._compressed_cursor = end if end & (self._cs - 1) else 0
        return host

    def read_snapshot_l1(self, name_or_id: str) -> list[int]:
        """A snapshot's L1 entries as stored (for the checker)."""
        with self._lock:
            target = self._find_snapshot(name_or_id)
            return list(load_u64_table(self._hf.pread(target.l1_table_offset, target.l1_size * 8)))
