"""Whole-image operations: internal snapshots, resize (with L1 growth), rebase, compressed writes.

Each one flushes first. Snapshot create, delete and apply change refcounts and COPIED flags
together, which no in-place order keeps consistent at every write (qcow2.rst "Snapshots": "the
refcount of all L2 tables and clusters reachable from this L1 table must be increased"); they build
the new metadata beside the old and switch to it with one header write (transaction.py). Resize
and rebase order their writes so that a crash leaves leaks at worst: references are added
(refcounts up, synced) before anything points at them, and removed (the pointing structure
rewritten, synced) before refcounts go down; the flush order (flush.py) does that ordering.

Functions of an open Engine; the caller (the Qcow2Image facade) holds the lock and has checked
that the image is open and writable.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter
from typing import TYPE_CHECKING

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.clustermap import load_l1
from hypervisor.block.qcow2.compress import compress
from hypervisor.block.qcow2.engine import Engine
from hypervisor.block.qcow2.refcount import dump_u64_table
from hypervisor.block.qcow2.snapshot_table import (
    SnapshotEntry,
    build_snapshot_table,
    stored_table_size,
    table_size_bound,
)
from hypervisor.block.qcow2.transaction import MetadataTransaction
from hypervisor.block.qcow2.types import SnapshotInfo
from hypervisor.errors import ImageError, ImageFormatError

if TYPE_CHECKING:
    from hypervisor.block.qcow2.header import Qcow2Header


def tree_references(engine: Engine, l1: array) -> Counter[int]:
    """Host clusters referenced through one L1 table (L2 tables and data), with multiplicity."""
    refs: Counter[int] = Counter()
    geo, cmap = engine.geometry, engine.cmap
    cb = geo.cluster_bits
    step = geo.words_per_entry
    for l1_index, l1_entry in enumerate(l1):
        l2_offset = l1_entry & fmt.L1E_OFFSET_MASK
        if not l2_offset:
            continue
        refs[l2_offset >> cb] += 1
        table = cmap.l2_for_walk(l1, l1_index)
        for i in range(0, len(table), step):
            entry = table[i]
            if entry & fmt.OFLAG_COMPRESSED:
                for host, _ in geo.compressed_clusters(entry):
                    refs[host >> cb] += 1
            elif entry & fmt.L2E_OFFSET_MASK and not geo.has_data_file:
                refs[(entry & fmt.L2E_OFFSET_MASK) >> cb] += 1
    return refs


def _logical_l1(l1: array) -> array:
    return array("Q", (e & fmt.L1E_OFFSET_MASK for e in l1))


def _commit_tree(
    engine: Engine,
    txn: MetadataTransaction,
    logical_l1: array,
    snapshots: list[SnapshotEntry],
    move_l1: bool,
    size: int | None = None,
) -> None:
    """Shared tail of the snapshot operations: the new active L1 (exact COPIED flags), a new
    snapshot table, and the transaction's commit; then the parts take the committed state."""
    cmap, hf, hdr = engine.cmap, engine.files.image, engine.header
    new_l1 = txn.active_tree(logical_l1)
    l1_offset = cmap.l1_offset
    if len(new_l1) and (move_l1 or new_l1 != cmap.l1):
        if len(cmap.l1):
            txn.add_area(cmap.l1_offset, len(cmap.l1) * 8, -1)
        l1_offset = txn.allocate(len(new_l1) * 8)
        txn.write(l1_offset, dump_u64_table(new_l1))
    if hdr.nb_snapshots:
        bound = min(table_size_bound(hdr.nb_snapshots), max(0, hf.size - hdr.snapshots_offset))
        stored = hf.pread(hdr.snapshots_offset, bound)
        txn.add_area(hdr.snapshots_offset, stored_table_size(stored, hdr.nb_snapshots, engine.path), -1)
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
    cmap.replace_l1(new_l1, l1_offset)
    engine.snapshots = snapshots
    engine.allocator.reset_compressed_cursor()
    engine.allocator.set_metadata(engine.collect_metadata_clusters())
    if size is not None:
        engine.size = size


