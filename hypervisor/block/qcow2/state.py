"""The state Qcow2Image and its parts (read.py, write.py, ops.py) share, declared in one place.

Qcow2Image is one object assembled from mixins; each mixin reads and changes the attributes below,
which `Qcow2Image.__init__` (image.py) sets. Declaring them here, with their types and meaning,
is the contract between the parts: every part type-checks against it alone, without knowing the
others. The declarations are annotations only (no class attributes, no slots), so they cost
nothing at run time. The method signatures under TYPE_CHECKING are the ones a part (or
rebuild.py and transaction.py, which take any ImageState) calls on another part; they exist only
for the type checker, the real ones are found through Qcow2Image's MRO.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import threading
    from array import array
    from collections import Counter

    from hypervisor.block.backend import BlockBackend
    from hypervisor.block.qcow2.bitmaps import BitmapDirectory
    from hypervisor.block.qcow2.header import Qcow2Header
    from hypervisor.block.qcow2.hostfile import HostFile
    from hypervisor.block.qcow2.l2cache import L2Cache
    from hypervisor.block.qcow2.refcount import Refcounts
    from hypervisor.block.qcow2.snapshot_table import SnapshotEntry


class ImageState:
    """Attributes of an open qcow2 image. Guarded by `_lock`; set up by Qcow2Image.__init__."""

    # -- files and how the image was opened --------------------------------------------------
    path: str
    _lock: threading.RLock  # every public call holds it
    _closed: bool
    _hf: HostFile  # the image file itself
    _read_only: bool
    _allow_backing: bool  # open the backing file and external data file it names
    _chain: tuple[str, ...]  # real paths of the backing chain so far (loop detection)
    _backing: BlockBackend | None  # the opened backing file, if any
    _data: HostFile | None  # the external data file; set only if `_has_data_file`
    _prepared_for_write: bool  # bitmaps marked in use, unknown autoclear bits cleared
    _decompressed: tuple[int, bytes] | None  # (compressed L2 entry, its data): last one read
    _compressed_cursor: int  # end of the last compressed write inside its cluster, or 0

    # -- header and geometry (qcow2.rst "Header", "Cluster mapping") -------------------------
    _header: Qcow2Header  # the header as in the file (changed in memory, then rewritten)
    _cb: int  # cluster_bits
    _cs: int  # cluster size in bytes
    _extl2: bool  # extended L2 entries (subclusters)
    _l2_entries: int  # entries per L2 table
    _l2_bits: int  # log2(_l2_entries)
    _l2_mask: int  # _l2_entries - 1
    _ext_shift: int  # log2 of 64-bit words per L2 entry (1 with extended L2)
    _sc_bits: int  # log2 of the subcluster size
    _v3: bool  # version 3 (zero clusters, feature bits)
    _has_data_file: bool  # incompatible feature "external data file"

    # -- tables ------------------------------------------------------------------------------
    _refs: Refcounts  # refcount table and blocks, with the deferred frees
    _l1_offset: int  # where the active L1 table lives
    _l1: array[int]  # the active (or opened snapshot's) L1 table, native-endian
    _l1_dirty: bool  # _l1 differs from the file
    _snapshots: list[SnapshotEntry]
    _bitmaps: BitmapDirectory | None
    _size: int  # virtual disk size in bytes
    _snapshot: SnapshotEntry | None  # the snapshot opened read-only, if any
    _l2: L2Cache
    # Host cluster indexes holding metadata: a data entry pointing into one is corrupt. Changed
    # where metadata clusters are allocated (write.py, ops.py) or moved (image.py).
    _metadata: set[int]

    if TYPE_CHECKING:
        # image.py
        def _check_open(self) -> None: ...
        def _open_backing(self, name: str, backing_format: str | None) -> BlockBackend: ...
        def _load_l1(self, offset: int, size: int) -> array[int]: ...
        def _find_snapshot(self, name_or_id: str) -> SnapshotEntry: ...
        def _collect_metadata_clusters(self) -> set[int]: ...
        def _l2_table(self, l1_index: int) -> array[int] | None: ...
        def _l2_for_walk(self, l1: array[int], l1_index: int) -> array[int]: ...
        def _check_data_offset(self, host: int, guest_cluster: int, entry: int) -> None: ...
        def _write_header(self) -> None: ...
        def _on_refcount_table_moved(self, offset: int, clusters: int) -> None: ...
        def _flush_metadata(self) -> None: ...
        def _read_guest(self, offset: int, length: int) -> bytes: ...

        # read.py
        def _read_views(self, offset: int, views: list[memoryview], length: int) -> None: ...
        def _entry_words(self, guest_cluster: int) -> tuple[int, int]: ...

        # write.py
        def _prepare_first_write(self) -> None: ...
        def _write_views(self, offset: int, views: list[memoryview], length: int) -> None: ...
        def _compressed_clusters(self, entry: int) -> list[tuple[int, int]]: ...
        def _note_allocated(self, host: int) -> None: ...
        def _l2_for_write(self, guest_cluster: int) -> tuple[array[int], int]: ...
        def _zero_range(self, offset: int, length: int, discard: bool) -> None: ...
        def _drop_cluster_reference(self, entry: int) -> None: ...

        # ops.py
        def _tree_references(self, l1: array[int]) -> Counter[int]: ...
        def _set_copied_flags(self) -> None: ...
