"""qcow2 images: a QEMU-compatible reader and writer (docs/interop/qcow2.rst).

Public API (what the device layer and the `pyhv image` tools use)::

    from hypervisor.block.qcow2 import Qcow2Image, Extent, SnapshotInfo

    img = Qcow2Image.open(path, read_only=False, allow_backing=True, snapshot=None)
        # snapshot="name-or-id" opens that internal snapshot read-only.
        # allow_backing=False: the backing/data files named in the image are not opened; metadata
        # (header, map_extents, snapshots, refcounts) still works, reads that need them raise
        # ImageError. Errors: ImageFormatError (not qcow2, unsupported feature, encrypted),
        # ImageCorruptError (metadata contradicts itself), ImageLockedError, ImageError.

    # BlockBackend protocol (hypervisor/block/backend.py)
    img.size, img.read_only
    img.readinto(offset, [memoryview, ...]);  img.write(offset, [buffer, ...])
    img.flush();  img.discard(offset, length);  img.write_zeroes(offset, length);  img.close()

    # Image properties
    img.path, img.cluster_size, img.header (header.Qcow2Header: every field, extensions,
    feature_names, refcount_bits, extended_l2, compression_type, ...), img.version
    img.backing (BlockBackend | None), img.backing_filename (str | None, as stored),
    img.backing_format (str | None), img.data_file_name (str | None)
    img.dirty (bool), img.corrupt (bool), img.lazy_refcounts (bool)

    # Allocation map, snapshots, resize, rebase
    img.map_extents() -> Iterator[Extent]      # Extent(start, length, kind, host_offset, compressed, depth)
    img.layer_extents(start, end, depth) -> list[Extent]   # unmerged, this image as layer `depth`
    img.snapshots() -> list[SnapshotInfo]       # id, name, vm_state_size, date_sec, date_nsec, vm_clock_nsec,
                                                # icount, disk_size, l1_table_offset, l1_size
    img.create_snapshot(name);  img.delete_snapshot(name_or_id);  img.apply_snapshot(name_or_id)
    img.resize(new_size)                        # grow; shrink frees clusters past the new end
    img.set_backing(filename | None, fmt | None)  # header rewrite only (rebase -u); reopens backing
    img.write_compressed(offset, data)          # one whole cluster, for `convert -c`

    # Low-level accessors for the checker
    img.read_cluster_raw(host_offset, n) -> bytes   # n bytes of the image file at host_offset
    img.l1_table -> list[int]                        # active L1 entries as stored (flags included)
    img.refcount_table -> list[int]                  # refcount table entries as stored
    img.get_refcount(cluster_index) -> int
    img.read_l2_table(l2_offset) -> list[int]        # entries as stored (2 words each with extended L2)
    img.file_size -> int                             # bytes of the image file

    img.refcounts -> refcount.Refcounts              # the engine's refcount structure (block cache)

    # Plain clusters, for a fast path that does their I/O itself (plainmap.py; virtio-blk's C path)
    img.lock                                         # held around that I/O and around every change
    img.watch_mapping(listener) -> stop              # listener() before any L1/L2 change, and on close
    img.plain_layout() -> PlainLayout | None         # fd, cluster_bits, disk_size, file_size, writable
    img.plain_runs(offset, length) -> [PlainRun]     # (first guest cluster, host offsets | WRITABLE)

    # A read-write open of a dirty image repairs it first through the checker
    # (check.check_image(..., repair="all")), as QEMU's qcow2_open does.

Inside (one direction, format -> tables -> engine -> open): geometry.py (the shape, a value),
allocator.py (refcounts, metadata clusters, compressed bytes), clustermap.py (L1, L2 cache,
validation), plainmap.py (what a cache of host offsets may hold, and its change notices),
flush.py (the order metadata reaches the disk), read.py / write.py (Reader, Writer),
engine.py (the parts wired together, open and repair), ops.py and transaction.py (snapshots,
resize, rebase), image.py (the Qcow2Image facade).
"""

from __future__ import annotations

from hypervisor.block.qcow2.image import Qcow2Image
from hypervisor.block.qcow2.types import Extent, SnapshotInfo

__all__ = ["Qcow2Image", "Extent", "SnapshotInfo"]