# -- snapshots -------------------------------------------------------------------------------
# Each operation is one MetadataTransaction (transaction.py states the order and why): the old
# image stays intact until the header switch, the new one is exact from it on.
def create_snapshot(engine: Engine, name: str) -> SnapshotInfo:
    if engine.geometry.has_data_file:
        raise ImageFormatError(f"{engine.path}: internal snapshots are not possible with an external data file")
    if any(s.name == name or s.id == name for s in engine.snapshots):
        raise ImageError(f"{engine.path}: a snapshot named {name!r} already exists")
    engine.flush()
    cmap = engine.cmap
    now = time.time_ns()
    numeric_ids = [int(s.id) for s in engine.snapshots if s.id.isdigit()]
    entry = SnapshotEntry(
        l1_table_offset=cmap.l1_offset if len(cmap.l1) else 0,
        l1_size=len(cmap.l1),
        id=str(max(numeric_ids, default=0) + 1),
        name=name,
        date_sec=now // 1_000_000_000,
        date_nsec=now % 1_000_000_000,
        vm_clock_nsec=0,
        vm_state_size=0,
        disk_size=engine.size,
        icount=None,
    )
    with MetadataTransaction(engine) as txn:
        # The snapshot keeps the current L1 and L2 tables; the new active L1 references them (or
        # flag-exact copies) once more, and every data cluster once more.
        txn.net.update(tree_references(engine, cmap.l1))
        if len(cmap.l1):
            txn.add_area(cmap.l1_offset, len(cmap.l1) * 8, +1)  # now the snapshot's L1
        _commit_tree(engine, txn, _logical_l1(cmap.l1), [*engine.snapshots, entry], move_l1=True)
    return entry.info()


def delete_snapshot(engine: Engine, name_or_id: str) -> None:
    target = engine.find_snapshot(name_or_id)
    engine.flush()
    with MetadataTransaction(engine) as txn:
        snap_l1 = load_l1(engine.files.image, target.l1_table_offset, target.l1_size)
        for cluster, count in tree_references(engine, snap_l1).items():
            txn.net[cluster] -= count
        if target.l1_size:
            txn.add_area(target.l1_table_offset, target.l1_size * 8, -1)
        remaining = [s for s in engine.snapshots if s is not target]
        _commit_tree(engine, txn, _logical_l1(engine.cmap.l1), remaining, move_l1=False)


def apply_snapshot(engine: Engine, name_or_id: str) -> None:
    target = engine.find_snapshot(name_or_id)
    engine.flush()
    cmap = engine.cmap
    with MetadataTransaction(engine) as txn:
        snap_l1 = load_l1(engine.files.image, target.l1_table_offset, target.l1_size)
        txn.net.update(tree_references(engine, snap_l1))
        for cluster, count in tree_references(engine, cmap.l1).items():
            txn.net[cluster] -= count
        size = target.disk_size or engine.header.size
        entries = max(len(cmap.l1), target.l1_size, engine.header.l1_entries_needed(size))
        logical = _logical_l1(snap_l1)
        logical.extend([0] * (entries - len(logical)))
        _commit_tree(engine, txn, logical, list(engine.snapshots), move_l1=True, size=size)


def read_snapshot_l1(engine: Engine, name_or_id: str) -> list[int]:
    """A snapshot's L1 entries as stored (for the checker)."""
    target = engine.find_snapshot(name_or_id)
    return list(load_l1(engine.files.image, target.l1_table_offset, target.l1_size))


# -- resize ----------------------------------------------------------------------------------
def _grow_l1(engine: Engine, entries: int) -> None:
    """Move the L1 table to new clusters with `entries` entries: the flush order writes it, then
    the header pointing at it, then frees the old table."""
    cmap, alloc = engine.cmap, engine.allocator
    old_offset, old_len = cmap.l1_offset, len(cmap.l1) * 8
    grown = array("Q", cmap.l1)
    grown.extend([0] * (entries - len(grown)))
    cmap.move_l1(grown, alloc.allocate_metadata(len(grown) * 8))
    if old_len:
        alloc.free_area_later(old_offset, old_len)
    engine.flush()


