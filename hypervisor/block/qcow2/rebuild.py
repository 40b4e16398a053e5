"""Refcount rebuild: recount every reference and write a fresh refcount structure.

Used on a read-write open of an image whose dirty bit is set (qcow2.rst: "If this bit is set then
refcounts may be inconsistent, make sure to scan L1/L2 tables to repair refcounts before
accessing the image"). It works on the open image's state; `check -r all` rebuilds the refcounts
of an image file without opening it as an engine image (check.rebuild_refcount_structure). Both
size the new structure with refcount.refcount_structure_size. The new table and blocks go after
every cluster in use, are written and synced before the header points at them, and the dirty
bit is cleared last; the old structure simply stops being referenced.
"""

from __future__ import annotations

import logging
from array import array
from collections import Counter
from typing import TYPE_CHECKING

from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2.bitmaps import load_directory, referenced_clusters
from hypervisor.block.qcow2.refcount import RefcountBlockCodec, Refcounts, dump_u64_table, refcount_structure_size
from hypervisor.block.qcow2.snapshot_table import stored_table_size, table_size_bound
from hypervisor.errors import ImageError

if TYPE_CHECKING:
    from hypervisor.block.qcow2.state import ImageState

log = logging.getLogger(__name__)


def count_references(image: ImageState) -> Counter[int]:
    """How many times each host cluster is referenced, refcount structures excluded."""
    cb, cs, hdr = image._cb, image._cs, image._header
    refs: Counter[int] = Counter()

    def add_area(offset: int, length: int) -> None:
        for cluster in range(offset >> cb, (offset + max(length, 1) + cs - 1) >> cb):
            refs[cluster] += 1

    refs[0] += 1  # the header cluster
    add_area(image._l1_offset, len(image._l1) * 8)
    refs.update(image._tree_references(image._l1))
    if hdr.nb_snapshots:
        # The table's clusters are what is stored, which can be longer than a rebuilt table
        # (extra data of QEMU before 5.0): count the stored size, as ops.py frees it.
        bound = min(table_size_bound(hdr.nb_snapshots), max(0, image._hf.size - hdr.snapshots_offset))
        stored = image._hf.pread(hdr.snapshots_offset, bound)
        add_area(hdr.snapshots_offset, stored_table_size(stored, hdr.nb_snapshots, image.path))
    for snap in image._snapshots:
        if snap.l1_size:
            add_area(snap.l1_table_offset, snap.l1_size * 8)
        refs.update(image._tree_references(image._load_l1(snap.l1_table_offset, snap.l1_size)))
    ext = hdr.extension(fmt.EXT_BITMAPS)
    if ext is not None:
        directory = load_directory(image._hf, ext, cs)
        if directory is not None:
            for offset, count in referenced_clusters(image._hf, directory, cs):
                for cluster in range(offset >> cb, (offset >> cb) + count):
                    refs[cluster] += 1
    return refs


def rebuild_open_image_refcounts(image: ImageState) -> None:
    """Replace an open image's refcount structure with one recounted from its references, and
    its in-memory refcounts with the new ones (the checker's file-level rebuild is
    check.rebuild_refcount_structure)."""
    if image._read_only:
        raise ImageError(f"{image.path}: cannot rebuild refcounts of a read-only image")
    cb, cs, hdr = image._cb, image._cs, image._header
    image._l2.clear()
    refs = count_references(image)
    codec = RefcountBlockCodec(hdr.refcount_order, cs)
    overflow = [c for c, n in refs.items() if n > codec.max_value]
    if overflow:
        raise ImageError(f"{image.path}: cluster {overflow[0]} has more references than refcount_bits allows")
    first_free = max(max(refs, default=0) + 1, -(-image._hf.size // cs))
    # Table + blocks go at first_free and count every cluster before them (in use or not: this
    # writes every block up to the end) and themselves.
    size = refcount_structure_size(first_free, cs, codec.bits)
    blocks, table_clusters = size.blocks, size.table_clusters
    end = first_free + size.clusters
    table_offset = first_free << cb
    for cluster in range(first_free, first_free + table_clusters + blocks):
        refs[cluster] += 1
    table = [0] * (table_clusters * cs // 8)
    for block_index in range(blocks):
        block_offset = (first_free + table_clusters + block_index) << cb
        table[block_index] = block_offset
        values = codec.empty()
        base = block_index * codec.entries
        for cluster in range(base, min(base + codec.entries, end)):
            values[cluster - base] = refs.get(cluster, 0)
        image._hf.pwrite(block_offset, codec.encode(values))
    image._hf.pwrite(table_offset, dump_u64_table(array("Q", table)))
    image._hf.sync()
    hdr.refcount_table_offset = table_offset
    hdr.refcount_table_clusters = table_clusters
    hdr.incompatible_features &= ~fmt.INCOMPAT_DIRTY
    image._write_header()
    image._hf.sync()
    image._refs = Refcounts(
        image._hf, cb, hdr.refcount_order, table_offset, table_clusters, image._on_refcount_table_moved
    )
    image._metadata = image._collect_metadata_clusters()
    image._set_copied_flags()
    image._flush_metadata()
    log.info("%s: refcounts rebuilt (%d clusters in use)", image.path, len(refs))
