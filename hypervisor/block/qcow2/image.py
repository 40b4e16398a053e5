"""Qcow2Image: the BlockBackend facade over an open qcow2 engine.

It opens the file, holds the image's lock around every public call, checks that a call is allowed
(open, writable, inside the disk) and hands it to the part that does it: the reader and writer
(read.py, write.py), the whole-image operations (ops.py), or the engine's parts (engine.py) for
properties and the checker's low-level accessors. The order in which metadata reaches the disk is
flush.py's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from hypervisor.block import fileio
from hypervisor.block.backend import BlockBackend
from hypervisor.block.qcow2 import format as fmt
from hypervisor.block.qcow2 import ops
from hypervisor.block.qcow2.engine import Engine
from hypervisor.block.qcow2.header import Qcow2Header
from hypervisor.block.qcow2.hostfile import HostFile
from hypervisor.block.qcow2.plainmap import PlainRun, plain_runs
from hypervisor.block.qcow2.refcount import Refcounts, load_u64_table
from hypervisor.block.qcow2.types import Extent, SnapshotInfo
from hypervisor.block.raw import open_image_fd
from hypervisor.errors import ImageError


def _open_qcow2_backing(path: str, chain: tuple[str, ...]) -> BlockBackend:
    """A qcow2 backing file: read-only, opening its own backing files, with the chain down to it."""
    return Qcow2Image.open(path, read_only=True, allow_backing=True, _chain=chain)


class PlainLayout(NamedTuple):
    """What a cache of plain clusters needs to do I/O itself (see Qcow2Image.plain_layout)."""

    fd: int  # the image file (plain clusters are in it: no external data file)
    cluster_bits: int
    disk_size: int  # the current virtual size: nothing at or past it is plain
    file_size: int  # the image file's size: no plain byte lies past it
    writable: bool  # open read-write and prepared for writing: COPIED entries are writable in place


class Qcow2Image:
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
        self.path = path
        self._lock = threading.RLock()
        self._closed = False
        self._read_only = read_only
        self._hf = HostFile(fd, path, read_only)
        self._engine = Engine(self._hf, read_only, allow_backing, snapshot, chain, _open_qcow2_backing)

    # -- checks ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ImageError(f"{self.path}: image is closed")

    def _check_writable_image(self) -> Engine:
        self._check_open()
        if self._read_only:
            raise ImageError(f"{self.path}: image is open read-only")
        engine = self._engine
        if not engine.prepared_for_write:
            engine.prepare_for_write()
        return engine

    def _check_writable(self, offset: int, length: int) -> Engine:
        """_check_writable_image plus the range and the data file (inlined: every write pays it)."""
        if self._closed:
            raise ImageError(f"{self.path}: image is closed")
        if self._read_only:
            raise ImageError(f"{self.path}: image is open read-only")
        engine = self._engine
        if not engine.prepared_for_write:
            engine.prepare_for_write()
        if offset < 0 or length < 0 or offset + length > engine.size:
            raise ValueError(f"{self.path}: request [{offset}, +{length}) outside the disk ({engine.size} bytes)")
        if engine.geometry.has_data_file and engine.files.data is None:
            raise ImageError(f"{self.path}: external data file not opened (not allowed)")
        return engine

    # -- BlockBackend ------------------------------------------------------------------------
    def readinto(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = fileio.as_byte_views(buffers)
        length = sum(view.nbytes for view in views)
        engine = self._engine
        if offset < 0 or offset + length > engine.size:
            raise ValueError(f"{self.path}: read [{offset}, +{length}) outside the disk ({engine.size} bytes)")
        with self._lock:
            if self._closed:
                raise ImageError(f"{self.path}: image is closed")
            engine.reader.read_views(offset, views, length)

    def write(self, offset: int, buffers: Sequence[memoryview | bytes]) -> None:
        views = fileio.as_byte_views(buffers)
        length = sum(view.nbytes for view in views)
        with self._lock:
            engine = self._check_writable(offset, length)
            engine.writer.write_views(offset, views, length)
            if engine.cmap.needs_flush:
                engine.flush()

    def write_zeroes(self, offset: int, length: int) -> None:
        with self._lock:
            engine = self._check_writable(offset, length)
            engine.writer.zero_range(offset, length)
            engine.flush_if_full()

    def discard(self, offset: int, length: int) -> None:
        """Reads as zeros afterwards (a deterministic choice), clusters freed where possible.

        A version 2 image with a backing file cannot express zero clusters; there discard
        leaves the data alone (allowed: "contents become unspecified").
        """
        with self._lock:
            engine = self._check_writable(offset, length)
            if not engine.geometry.v3 and engine.header.backing_file:
                return
            engine.writer.zero_range(offset, length)
            engine.flush_if_full()

    def flush(self) -> None:
        with self._lock:
            self._check_open()
            if self._read_only:
                return
            self._engine.flush()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                if not self._read_only:
                    self._engine.flush()
            finally:
                self._closed = True
                self._engine.mapping_watch.changed()  # the fd a cache names is about to close
                self._engine.close_external()
                self._hf.close()

    def __enter__(self) -> Qcow2Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Qcow2Image({self.path!r}, v{self.version}, {self.size} bytes, cluster {self.cluster_size})"

    # -- allocation map ----------------------------------------------------------------------
    def map_extents(self) -> Iterator[Extent]:
        """The allocation state of the whole disk through the backing chain, merged like qemu-img map."""
        with self._lock:
            self._check_open()
            return iter(self._engine.reader.map_extents(self._engine.size))

    def layer_extents(self, start: int, end: int, depth: int) -> list[Extent]:
        """Unmerged extents of [start, end) with this image as layer `depth` of a chain (what an
        overlay asks of its qcow2 backing file)."""
        with self._lock:
            self._check_open()
            return list(self._engine.reader.extents(start, end, depth))

    # -- plain clusters, for a fast path that does their I/O itself (plainmap.py) -----------
    @property
    def lock(self) -> threading.RLock:
        """The image's lock. Held by whoever does I/O at offsets from `plain_runs`, for as long as
        it does: every change of the mapping (and its notice to `watch_mapping`) happens under it."""
        return self._lock

    def watch_mapping(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener()` (under the lock) whenever what `plain_runs` and `plain_layout` said may
        have stopped being true; returns the function that stops the calls."""
        with self._lock:
            return self._engine.mapping_watch.add(listener)

    def plain_layout(self) -> PlainLayout | None:
        """The file and shape plain clusters live in, or None when this image has none that a
        cache may hold (closed, extended L2 entries, external data file). Call under the lock."""
        engine = self._engine
        geo = engine.geometry
        if self._closed or geo.extended_l2 or geo.has_data_file:
            return None
        writable = not self._read_only and engine.prepared_for_write
        return PlainLayout(self._hf.fd, geo.cluster_bits, engine.size, self._hf.size, writable)

    def plain_runs(self, offset: int, length: int) -> list[PlainRun]:
        """The plainly mapped clusters around guest bytes [offset, offset+length) (plainmap.py),
        writable only where an in-place write changes no metadata. Call under the lock; valid
        until the next notice to `watch_mapping`. ImageCorruptError as a read there would raise."""
        layout = self.plain_layout()
        if layout is None:
            return []
        engine = self._engine
        return plain_runs(
            engine.geometry, engine.cmap, engine.allocator.metadata, layout.file_size, layout.disk_size, offset,
            length, layout.writable,
        )  # fmt: skip

    # -- snapshots, resize, rebase, compressed writes ----------------------------------------
    def snapshots(self) -> list[SnapshotInfo]:
        with self._lock:
            return [entry.info() for entry in self._engine.snapshots]

    def create_snapshot(self, name: str) -> SnapshotInfo:
        with self._lock:
            self._check_writable_image()
            return ops.create_snapshot(self._engine, name)

    def delete_snapshot(self, name_or_id: str) -> None:
        with self._lock:
            self._check_writable_image()
            ops.delete_snapshot(self._engine, name_or_id)

    def apply_snapshot(self, name_or_id: str) -> None:
        with self._lock:
            self._check_writable_image()
            ops.apply_snapshot(self._engine, name_or_id)

    def resize(self, new_size: int) -> None:
        with self._lock:
            self._check_writable_image()
            ops.resize(self._engine, new_size)

    def set_backing(self, filename: str | None, fmt_name: str | None = None) -> None:
        """Rewrite the backing file name and format in the header (no data is copied)."""
        with self._lock:
            self._check_writable_image()
            ops.set_backing(self._engine, filename, fmt_name)

    def write_compressed(self, offset: int, data: bytes) -> None:
        """Store one whole guest cluster compressed (for `convert -c`); the cluster must be
        unallocated. Data that does not shrink is stored uncompressed."""
        with self._lock:
            self._check_writable_image()
            ops.write_compressed(self._engine, offset, data)

    def read_snapshot_l1(self, name_or_id: str) -> list[int]:
        """A snapshot's L1 entries as stored (for the checker)."""
        with self._lock:
            return ops.read_snapshot_l1(self._engine, name_or_id)

    # -- properties --------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._engine.size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def cluster_size(self) -> int:
        return self._engine.geometry.cluster_size

    @property
    def header(self) -> Qcow2Header:
        return self._engine.header

    @property
    def version(self) -> int:
        return self._engine.header.version

    @property
    def backing(self) -> BlockBackend | None:
        return self._engine.files.backing

    @property
    def backing_filename(self) -> str | None:
        return self._engine.header.backing_file

    @property
    def backing_format(self) -> str | None:
        return self._engine.header.backing_format

    @property
    def data_file_name(self) -> str | None:
        return self._engine.header.data_file

    @property
    def dirty(self) -> bool:
        return bool(self._engine.header.incompatible_features & fmt.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self._engine.header.incompatible_features & fmt.INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self._engine.header.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS)

    # -- low-level accessors for the checker and tests ---------------------------------------
    @property
    def file_size(self) -> int:
        return self._hf.size

    @property
    def l1_table(self) -> list[int]:
        return list(self._engine.cmap.l1)

    @property
    def refcount_table(self) -> list[int]:
        return list(self._engine.allocator.refcounts.table)

    @property
    def refcounts(self) -> Refcounts:
        """The engine's refcount structure with its block cache (for tests of the cache)."""
        return self._engine.allocator.refcounts

    def get_refcount(self, cluster_index: int) -> int:
        with self._lock:
            return self._engine.allocator.refcount(cluster_index)

    def read_cluster_raw(self, host_offset: int, n: int) -> bytes:
        with self._lock:
            return self._hf.pread(host_offset, n)

    def read_l2_table(self, l2_offset: int) -> list[int]:
        with self._lock:
            table = self._engine.cmap.cached_l2(l2_offset)
            if table is None:
                table = load_u64_table(self._hf.pread(l2_offset, self.cluster_size))
            return list(table)