def resize(engine: Engine, new_size: int) -> None:
    if new_size < 0 or new_size % 512:
        raise ImageError(f"{engine.path}: new size {new_size} is not a multiple of 512")
    old_size = engine.size
    cs = engine.geometry.cluster_size
    engine.flush()
    engine.mapping_watch.changed()  # the virtual size a cached mapping may serve changes
    if new_size > old_size:
        needed = engine.header.l1_entries_needed(new_size)
        if needed > len(engine.cmap.l1):
            if needed * 8 > fmt.MAX_L1_BYTES:
                raise ImageError(f"{engine.path}: {new_size} bytes needs an L1 table over QEMU's 32 MiB limit")
            _grow_l1(engine, needed)
        engine.header.size = new_size
        engine.write_header_durably()
        engine.size = new_size
        # Stale bytes past the old end (partial last cluster, or a longer backing file) must not
        # show through: the new area reads as zeros, as with qemu-img resize.
        stale_end = -(-old_size // cs) * cs
        backing = engine.files.backing
        if backing is not None:
            stale_end = max(stale_end, backing.size)
        stale_end = min(stale_end, new_size)
        if stale_end > old_size:
            engine.writer.zero_range(old_size, stale_end - old_size)
            engine.flush_if_full()
    elif new_size < old_size:
        engine.header.size = new_size
        engine.write_header_durably()
        engine.size = new_size
        for guest_cluster in range(-(-new_size // cs), -(-old_size // cs)):
            engine.writer.clear_entry(guest_cluster)
    engine.flush()


# -- rebase ----------------------------------------------------------------------------------
def set_backing(engine: Engine, filename: str | None, fmt_name: str | None = None) -> None:
    """Rewrite the backing file name and format in the header (no data is copied)."""
    hdr = engine.header
    if filename and hdr.autoclear_features & fmt.AUTOCLEAR_DATA_FILE_RAW:
        raise ImageFormatError(f"{engine.path}: a raw external data file excludes a backing file")
    engine.flush()
    new_backing = None
    if filename and engine.allow_backing:  # refuse a name that cannot be opened, before writing
        new_backing = engine.open_backing(filename, fmt_name)
    old_name, old_format = hdr.backing_file, hdr.extension(fmt.EXT_BACKING_FORMAT)
    hdr.backing_file = filename or None
    hdr.set_extension(fmt.EXT_BACKING_FORMAT, fmt_name.encode() if filename and fmt_name else None)
    try:
        engine.write_header()
    except ImageError:
        hdr.backing_file = old_name
        hdr.set_extension(fmt.EXT_BACKING_FORMAT, old_format)
        if new_backing is not None:
            new_backing.close()
        raise
    engine.files.image.sync()
    if engine.files.backing is not None:
        engine.files.backing.close()
    engine.files.backing = new_backing


# -- compressed writes -----------------------------------------------------------------------
def write_compressed(engine: Engine, offset: int, data: bytes) -> None:
    """Store one whole guest cluster compressed (for `convert -c`); the cluster must be
    unallocated. Data that does not shrink is stored uncompressed."""
    geo = engine.geometry
    cs = geo.cluster_size
    if offset % cs or offset >= engine.size or len(data) != min(cs, engine.size - offset):
        raise ImageError(f"{engine.path}: compressed writes take one whole cluster at a cluster boundary")
    if geo.has_data_file:
        raise ImageFormatError(f"{engine.path}: no compressed clusters with an external data file")
    guest_cluster = offset >> geo.cluster_bits
    entry, bitmap = engine.cmap.entry_words(guest_cluster)
    if entry & ~fmt.OFLAG_ZERO or bitmap & fmt.SUBCLUSTER_ALLOC_MASK:
        raise ImageError(f"{engine.path}: compressed write to an allocated cluster")
    full = bytes(data).ljust(cs, b"\0")
    packed = compress(full, engine.header.compression_type)
    if len(packed) >= cs - fmt.COMPRESSED_SECTOR_SIZE:
        engine.writer.write_views(offset, [memoryview(data)], len(data))
        return
    engine.writer.write_compressed_cluster(guest_cluster, packed)
